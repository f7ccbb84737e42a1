"""What every multi-exit objective looks like to the training engine."""
from __future__ import annotations

import math

import torch
from torch import nn


class EpochMeans(nn.Module):
    """Per-image means of named loss terms over an epoch's training batches.

    Summed on the device and read once per epoch (no host sync per step); a statistic, not training state,
    so it stays out of checkpoints and old snapshots still load.
    """

    def __init__(self, *names: str):
        super().__init__()
        self.names = names
        self.register_buffer("sums", torch.zeros(len(names)), persistent=False)
        self.seen = 0

    def add(self, batch_size: int, **terms: torch.Tensor) -> None:
        self.sums += torch.stack([terms[n].detach().float() for n in self.names]) * batch_size
        self.seen += batch_size

    def reset(self) -> None:
        self.sums.zero_()
        self.seen = 0

    def means(self) -> dict[str, float]:
        return {n: float(v) / self.seen for n, v in zip(self.names, self.sums)} if self.seen else {}


class MultiExitLoss(nn.Module):
    """``forward(outputs, targets)`` -> scalar loss, where ``outputs`` is one logits tensor per exit.

    Objectives with state that evolves during training (e.g. Phuong & Lampert's temperature) keep it
    in buffers, so it is saved and restored with the rest of the training state, and update it in
    ``after_batch``, which the engine calls once per optimisation step. Per-epoch statistics are reset in
    ``start_epoch`` and reported by ``extra_metrics``, which the engine calls before and after each epoch.

    Objectives that decide more than the loss (JEI-DNN's gates) add metrics to every evaluation
    (``evaluation_metrics``), update their state once the epoch is validated (``end_epoch``) and say which
    epoch is best (``selection_score``).
    """

    def _epoch_means(self) -> EpochMeans | None:
        """The terms an objective averages over each epoch: its submodule ``epoch_means``, if it has one."""
        return getattr(self, "epoch_means", None)

    def start_epoch(self, epoch: int) -> None:
        """Reset what ``extra_metrics`` averages over an epoch; ``epoch`` (0-based) is the one starting, for
        objectives whose terms follow a schedule."""
        if self._epoch_means() is not None:
            self._epoch_means().reset()

    def after_batch(self, outputs: list[torch.Tensor]) -> None:
        """Update training-time state after a step (default: nothing)."""

    def extra_metrics(self) -> dict[str, float]:
        """Scalars worth logging once per epoch: the epoch means, and e.g. the current temperature."""
        return self._epoch_means().means() if self._epoch_means() is not None else {}

    def evaluation_metrics(self, logits: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict[str, float]:
        """Metrics beyond per-exit accuracy from a split's exit logits [K, N, C] (default: none)."""
        return {}

    def end_epoch(self, metrics: dict[str, float]) -> None:
        """Called once the epoch's validation metrics are in ``metrics`` (which it may extend), before the
        checkpoint is written (default: nothing)."""

    def selection_score(self, metrics: dict[str, float]) -> float:
        """What ``select='best_val'`` maximises: the mean validation top-1 over exits, by default."""
        return metrics.get("val.acc.mean", -math.inf)
