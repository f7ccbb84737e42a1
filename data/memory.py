"""Loader for datasets held in memory as uint8 tensors, with augmentation done per batch on tensors.

Per batch: gather the uint8 images, move them to the device (4x less traffic than float), convert to
float and normalise, then (training only) translate by random integer offsets with zero fill and
randomly mirror, and last (optionally, every split) resize bilinearly to a square size. Translating
after normalising makes the fill the dataset mean colour, Phuong & Lampert's choice
(papers/phuong-lampert-and-imta.md 1.3). No PIL, no worker processes.

Resizing after the translation is what makes pad 4 at 32 px, resized to 224, JEI-DNN's
Resize(224) + RandomCrop(224, padding=28): the same shift range (+-28 px at 224) up to the
interpolation at the border, though in steps of 7 px rather than 1, and filled with the mean colour
(black when not normalised) where the reference pads black.
"""
from __future__ import annotations

import numpy as np
import torch

from data.batch_ops import hflip, normalize_uint8, resize_square, translate
from data.ordering import SeededLoader


class TensorLoader(SeededLoader):
    """Iterable over (x float32 [B, C, H, W] normalised, y int64 [B]) batches on ``device``; H = W = resize if set.

    Args:
        images: uint8 [N, C, H, W] (kept on the CPU; shared, never copied).
        labels: int64 [N].
        mean, std: per-channel statistics in [0, 1] units.
        batch_size: images per batch.
        indices: which of the N images this loader serves (default: all), e.g. a split's 'train'.
        shuffle: new random order every epoch.
        pad: random translation by integers in [-pad, pad] per axis (0: none).
        flip: random horizontal flip.
        drop_last: drop the last incomplete batch.
        device: where batches go.
        seed: seeds the loader's own generator (order and augmentation draws).
        resize: resize every batch to resize x resize after the augmentation (None: stored size).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean,
        std,
        batch_size: int,
        *,
        indices=None,
        shuffle: bool = False,
        pad: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        resize: int | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        super().__init__(mean, std, batch_size, shuffle=shuffle, drop_last=drop_last, device=device, seed=seed)
        self.images = images
        self.labels = labels
        self.indices = torch.arange(len(images)) if indices is None else torch.as_tensor(np.asarray(indices))
        self.indices = self.indices.to(torch.int64)
        if len(self.indices) == 0:
            raise ValueError("a loader needs at least one image")
        self.pad = int(pad)
        self.flip = bool(flip)
        self.resize = None if resize is None else int(resize)
        self.batch_indices: torch.Tensor | None = None  # image indices of the last batch (CRD's memory bank)

    @property
    def dataset_size(self) -> int:
        """Number of images this loader serves per epoch (before drop_last)."""
        return len(self.indices)

    @property
    def augment(self) -> bool:
        return self.pad > 0 or self.flip

    @property
    def targets(self) -> torch.Tensor:
        """Labels in dataset order (the batch order when not shuffled)."""
        return self.labels[self.indices]

    def _draw_epoch(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        n, g = self.dataset_size, self._order.generator
        order = self.indices[torch.randperm(n, generator=g)] if self.shuffle else self.indices
        offsets = torch.randint(-self.pad, self.pad + 1, (n, 2), generator=g) if self.pad else None
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else None
        return order, offsets, flips

    def __iter__(self):
        skip = self._order.start_epoch()
        order, offsets, flips = self._draw_epoch()
        pin = self.device.type == "cuda"
        for b in range(skip, len(self)):
            part = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = order[part]
            x, y = self.images[idx], self.labels[idx]
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            x = normalize_uint8(x.to(self.device, non_blocking=True), self.mean, self.std)
            y = y.to(self.device, non_blocking=True)
            if offsets is not None:
                x = translate(x, offsets[part], self.pad)
            if flips is not None:
                x = hflip(x, flips[part])
            if self.resize is not None:
                x = resize_square(x, self.resize)
            self._order.batch_done()
            self.batch_indices = idx
            yield x, y
        self._order.end_epoch()

    def __repr__(self) -> str:
        return (
            f"TensorLoader(images={self.dataset_size}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, pad={self.pad}, flip={self.flip}, resize={self.resize}, device={self.device})"
        )
