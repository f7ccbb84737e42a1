"""The in-memory form of a small image dataset: uint8 images [N, C, H, W] and int64 labels [N]."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RawArrays:
    """Official training and test sets of an in-memory dataset, un-normalised."""

    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # uint8 [M, C, H, W]
    test_labels: torch.Tensor  # int64 [M]

    def __post_init__(self) -> None:
        for part in ("train", "test"):
            images, labels = getattr(self, f"{part}_images"), getattr(self, f"{part}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"{part} images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(f"{part} labels must be int64 [N], got {labels.dtype} {tuple(labels.shape)}")


def images_from_numpy(array: np.ndarray, layout: str) -> torch.Tensor:
    """uint8 array in layout 'NHWC', 'NCHW' or 'NHW' (one channel) -> contiguous uint8 tensor [N, C, H, W]."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))
    if layout == "NHWC":
        tensor = tensor.permute(0, 3, 1, 2)
    elif layout == "NHW":
        tensor = tensor.unsqueeze(1)
    elif layout != "NCHW":
        raise ValueError(f"unknown layout {layout!r}")
    return tensor.contiguous()


def labels_from_numpy(labels) -> torch.Tensor:
    """Any integer sequence -> int64 tensor [N]."""
    return torch.as_tensor(np.asarray(labels, dtype=np.int64))
