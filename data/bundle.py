"""``build_data``: a dataset name and options -> train/val/test loaders plus the facts a model needs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from data.arrays import RawArrays
from data.catalog import DatasetSpec, default_root, get_spec, load_arrays
from data.folders import FolderLoader, SampleList, find_dataset_folder, folder_transforms, scan_test, scan_train
from data.memory import TensorLoader
from data.splits import load_split, make_split, validate_split
from data.text import text_loaders


@dataclass
class DataBundle:
    """Everything ``build_data`` makes.

    ``train``/``val``/``test`` yield (x float32 normalised [B, C, H, W] on the device, y int64 [B]),
    H = W = ``image_size`` (the resized size when ``resize`` is set: what models are built for; x is
    pixels / 255 with ``normalize=False``),
    have ``len()`` (batches) and ``.dataset_size`` (images); ``val`` is None without a validation
    split. ``split`` holds the 'train' and 'val' indices into the official training set (save it with
    ``save_split`` and pass it back as ``split_file`` to reuse it).

    Text bundles (AG News, SST-2) yield x int64 token ids [B, L] padded with 0 instead, have
    ``max_length`` set (``input_shape()`` is then ``(max_length,)``), ``in_channels`` 1 and
    ``image_size`` = ``max_length`` as placeholders; SST-2's 'val' split is empty (``val`` is GLUE's
    validation set).
    """

    train: Iterable
    val: Iterable | None
    test: Iterable
    num_classes: int
    in_channels: int
    image_size: int
    split: dict[str, np.ndarray]
    name: str
    max_length: int | None = None  # text: tokens per sequence at most; None for images

    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one input image; (max_length,) of one text."""
        if self.max_length is not None:
            return (self.max_length,)
        return (self.in_channels, self.image_size, self.image_size)


def build_data(
    name: str,
    root: str | None = None,
    batch_size: int = 64,
    eval_batch_size: int = 250,
    workers: int = 0,
    val_size: int | float = 5000,
    class_balanced: bool = True,
    n_per_class: int | None = None,
    augment: bool = True,
    split_seed: int = 0,
    split_file: str | None = None,
    download: bool = True,
    drop_last: bool = False,
    device: str | torch.device = "cpu",
    synthetic_size: int = 256,
    synthetic_classes: int = 4,
    synthetic_image_size: int = 16,
    loader_seed: int | None = None,
    tokenizer: str = "bert-base-uncased",
    max_length: int = 512,
    resize: int | None = None,
    normalize: bool = True,
) -> DataBundle:
    """Build the loaders of dataset ``name`` (one of ``data.DATASETS``).

    Args:
        name: dataset name; case, '-' and '_' are ignored.
        root: data root; default $MULTIEXIT_DATA, else ./datasets.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        workers: DataLoader worker processes (image-folder datasets only; in-memory ones need none).
        val_size: validation images held out of the official training set: an int, a fraction in
            (0, 1) of the kept images, or 0 for no validation split. AG News: the last val_size texts of
            a permutation drawn with split_seed (the reference holds out 10 000); SST-2: ignored (its
            validation set is GLUE's).
        class_balanced: take val_size / num_classes images from every class (images only).
        n_per_class: keep only this many images (texts) per class (train + val) before splitting.
        augment: training augmentation (in-memory: translation + flip per the catalog; folders:
            RandomResizedCrop + flip; text: none). Validation and test are never augmented.
        split_seed: seed of the split's own generator.
        split_file: reuse a split saved with ``save_split`` instead of drawing one.
        download: let torchvision download a missing dataset, or ``datasets`` fetch AG News/SST-2 and
            ``transformers`` the tokenizer from the Hugging Face hub (needs internet).
        drop_last: drop the last incomplete training batch.
        device: where batches are put.
        synthetic_size, synthetic_classes, synthetic_image_size: the 'synthetic' dataset's size.
        loader_seed: seed of the training loader's generator (order, augmentation); None uses
            ``torch.initial_seed()``, so a seeded run (e.g. sacred's) stays reproducible.
        tokenizer: text only: hub name or local folder of a fast tokenizer.
        max_length: text only: truncate token sequences (with [CLS]/[SEP]) to this length.
        resize: in-memory images only: bilinearly resize every batch (train, val, test) on the device to
            resize x resize, after the augmentation; ``image_size`` becomes resize. JEI-DNN's 32 -> 224.
            Resizing after the translation makes pad 4 at 32 px JEI's RandomCrop(224, padding=28) at
            224 px up to the interpolation at the border (shifts in steps of 7 px; see data.memory).
        normalize: images only: False feeds pixels / 255 in [0, 1] (mean 0, std 1; JEI's SVHN uses
            ToTensor only); translation then fills with black.
    """
    spec = get_spec(name)
    if resize is not None and spec.kind != "memory":
        raise ValueError(f"resize applies to in-memory image datasets only; {spec.name!r} is a {spec.kind} dataset")
    root_path = Path(root) if root is not None else default_root()
    split_args = dict(
        split_file=split_file, val_size=val_size, class_balanced=class_balanced, n_per_class=n_per_class,
        seed=split_seed,
    )
    loader_args = dict(
        batch_size=batch_size, eval_batch_size=eval_batch_size, augment=augment, drop_last=drop_last, device=device,
        seed=torch.initial_seed() if loader_seed is None else int(loader_seed),
    )
    if spec.kind == "folder":
        return _folder_bundle(spec, root_path, split_args, workers=workers, normalize=normalize, **loader_args)
    if spec.kind == "text":
        return _text_bundle(spec, root_path, split_args, download=download, tokenizer=tokenizer, max_length=max_length,
                            **loader_args)
    arrays = load_arrays(
        spec.name, root_path, download, synthetic_size=synthetic_size, synthetic_classes=synthetic_classes,
        synthetic_image_size=synthetic_image_size,
    )
    return _memory_bundle(spec, arrays, split_args, resize=resize, normalize=normalize, **loader_args)


def _choose_split(labels: np.ndarray, split_file, val_size, class_balanced, n_per_class, seed) -> dict[str, np.ndarray]:
    if split_file is not None:
        return validate_split(load_split(split_file), num_examples=len(labels), source=f"split file {split_file}")
    return make_split(labels, val_size=val_size, class_balanced=class_balanced, n_per_class=n_per_class, seed=seed)


def _pixel_stats(mean, std, normalize: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The loaders' mean/std: the dataset's, or 0 and 1 so that batches are pixels / 255 (normalize=False)."""
    if normalize:
        return tuple(mean), tuple(std)
    return (0.0,) * len(mean), (1.0,) * len(std)


def _memory_bundle(
    spec: DatasetSpec, arrays: RawArrays, split_args: dict, *, resize, normalize, batch_size, eval_batch_size, augment,
    drop_last, device, seed,
) -> DataBundle:
    images, labels = arrays.train_images, arrays.train_labels
    split = _choose_split(labels.numpy(), **split_args)
    mean, std = spec.mean, spec.std
    if mean is None:  # synthetic: statistics of its own training images
        pixels = images.to(torch.float64).div(255.0)
        mean, std = tuple(pixels.mean(dim=(0, 2, 3)).tolist()), tuple(pixels.std(dim=(0, 2, 3)).tolist())
    mean, std = _pixel_stats(mean, std, normalize)
    pad = max(1, images.shape[-1] // 8) if spec.name == "synthetic" else spec.pad  # synthetic size varies

    common = dict(mean=mean, std=std, device=device, resize=resize)
    train = TensorLoader(
        images, labels, batch_size=batch_size, indices=split["train"], shuffle=True, drop_last=drop_last,
        pad=pad if augment else 0, flip=spec.flip and augment, seed=seed, **common,
    )
    val = None
    if len(split["val"]):
        val = TensorLoader(images, labels, batch_size=eval_batch_size, indices=split["val"], **common)
    test = TensorLoader(arrays.test_images, arrays.test_labels, batch_size=eval_batch_size, **common)
    return DataBundle(
        train=train, val=val, test=test, num_classes=spec.num_classes or int(labels.max()) + 1,
        in_channels=images.shape[1], image_size=resize or images.shape[-1], split=split, name=spec.name,
    )


def _folder_bundle(
    spec: DatasetSpec, root: Path, split_args: dict, *, workers, normalize, batch_size, eval_batch_size, augment,
    drop_last, device, seed,
) -> DataBundle:
    folder = find_dataset_folder(spec, root)
    train_samples, classes = scan_train(folder / "train")
    test_samples = scan_test(folder / "val", {c: i for i, c in enumerate(classes)})
    split = _choose_split(np.asarray([t for _, t in train_samples], dtype=np.int64), **split_args)

    size = spec.image_size
    train_tf, eval_tf = folder_transforms(size, train=augment), folder_transforms(size, train=False)
    mean, std = _pixel_stats(spec.mean, spec.std, normalize)
    common = dict(mean=mean, std=std, workers=workers, device=device)
    pick = lambda idx: [train_samples[i] for i in idx]  # noqa: E731
    train = FolderLoader(
        SampleList(pick(split["train"]), train_tf), batch_size=batch_size, shuffle=True, drop_last=drop_last,
        seed=seed, **common,
    )
    val = None
    if len(split["val"]):
        val = FolderLoader(SampleList(pick(split["val"]), eval_tf), batch_size=eval_batch_size, **common)
    test = FolderLoader(SampleList(test_samples, eval_tf), batch_size=eval_batch_size, **common)
    return DataBundle(
        train=train, val=val, test=test, num_classes=len(classes), in_channels=spec.in_channels,
        image_size=size, split=split, name=spec.name,
    )


def _text_bundle(spec: DatasetSpec, root: Path, split_args: dict, *, augment, max_length, **options) -> DataBundle:
    """AG News / SST-2 (``data.text``); ``augment`` does not apply to text."""
    train, val, test, split = text_loaders(spec.name, root, split_args, num_classes=spec.num_classes,
                                           max_length=max_length, **options)
    return DataBundle(
        train=train, val=val, test=test, num_classes=spec.num_classes, in_channels=spec.in_channels,
        image_size=max_length, split=split, name=spec.name, max_length=max_length,
    )
