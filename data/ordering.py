"""A loader's own random stream and its position in the epoch, saved and restored as a whole;
and the base class of both loaders built on it.

Each epoch starts by remembering the generator state, then draws everything the epoch needs (the
order, augmentation parameters) from the generator. ``state_dict()`` taken in the middle of an epoch
is therefore (state at the epoch start, batches already handed out): loading it and iterating again
replays the same epoch from the next batch on. Taken between epochs it is simply the current state.
Everything is a tensor or an int, so it fits in a ``torch.save`` checkpoint (``weights_only`` too).
"""
from __future__ import annotations

import math

import torch

from data.batch_ops import channel_stats


class EpochOrder:
    """Generator + epoch bookkeeping shared by the in-memory and the folder loaders."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)
        self._epoch_start: torch.Tensor | None = None  # generator state when the current epoch began
        self.batches_done = 0  # batches of the current epoch already handed out
        self._pending_skip = 0  # batches to skip at the next epoch start (after load_state_dict)

    def start_epoch(self) -> int:
        """Mark the start of an epoch; returns how many leading batches to skip (resume)."""
        self._epoch_start = self.generator.get_state()
        skip, self._pending_skip = self._pending_skip, 0
        self.batches_done = skip
        return skip

    def batch_done(self) -> None:
        self.batches_done += 1

    def end_epoch(self) -> None:
        self._epoch_start = None
        self.batches_done = 0

    def state_dict(self) -> dict:
        if self._epoch_start is not None:
            return {"seed": self.seed, "generator": self._epoch_start.clone(), "batches_done": self.batches_done}
        return {"seed": self.seed, "generator": self.generator.get_state(), "batches_done": self._pending_skip}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state.get("seed", self.seed))
        self.generator.set_state(state["generator"])
        self._epoch_start = None
        self.batches_done = 0
        self._pending_skip = int(state.get("batches_done", 0))


class SeededLoader:
    """What both loaders share: batch counting, device, normalisation statistics, resumable order.

    Subclasses set ``dataset_size`` (a property) and implement ``__iter__`` with ``self._order``.
    """

    def __init__(self, mean, std, batch_size: int, *, shuffle: bool, drop_last: bool, device, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.mean, self.std = channel_stats(mean, std, self.device)
        self._order = EpochOrder(seed)

    dataset_size: int

    def __len__(self) -> int:
        """Batches per epoch."""
        n = self.dataset_size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def state_dict(self) -> dict:
        """Generator state and position in the epoch, to resume exactly."""
        return self._order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._order.load_state_dict(state)
