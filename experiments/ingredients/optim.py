"""The ``optim`` ingredient: SGD settings and the learning-rate schedule."""
from __future__ import annotations

from typing import Iterable

import torch
from sacred import Ingredient

from experiments.engine.schedules import SCHEDULES, build_scheduler
from experiments.ingredients import ingredient
from experiments.validation import boolean, choice, either, integer, list_of, number, scoped


def optim_config():
    lr = 0.1  # initial learning rate
    momentum = 0.9  # SGD momentum
    nesterov = True  # Nesterov momentum
    weight_decay = 1e-4  # L2 penalty on every trained parameter (BN and biases included)
    schedule = "multistep"  # multistep, cosine or constant (evaluated every iteration)
    milestones = [150, 225]  # multistep: epochs (or fractions of train.epochs, if < 1) at which lr *= gamma
    gamma = 0.1  # multistep decay factor
    warmup_epochs = 0  # linear warmup length in epochs
    locals()  # sacred reads these names; this line tells linters they are used


RULES = scoped("optim", dict(
    lr=number(min=0, min_open=True),
    momentum=number(min=0, max=1, max_open=True),
    nesterov=boolean,
    weight_decay=number(min=0),
    schedule=choice(*SCHEDULES),
    milestones=list_of(either(integer(min=1), number(min=0, max=1, min_open=True, max_open=True))),
    gamma=number(min=0, max=1, min_open=True),
    warmup_epochs=number(min=0),
))


# What every experiment's ``fast`` config trains with: a few steps at a moderate rate, cosine decay.
FAST = dict(lr=0.05, schedule="cosine")


def optim_ingredient(**defaults) -> Ingredient:
    """An ``optim`` ingredient whose defaults are the paper's."""
    return ingredient("optim", optim_config, defaults)


def build_optimizer(config: dict, params: Iterable[torch.nn.Parameter]) -> torch.optim.SGD:
    """SGD over the trainable ``params``; a parameter tagged ``p.lr_scale = s`` learns at s x lr (a parameter group
    per scale, in order of appearance, so a resumed optimiser's groups line up)."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            groups.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.SGD(
        [{"params": ps, "lr": config["lr"] * scale} for scale, ps in groups.items()], lr=config["lr"],
        momentum=config["momentum"], nesterov=config["nesterov"], weight_decay=config["weight_decay"],
    )


def build_lr_scheduler(config: dict, optimizer: torch.optim.Optimizer, epochs: int, iters_per_epoch: int):
    return build_scheduler(
        optimizer, epochs, iters_per_epoch, config["schedule"], config["milestones"], config["gamma"],
        config["warmup_epochs"],
    )
