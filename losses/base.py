"""What every multi-exit objective looks like to the training engine."""
from __future__ import annotations

import torch
from torch import nn


class MultiExitLoss(nn.Module):
    """``forward(outputs, targets)`` -> scalar loss, where ``outputs`` is one logits tensor per exit.

    Objectives with state that evolves during training (e.g. Phuong & Lampert's temperature) keep it
    in buffers, so it is saved and restored with the rest of the training state, and update it in
    ``after_batch``, which the engine calls once per optimisation step. Per-epoch statistics are reset in
    ``start_epoch`` and reported by ``extra_metrics``, which the engine calls before and after each epoch.
    """

    def start_epoch(self) -> None:
        """Reset what ``extra_metrics`` averages over an epoch (default: nothing)."""

    def after_batch(self, outputs: list[torch.Tensor]) -> None:
        """Update training-time state after a step (default: nothing)."""

    def extra_metrics(self) -> dict[str, float]:
        """Scalars worth logging once per epoch (e.g. the current temperature)."""
        return {}
