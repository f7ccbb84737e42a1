"""Phuong & Lampert (ICCV 2019): distillation from the last exit into every earlier exit."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from experiments.engine.distributed import all_mean
from losses.base import EpochMeans, MultiExitLoss
from losses.kd import soft_cross_entropy

TEMPERATURE_MODES = ("adaptive", "const")


class PhuongDistillationLoss(MultiExitLoss):
    """L = g [(1-C) sum_{k<=K} CE(z_k, y) + C T^2 sum_{k<K} H(q^T, p_k^T)], q^T = softmax(stopgrad(z_K)/T).

    ``global_scale`` g defaults to 10/K (rescales to the magnitude of a 5-exit net, as released).
    Adaptive temperature: T starts at ``initial_temperature`` (1.0) and is multiplied by ``t_mult``
    (1.05) after every training batch whose teacher mean max-probability at the current T exceeds
    ``max_prob`` (0.5); it never decreases. T is a buffer, so it is checkpointed (the released code
    lost it on resume). ``temperature='const'`` keeps T fixed (the paper's ablation, T = 4).

    ``extra_metrics`` also reports ``ce``, the plain sum of per-exit cross-entropies averaged over the epoch's
    training images: L itself is scaled and mixed with the distillation term, so its curve says little.
    """

    def __init__(
        self,
        n_exits: int,
        c: float = 0.5,
        max_prob: float = 0.5,
        t_mult: float = 1.05,
        temperature: str = "adaptive",
        initial_temperature: float = 1.0,
        global_scale: float | None = None,
    ):
        super().__init__()
        if temperature not in TEMPERATURE_MODES:
            raise ValueError(f"temperature must be one of {TEMPERATURE_MODES}, got {temperature!r}")
        if n_exits < 2:
            raise ValueError("distillation needs at least two exits")
        self.n_exits = n_exits
        self.c = c
        self.max_prob = max_prob
        self.t_mult = t_mult
        self.adaptive = temperature == "adaptive"
        self.global_scale = 10.0 / n_exits if global_scale is None else global_scale
        self.register_buffer("temperature", torch.tensor(float(initial_temperature), dtype=torch.float64))
        self.epoch_means = EpochMeans("ce")

    def teacher_probs(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        return F.softmax(outputs[-1].detach().float() / float(self.temperature), dim=1)

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        if len(outputs) != self.n_exits:
            raise ValueError(f"loss built for {self.n_exits} exits, got {len(outputs)}")
        t = float(self.temperature)
        ce = sum(F.cross_entropy(z, targets) for z in outputs)
        if self.training:
            self.epoch_means.add(len(targets), ce=ce)
        q = self.teacher_probs(outputs)
        distill = sum(soft_cross_entropy(z.float(), q, t) for z in outputs[:-1])
        return self.global_scale * ((1 - self.c) * ce + self.c * t**2 * distill)

    @torch.no_grad()
    def after_batch(self, outputs: list[torch.Tensor]) -> None:
        # the global batch's statistic under torchrun, so the temperature stays the same on every rank
        if self.adaptive and all_mean(self.teacher_probs(outputs).max(dim=1).values.mean().detach()) > self.max_prob:
            self.temperature.mul_(self.t_mult)

    def extra_metrics(self) -> dict[str, float]:
        return {"temperature": float(self.temperature), **super().extra_metrics()}
