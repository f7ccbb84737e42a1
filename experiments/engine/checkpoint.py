"""Snapshots: atomic writes, safe (``weights_only``) loading, a run's snapshot folder, what a resume may change."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from analysis.recipes import RUNTIME_KEYS, flatten, is_free

SNAPSHOT_ROOT = Path("snapshots")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` with torch.save to a temporary file, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_snapshot(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a snapshot with ``weights_only=True``: tensors and plain containers only, no code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No snapshot at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def snapshot_dir(experiment: str, uid: str, root: str | Path = SNAPSHOT_ROOT) -> Path:
    """Where a run keeps its snapshots: ``<root>/<experiment>/<uid>/`` (absolute, so records work from anywhere)."""
    return (Path(root).expanduser() / experiment / str(uid)).resolve()


# What may differ between an interrupted run and its resumption: where and how fast it runs, not what.
# ``seed`` is free because the snapshot restores every generator; ``train.epochs`` may grow (with a warning).
RESUME_FREE_KEYS = RUNTIME_KEYS + ("seed", "train.epochs")


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every config value that would change what an exact resume computes."""
    old, new = flatten(saved), flatten(current)
    return [
        f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not is_free(key, RESUME_FREE_KEYS)
    ]
