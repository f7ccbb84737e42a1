"""ImageNet and Tiny-ImageNet from image folders, read by a torch DataLoader with worker processes.

Layout under the dataset folder (the data root itself, or one of its sub-folders named in the
catalog, e.g. ROOT/tiny-imagenet-200):

* ``train/<class>/**/<image>``: the official training set (Tiny-ImageNet keeps its images in
  ``train/<wnid>/images/``; the ``*_boxes.txt`` files are ignored). Class indices follow the sorted
  class folder names, as in ``torchvision.datasets.ImageFolder``.
* ``val/``: the official validation set, used as our *test* set, either sorted into class folders
  ``val/<class>/<image>`` (ImageNet as usually prepared) or in Tiny-ImageNet's layout
  ``val/images/<image>`` + ``val/val_annotations.txt`` (tab-separated: file name, class, box).

Workers decode and crop to uint8 tensors; normalisation happens per batch on the device.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset

from data.batch_ops import normalize_uint8
from data.catalog import DatasetSpec
from data.ordering import SeededLoader

Samples = list[tuple[str, int]]


def find_dataset_folder(spec: DatasetSpec, root: Path) -> Path:
    """First of ROOT, ROOT/<known sub-folder> that has a train/ folder; FileNotFoundError listing them."""
    candidates = [root] + [root / sub for sub in spec.folders]
    for folder in candidates:
        if (folder / "train").is_dir():
            return folder
    tried = "\n".join(f"  {c / 'train'}" for c in candidates)
    raise FileNotFoundError(
        f"{spec.name} not found: no train/ folder at any of\n{tried}\n"
        f"To get it: {spec.how_to_get} (data root: pass root=... or set $MULTIEXIT_DATA)."
    )


def scan_train(train_dir: Path) -> tuple[Samples, list[str]]:
    """(path, class index) of every image under train/<class>/, and the sorted class names."""
    try:
        classes, class_to_idx = find_classes(train_dir)
        samples = make_dataset(train_dir, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{train_dir} is not an image-folder training set: {err}") from None
    return samples, classes


def _scan_tiny_val(val_dir: Path, class_to_idx: dict[str, int]) -> Samples:
    annotations = val_dir / "val_annotations.txt"
    samples = []
    for line_no, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{annotations}:{line_no}: expected 'file<TAB>class...', got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_to_idx:
            raise ValueError(f"{annotations}:{line_no}: class {wnid!r} has no folder under train/")
        path = val_dir / "images" / name
        if not path.is_file():
            raise FileNotFoundError(f"{annotations}:{line_no} names {path}, which does not exist")
        samples.append((str(path), class_to_idx[wnid]))
    if not samples:
        raise FileNotFoundError(f"{annotations} lists no images")
    return samples


def scan_test(val_dir: Path, class_to_idx: dict[str, int]) -> Samples:
    """Samples of the official validation folder, labelled with the *training* class indices."""
    if (val_dir / "val_annotations.txt").is_file() and (val_dir / "images").is_dir():
        return _scan_tiny_val(val_dir, class_to_idx)
    if not val_dir.is_dir():
        raise FileNotFoundError(f"test set folder {val_dir} does not exist")
    present = sorted(p.name for p in val_dir.iterdir() if p.is_dir())
    if not present:
        raise FileNotFoundError(
            f"{val_dir} has neither class folders (val/<class>/<image>) nor Tiny-ImageNet's "
            "val/images + val/val_annotations.txt; sort the validation images into class folders"
        )
    unknown = [c for c in present if c not in class_to_idx]
    if unknown:
        raise ValueError(f"{val_dir} has class folders with no counterpart under train/: {unknown[:10]}")
    return make_dataset(val_dir, {c: class_to_idx[c] for c in present}, extensions=IMG_EXTENSIONS, allow_empty=True)


def folder_transforms(image_size: int, train: bool) -> transforms.Compose:
    """Train: RandomResizedCrop + flip. Eval: Resize (to size / 0.875, ImageNet's 256 for 224; Tiny-ImageNet
    64 px stays 64) + CenterCrop. Both end in a uint8 tensor [C, H, W]."""
    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        resize = image_size if image_size <= 64 else int(round(image_size / 0.875))
        steps = [transforms.Resize(resize), transforms.CenterCrop(image_size)]
    return transforms.Compose(steps + [transforms.PILToTensor()])


class SampleList(Dataset):
    """(image path, label) pairs -> (uint8 tensor [3, H, W], label), decoded as RGB."""

    def __init__(self, samples: Samples, transform) -> None:
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        return self.transform(default_loader(path)), target


class _EpochSampler(Sampler[int]):
    """Yields the order the owning FolderLoader drew for the current epoch, from the resume point on."""

    def __init__(self, owner: "FolderLoader") -> None:
        self.owner = owner

    def __iter__(self):
        return iter(self.owner._epoch_indices.tolist())

    def __len__(self) -> int:
        return len(self.owner._epoch_indices)


class FolderLoader(SeededLoader):
    """Iterable over (x float32 [B, 3, S, S] normalised, y int64 [B]) on ``device`` from a SampleList.

    The order comes from the loader's own generator (exactly resumable, see data.ordering); random
    crops run in the workers with torch's per-worker seeding, so they are not replayed on resume.
    """

    def __init__(
        self,
        dataset: SampleList,
        mean,
        std,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        workers: int = 0,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("a loader needs at least one image")
        super().__init__(mean, std, batch_size, shuffle=shuffle, drop_last=drop_last, device=device, seed=seed)
        self.dataset = dataset
        self._epoch_indices = torch.arange(0)
        self._loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=_EpochSampler(self),
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )

    @property
    def dataset_size(self) -> int:
        return len(self.dataset)

    @property
    def targets(self) -> torch.Tensor:
        return torch.as_tensor(self.dataset.targets, dtype=torch.int64)

    def __iter__(self):
        skip = self._order.start_epoch()
        n = self.dataset_size
        order = torch.randperm(n, generator=self._order.generator) if self.shuffle else torch.arange(n)
        self._epoch_indices = order[skip * self.batch_size :]
        for x, y in self._loader:
            x = normalize_uint8(x.to(self.device, non_blocking=True), self.mean, self.std)
            y = y.to(self.device, non_blocking=True)
            self._order.batch_done()
            yield x, y
        self._order.end_epoch()

    def __repr__(self) -> str:
        return (
            f"FolderLoader(images={self.dataset_size}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, device={self.device})"
        )
