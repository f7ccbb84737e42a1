"""Whole-batch image operations on tensors (on whatever device the batch is): normalise, translate, flip, resize.

The random draws (offsets, flip decisions) are made by the caller, so a loader can draw them from its
own generator and replay them exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_stats(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std sequences -> float32 tensors [1, C, 1, 1] on ``device``."""
    as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # noqa: E731
    return as_tensor(mean), as_tensor(std)


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] in 0..255 -> float32 (x / 255 - mean) / std."""
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def translate(images: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift image b by ``offsets[b] = (dy, dx)`` pixels (|dy|, |dx| <= pad), filling with zeros.

    ``out[b, :, i, j] = images[b, :, i - dy, j - dx]`` where that pixel exists, else 0. Applied to
    normalised images, 0 is the dataset mean colour.
    """
    if pad == 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = offsets.to(images.device)
    rows = torch.arange(h, device=images.device) + (pad - offsets[:, 0:1])  # [B, H]
    cols = torch.arange(w, device=images.device) + (pad - offsets[:, 1:2])  # [B, W]
    batch = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    chans = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, chans, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def hflip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images whose ``flip`` entry (bool [B]) is True."""
    return torch.where(flip.to(images.device).view(-1, 1, 1, 1), images.flip(3), images)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a float batch to ``size`` x ``size``, as torchvision's Resize: half-pixel centres
    (PIL's and torchvision's convention) and antialiasing, which only matters when shrinking."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
