"""Knowledge distillation from a cohort of teachers into the student's final exit (KD and DIH).

Per cohort member j: KD_j = (1 - alpha) CE(z_s, y) + alpha tau^2 KL(softmax(z_j / tau) || softmax(z_s / tau)),
with the KL per sample ("batchmean") and CE averaged over the batch. KD is the cohort of the teacher's final
exit alone; DIH's cohort is its k intermediate heads and the final exit. DIH's released code adds the k+1
full KD terms (``reduction='sum'``: CE counted k+1 times, which acts like a (k+1)-times larger learning
rate than KD's); ``'mean'`` (the default) averages them, so KD and DIH differ only in the cohort.
"""
from __future__ import annotations

from typing import Callable

import torch

from losses.base import MultiExitLoss
from losses.kd import kd_term
from losses.taps import Taps

COHORT_REDUCTIONS = ("mean", "sum")
COHORTS = ("final", "all")


class CohortDistillation(MultiExitLoss):
    """KD terms from every ``cohort`` member (``'all'``: heads and final exit; ``'final'``: classic KD)."""

    def __init__(self, taps: Callable[[], Taps], alpha: float = 0.1, temperature: float = 5.0,
                 cohort: str = "all", reduction: str = "mean"):
        super().__init__()
        if cohort not in COHORTS:
            raise ValueError(f"cohort must be one of {COHORTS}, got {cohort!r}")
        if reduction not in COHORT_REDUCTIONS:
            raise ValueError(f"reduction must be one of {COHORT_REDUCTIONS}, got {reduction!r}")
        self.taps, self.alpha, self.temperature = taps, alpha, temperature
        self.cohort, self.reduction = cohort, reduction

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        student = outputs[-1]
        teachers = self.taps().teacher_logits
        teachers = teachers if self.cohort == "all" else teachers[-1:]
        terms = [kd_term(student, t, targets, self.alpha, self.temperature) for t in teachers]
        total = sum(terms)
        return total / len(terms) if self.reduction == "mean" else total
