"""EENet's multi-exit training objective (Ilhan et al., WACV 2024; spec section 2.3).

L = sum_j j / (K(K+1)) CE(z_j, y) + [late] sum_{j<K} w T^2 KL_mean(softmax(z_K / T) || softmax(z_j / T)),

with weights growing with depth (they sum to 1/2) and a distillation term from the final exit into the
earlier ones that switches on for the last quarter of training ("late": 0-based epoch > 0.75 x epochs).
As released: T = 3, w = 0.01, the KL divided by batch x classes (``nn.KLDivLoss``'s default "mean", so the
term is tiny), and the final exit's logits *not* detached, so the term also moves the final exit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.base import MultiExitLoss
from losses.kd import kd_kl


def depth_weights(n_exits: int) -> list[float]:
    """j / (K(K+1)) for j = 1..K: deeper exits weigh more; the weights sum to 1/2."""
    return [j / (n_exits * (n_exits + 1)) for j in range(1, n_exits + 1)]


class EENetLoss(MultiExitLoss):
    """Depth-weighted CE on every exit, plus final-to-early KD in the last quarter of ``epochs``."""

    def __init__(self, epochs: int, temperature: float = 3.0, kd_weight: float = 0.01, kd_from: float = 0.75):
        super().__init__()
        self.epochs, self.temperature, self.kd_weight, self.kd_from = epochs, temperature, kd_weight, kd_from
        self.distilling = False

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        self.distilling = epoch > self.kd_from * self.epochs

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        loss = sum(w * F.cross_entropy(z, targets) for w, z in zip(depth_weights(len(outputs)), outputs))
        if self.distilling:
            final = outputs[-1]
            loss = loss + self.kd_weight * sum(kd_kl(z, final, self.temperature, reduction="mean", detach_teacher=False)
                                               for z in outputs[:-1])
        return loss

    def extra_metrics(self) -> dict[str, float]:
        return {**super().extra_metrics(), "distilling": float(self.distilling)}
