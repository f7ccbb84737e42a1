"""A tiny, learnable, deterministic stand-in for CIFAR, for tests and smoke runs (no files, no network).

Each class has a fixed prototype: a class colour plus a smooth random pattern (a 4x4 grid upsampled
bilinearly, so a shift by a few pixels barely changes it). An image is its class prototype plus
Gaussian pixel noise, rounded to uint8. Classes are balanced; the test set has half as many images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from data.arrays import RawArrays

SYNTHETIC_SEED = 20190101  # fixed: the dataset is the same in every run and on every machine
NOISE_STD = 24.0  # pixel noise, in uint8 levels


def synthetic_prototypes(classes: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """float prototypes [classes, 3, S, S] with values in [16, 239]."""
    colour = rng.uniform(0.0, 1.0, size=(classes, 3, 1, 1))
    pattern = rng.uniform(0.0, 1.0, size=(classes, 3, 4, 4))
    size = (image_size, image_size)
    smooth = F.interpolate(torch.from_numpy(pattern), size=size, mode="bilinear", align_corners=False)
    return 16.0 + 223.0 * (0.6 * colour + 0.4 * smooth.numpy())


def _draw(prototypes: np.ndarray, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    classes = prototypes.shape[0]
    labels = rng.permutation(np.arange(n) % classes)
    noisy = prototypes[labels] + rng.normal(0.0, NOISE_STD, size=(n, *prototypes.shape[1:]))
    images = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def make_synthetic(size: int = 256, classes: int = 4, image_size: int = 16, seed: int = SYNTHETIC_SEED) -> RawArrays:
    """``size`` training and ``size // 2`` test images of ``classes`` classes, 3 x image_size x image_size."""
    if size < classes or classes < 2 or image_size < 4:
        raise ValueError(
            f"synthetic data needs classes >= 2, size >= classes and image_size >= 4; "
            f"got size={size}, classes={classes}, image_size={image_size}"
        )
    rng = np.random.default_rng(seed)
    prototypes = synthetic_prototypes(classes, image_size, rng)
    train_images, train_labels = _draw(prototypes, size, rng)
    test_images, test_labels = _draw(prototypes, max(size // 2, classes), rng)
    return RawArrays(train_images, train_labels, test_images, test_labels)
