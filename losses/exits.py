"""Cross-entropy over the exits of a multi-exit network."""
from __future__ import annotations

from typing import Sequence

import math

import torch
import torch.nn.functional as F

from losses.base import MultiExitLoss


class ExitCrossEntropy(MultiExitLoss):
    """sum_k w_k * CE(z_k, y): equal weights (w_k = 1) unless ``weights`` are given.

    Labels equal to ``ignore_index`` (-100) are skipped, as for semi-supervised batches.
    """

    def __init__(self, weights: Sequence[float] | None = None):
        super().__init__()
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        weights = self.weights or [1.0] * len(outputs)
        if len(weights) != len(outputs):
            raise ValueError(f"{len(weights)} exit weights for {len(outputs)} exits")
        return sum(w * F.cross_entropy(z, targets) for w, z in zip(weights, outputs))

    def selection_score(self, metrics: dict[str, float]) -> float:
        """Mean validation top-1 of the exits this objective trains (weight > 0): a network trained on its final
        exit alone is chosen by that exit, not by exits it never trained."""
        if self.weights is None:
            return super().selection_score(metrics)
        accs = [metrics.get(f"val.acc.exit{k + 1}") for k, w in enumerate(self.weights) if w > 0]
        return -math.inf if None in accs else sum(accs) / len(accs)


def final_exit_only(num_exits: int) -> ExitCrossEntropy:
    """CE on the final exit alone: how single-exit networks (a DIH teacher, a JEI backbone) train; the earlier
    exits get no gradient."""
    return ExitCrossEntropy(weights=[0.0] * (num_exits - 1) + [1.0])
