"""Long-tailed subsets with the exponential profile (CIFAR-100-LT), picked exactly as JEI-DNN picks them.

JEI-DNN (networkslab/dynn, ``src/data_loading/cifar100LT.py``) keeps, for class c of C,
``int(n_max * imbalance ** (c / (C - 1)))`` images, where ``n_max`` is the set's size over C. Each
set (train and test alike) seeds NumPy's legacy generator with 0 once, then walks the classes in
label order, shuffles that class's indices and keeps the first ones. The subset is stored class by
class in that shuffled order, so its image i is the reference's image i.
"""
from __future__ import annotations

import numpy as np
import torch

from data.arrays import RawArrays

CIFAR100_LT_IMBALANCE = 0.01  # smallest class / largest class: 500 ... 5 training images


def long_tail_counts(num_examples: int, num_classes: int, imbalance: float) -> list[int]:
    """Images kept per class, head class 0 first; the reference's float expression, so every count matches."""
    n_max = num_examples / num_classes
    return [int(n_max * imbalance ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def long_tail_indices(labels: np.ndarray, imbalance: float, seed: int = 0) -> np.ndarray:
    """Indices of the long-tailed subset of a balanced set with ``labels``, in the reference's order.

    A private ``RandomState(seed)`` gives the same draws as the reference's ``np.random.seed(seed)``
    followed by ``np.random.shuffle``, without touching NumPy's global state.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.RandomState(seed)
    kept = []
    for c, n in zip(classes, long_tail_counts(len(labels), len(classes), imbalance)):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        kept.append(members[:n])
    return np.concatenate(kept).astype(np.int64)


def long_tailed(arrays: RawArrays, imbalance: float) -> RawArrays:
    """Both official sets cut to the profile, each with a fresh seed-0 stream (JEI also long-tails the test set)."""
    train = torch.from_numpy(long_tail_indices(arrays.train_labels.numpy(), imbalance))
    test = torch.from_numpy(long_tail_indices(arrays.test_labels.numpy(), imbalance))
    return RawArrays(
        arrays.train_images[train], arrays.train_labels[train], arrays.test_images[test], arrays.test_labels[test]
    )
