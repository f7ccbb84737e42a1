"""Learning-rate schedules as per-iteration multipliers (LambdaLR), so they checkpoint exactly."""
from __future__ import annotations

import math
from typing import Sequence

import torch

SCHEDULES = ("multistep", "cosine", "constant")


def lr_factor(
    epoch: float, epochs: int, schedule: str, milestones: Sequence[float] = (), gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> float:
    """Multiplier of the base lr at (fractional) ``epoch``.

    multistep: gamma ** (number of milestones <= epoch), milestones in epochs;
    cosine: 0.5 (1 + cos(pi epoch / epochs)), evaluated every iteration as in IMTA's code;
    an optional linear warmup multiplies either.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "multistep":
        factor = gamma ** sum(epoch >= m for m in milestones)
    elif schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / epochs))
    else:
        factor = 1.0
    if warmup_epochs > 0 and epoch < warmup_epochs:
        factor *= (epoch + 1e-8) / warmup_epochs
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, epochs: int, iters_per_epoch: int, schedule: str = "multistep",
    milestones: Sequence[float] = (), gamma: float = 0.1, warmup_epochs: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to be stepped after every optimisation step.

    A milestone below 1 is a fraction of ``epochs`` (IMTA's code drops the lr at 50 % and 75 % of training,
    whatever the number of epochs); 1 and above are epochs.
    """
    lr_factor(0, epochs, schedule)  # validate the name before training starts
    milestones = [m * epochs if 0 < m < 1 else m for m in milestones]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: lr_factor(it / iters_per_epoch, epochs, schedule, milestones, gamma, warmup_epochs),
    )
