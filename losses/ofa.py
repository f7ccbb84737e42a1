"""IMTA's One-For-All distillation: the frozen stage-1 last exit teaches every new early exit."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from losses.base import MultiExitLoss
from losses.kd import KL_REDUCTIONS, kd_kl


class OneForAllLoss(MultiExitLoss):
    """L = CE(z_n, y) + sum_{k<n} [(1 - gamma) CE(z_k, y) + gamma T^2 KL(softmax(t/T) || softmax(z_k/T))].

    ``teacher`` returns the teacher logits t of the current batch (the frozen stage-1 final exit,
    detached). ``kl_reduction='batchmean'`` is the textbook KD term (default, the paper's formula);
    'mean' divides by batch x classes as the released code's ``nn.KLDivLoss()`` does, which shrinks
    the distillation weight by the number of classes.
    """

    def __init__(self, teacher: Callable[[], torch.Tensor], gamma: float = 0.9, temperature: float = 3.0,
                 kl_reduction: str = "batchmean"):
        super().__init__()
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
        self.teacher = teacher
        self.gamma = gamma
        self.temperature = temperature
        self.kl_reduction = kl_reduction

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        teacher = self.teacher()
        if teacher is None:
            raise RuntimeError("no teacher logits: the model must run a training forward pass first")
        loss = F.cross_entropy(outputs[-1], targets)
        for z in outputs[:-1]:
            kd = kd_kl(z.float(), teacher.float(), self.temperature, self.kl_reduction)
            loss = loss + (1 - self.gamma) * F.cross_entropy(z, targets) + self.gamma * kd
        return loss
