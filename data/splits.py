"""Seeded train/validation split of an official training set, and saving/loading it (npz).

The split only ever holds indices into the official training set; the official test set is never
split. Randomness comes from a dedicated ``numpy.random.default_rng(seed)``, so the split does not
depend on (or disturb) any other random state, e.g. model initialisation.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

REQUIRED_KEYS = ("train", "val")


def resolve_val_size(val_size: int | float, available: int) -> int:
    """Number of validation images: an int as is, a fraction in (0, 1) of ``available``, 0 for none."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)):
        raise ValueError(f"val_size must be an int or a fraction in (0, 1), got {val_size!r}")
    if isinstance(val_size, (float, np.floating)) and not float(val_size).is_integer():
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"a fractional val_size must lie in (0, 1), got {val_size}")
        return int(round(float(val_size) * available))
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    return int(val_size)


def make_split(
    labels,
    val_size: int | float = 5000,
    class_balanced: bool = True,
    n_per_class: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Split indices of the official training set (with ``labels``) into 'train' and 'val'.

    1. If ``n_per_class`` is set, keep that many random images of every class (train + val
       together, Phuong & Lampert's reduced-data regime); otherwise keep everything.
    2. Hold out ``val_size`` kept images for validation: ``val_size / num_classes`` from every class
       when ``class_balanced``, else a uniformly random subset. The rest of the kept images train.

    Returns sorted int64 index arrays; ``val`` is empty when ``val_size`` is 0.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)

    if n_per_class is not None:
        if int(n_per_class) < 1:
            raise ValueError(f"n_per_class must be >= 1 or None, got {n_per_class}")
        short = {int(c): int(n) for c, n in zip(classes, counts) if n < n_per_class}
        if short:
            raise ValueError(f"n_per_class={n_per_class} but some classes have fewer images: {short}")
    keep = len(labels) if n_per_class is None else int(n_per_class)
    # One permutation per class; its first `keep` entries are the kept images of that class.
    per_class = [rng.permutation(np.flatnonzero(labels == c))[:keep] for c in classes]
    kept = np.concatenate(per_class)

    n_val = resolve_val_size(val_size, len(kept))
    if class_balanced:
        if n_val % len(classes):
            lower = n_val // len(classes) * len(classes)
            raise ValueError(
                f"class-balanced val_size={n_val} is not divisible by the {len(classes)} classes; "
                f"use a multiple of {len(classes)} (e.g. {lower} or {lower + len(classes)}) or class_balanced=False"
            )
        each = n_val // len(classes)
        smallest = min(len(idx) for idx in per_class)
        if n_val and each >= smallest:
            raise ValueError(
                f"val_size={n_val} takes {each} images per class, but the smallest class has only "
                f"{smallest} (kept) images and needs at least one for training"
            )
        val = np.concatenate([idx[:each] for idx in per_class])
    else:
        if n_val >= len(kept):
            raise ValueError(f"val_size={n_val} leaves no training images out of {len(kept)}")
        val = rng.choice(kept, size=n_val, replace=False)
    train = np.setdiff1d(kept, val)
    return {"train": train.astype(np.int64), "val": np.sort(val).astype(np.int64)}


def validate_split(split: dict, num_examples: int | None = None, source: str | Path = "split") -> dict[str, np.ndarray]:
    """Check a split (keys, 1-D integer arrays, unique, disjoint, in [0, num_examples)); return its
    'train'/'val' as int64. Errors start with ``source`` (e.g. the split file)."""
    missing = [k for k in REQUIRED_KEYS if k not in split]
    if missing:
        raise ValueError(f"{source}: missing {missing}; a split needs arrays 'train' and 'val' (found {sorted(split)})")
    out = {}
    for key in REQUIRED_KEYS:
        idx = np.asarray(split[key])
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"{source}: '{key}' must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and idx.min() < 0:
            raise ValueError(f"{source}: '{key}' holds negative indices (min {idx.min()})")
        if num_examples is not None and idx.size and idx.max() >= num_examples:
            raise ValueError(
                f"{source}: '{key}' holds index {idx.max()} but the training set has only {num_examples} images "
                f"(indices 0..{num_examples - 1}); was the split made for another dataset?"
            )
        if np.unique(idx).size != idx.size:
            raise ValueError(f"{source}: '{key}' holds repeated indices")
        out[key] = idx
    if out["train"].size == 0:
        raise ValueError(f"{source}: 'train' is empty")
    overlap = np.intersect1d(out["train"], out["val"])
    if overlap.size:
        raise ValueError(
            f"{source}: {overlap.size} indices are in both 'train' and 'val' (e.g. {overlap[:5].tolist()})"
        )
    return out


def save_split(split: dict, path: str | Path) -> Path:
    """Write a split (its 'train'/'val' and any other array entries) to an .npz file, atomically.

    '.npz' is appended if ``path`` lacks it; returns the path written.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    checked = validate_split(split, source="save_split")
    arrays = {k: np.asarray(v) for k, v in split.items()}
    arrays.update(checked)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_split(path: str | Path) -> dict[str, np.ndarray]:
    """Read a split written by :func:`save_split`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            split = {k: npz[k] for k in npz.files}
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"split file {path} is not a readable .npz split ({type(err).__name__}: {err})") from None
    split.update(validate_split(split, source=f"split file {path}"))
    return split
