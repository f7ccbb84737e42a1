"""JEI-DNN's losses: the warm-up of the new exits, the exits' loss and the gates' loss (spec section 3.4-3.5).

Pure functions of exit logits and gate logits, so each is checked by hand in the tests; ``JEIObjective``
schedules them over training: the warm-up, then phases that alternate between the gates and the exits.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from losses.base import MultiExitLoss
from models.jei import GatedExits, exit_probabilities

WEIGHTINGS = ("cancelling", "detached")
GATE_OBJECTIVES = ("ce", "zero_one", "prob")
POS_COUNTS = ("exact", "cumulative")


def warmup_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """CE(final) + sum_b (G + 1 - b) CE(exit b): early exits weigh most (7, 6, ..., 2 for G = 6); the final exit is
    frozen, so its term only adds to the value."""
    g = len(logits) - 1
    return F.cross_entropy(logits[-1], targets) + sum(
        (g + 1 - b) * F.cross_entropy(z, targets) for b, z in enumerate(logits[:-1]))


def exit_loss(logits: list[torch.Tensor], gate_logits: torch.Tensor, targets: torch.Tensor,
              weighting: str = "cancelling") -> torch.Tensor:
    """The new exits' loss in the joint phase (the final exit is frozen and left out).

    ``cancelling`` is what the released "weighted" loss computes: it scales P_ib * L_ib by a per-sample ratio
    sum_b L_ib / sum_b P_ib L_ib that is not detached, which cancels the exit probabilities exactly, in value and
    gradient, leaving the plain mean CE over samples and exits. ``detached`` detaches that ratio: the paper's
    intent, exit-probability-weighted CE with the per-sample scale kept (a named deviation from the release).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    losses = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in logits[:-1]], dim=1)  # [N, G]
    if weighting == "cancelling":
        return losses.mean()
    weighted = exit_probabilities(torch.sigmoid(gate_logits.detach())) * losses
    ratio = losses.sum(dim=1, keepdim=True) / weighted.sum(dim=1, keepdim=True)
    return (weighted * ratio.detach()).mean()


def exit_losses(logits: list[torch.Tensor], targets: torch.Tensor, objective: str = "ce") -> torch.Tensor:
    """[N, G + 1]: each exit's prediction loss for the gate targets: CE, or -1[correct] (``zero_one``), or
    -p_max 1[correct] (``prob``)."""
    if objective not in GATE_OBJECTIVES:
        raise ValueError(f"objective must be one of {GATE_OBJECTIVES}, got {objective!r}")
    columns = []
    for z in logits:
        z = z.detach().float()
        if objective == "ce":
            columns.append(F.cross_entropy(z, targets, reduction="none"))
            continue
        correct = (z.argmax(dim=1) == targets).float()
        columns.append(-correct if objective == "zero_one" else -correct * z.softmax(dim=1).amax(dim=1))
    return torch.stack(columns, dim=1)


def optimal_exits(logits: list[torch.Tensor], targets: torch.Tensor, costs: torch.Tensor, tradeoff: float,
                  objective: str = "ce") -> torch.Tensor:
    """l*_i = argmin_l loss_il + lambda C_l over every exit (C_final = 1); ties go to the earliest exit."""
    return torch.argmin(exit_losses(logits, targets, objective) + tradeoff * costs.to(targets.device), dim=1)


def gate_targets(optimal: torch.Tensor, num_gates: int) -> torch.Tensor:
    """u_ib = 1[b >= l*_i] for b < G: "exit at or after the optimal exit" (l* = G: every gate 0)."""
    return (torch.arange(num_gates, device=optimal.device) >= optimal[:, None]).float()


def gate_loss(gate_logits: torch.Tensor, targets: torch.Tensor, pos_weights: torch.Tensor) -> torch.Tensor:
    """Mean over the N x G entries of BCE-with-logits, positives weighted by their gate's ``pos_weights``."""
    weights = torch.where(targets > 0, pos_weights.to(targets), torch.ones_like(targets))
    bce = F.binary_cross_entropy_with_logits(gate_logits.float(), targets, reduction="none")
    return (bce * weights).mean()


def positive_weights(optimal: torch.Tensor, num_gates: int, cap: float = 5.0, counts: str = "exact") -> torch.Tensor:
    """omega_b = min((n - c_b) / max(c_b, 0.1), cap) from the optimal exits of n samples.

    ``exact``: c_b = samples whose optimal exit is exactly b (the release, although gate b's positives are
    cumulative, every l* <= b: later gates get positives weighted up to ``cap`` while they are already the
    majority, and exit too early). ``cumulative``: c_b = samples with l* <= b, gate b's own positives, so
    omega_b = negatives / positives (a named deviation).
    """
    if counts not in POS_COUNTS:
        raise ValueError(f"counts must be one of {POS_COUNTS}, got {counts!r}")
    exact = torch.bincount(optimal.flatten().cpu(), minlength=num_gates + 1)[:num_gates].double()
    c = exact if counts == "exact" else torch.cumsum(exact, dim=0)
    n = optimal.numel()
    return torch.clamp((n - c) / torch.clamp(c, min=0.1), max=cap).float()


class JEIObjective(MultiExitLoss):
    """JEI-DNN's training schedule as one objective (spec 3.4-3.5), its state in buffers so a resume is exact.

    Warm-up (at most ``max_warmup_epochs``): ``warmup_loss``; after each epoch a new exit whose validation accuracy
    did not improve for ``patience`` epochs gets its best weights back and freezes; the warm-up ends when all are
    frozen or at its last epoch (unfrozen exits get their best weights back), and every exit trains again. Joint
    epochs: blocks of ``period`` batches alternate, the gates' block first in every epoch; positive weights come
    from the previous joint epoch's validation pass. ``costs`` are the normalised exit costs of the gate targets.

    Holds the network by reference (``GatedExits``: its gates and new exits), not as a submodule.
    """

    def __init__(self, net: GatedExits, costs: Sequence[float], tradeoff: float, max_warmup_epochs: int = 6,
                 patience: int = 2, period: int = 200, weighting: str = "cancelling", gate_objective: str = "ce",
                 pos_weight_cap: float = 5.0, pos_weight_counts: str = "exact"):
        super().__init__()
        if len(costs) != net.num_exits or not math.isclose(costs[-1], 1.0):
            raise ValueError(f"costs must hold {net.num_exits} normalised exit costs ending in 1, got {list(costs)}")
        if weighting not in WEIGHTINGS or gate_objective not in GATE_OBJECTIVES or pos_weight_counts not in POS_COUNTS:
            raise ValueError(f"weighting in {WEIGHTINGS}, gate_objective in {GATE_OBJECTIVES} and pos_weight_counts "
                             f"in {POS_COUNTS}, got {weighting!r}, {gate_objective!r}, {pos_weight_counts!r}")
        self._net = [net]
        self.tradeoff, self.max_warmup_epochs, self.patience, self.period = tradeoff, max_warmup_epochs, patience, period
        self.weighting, self.gate_objective, self.pos_weight_cap = weighting, gate_objective, pos_weight_cap
        self.pos_weight_counts = pos_weight_counts
        g = net.num_exits - 1
        self.register_buffer("costs", torch.tensor(costs, dtype=torch.float32))
        self.register_buffer("pos_weights", torch.ones(g))
        self.register_buffer("best_acc", torch.zeros(g))
        self.register_buffer("waiting", torch.zeros(g, dtype=torch.long))
        self.register_buffer("frozen", torch.zeros(g, dtype=torch.bool))
        self.register_buffer("warmup_epochs", torch.tensor(-1))  # -1 while warming up, then how many it took
        self.register_buffer("joint_epochs", torch.tensor(0))  # joint epochs completed: the cosine's step
        self.register_buffer("epoch", torch.tensor(-1))
        self.register_buffer("batch", torch.tensor(0))  # batches done in this epoch: the phase, exact on resume
        for k, head in enumerate(net.heads):
            for name, p in head.classifier.named_parameters():
                self.register_buffer(f"best_exit{k}_{name}", p.detach().clone())
        self._val_optimal: torch.Tensor | None = None

    @property
    def net(self) -> GatedExits:
        return self._net[0]

    @property
    def warming_up(self) -> bool:
        return int(self.warmup_epochs) < 0

    def gate_phase(self) -> bool:
        """Blocks of ``period`` batches alternate, gates first in every joint epoch."""
        return (int(self.batch) // self.period) % 2 == 0

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        if epoch != int(self.epoch):  # not a resume within the epoch
            self.epoch.fill_(epoch)
            self.batch.zero_()
        for frozen, head in zip(self.frozen.tolist(), self.net.heads):
            head.classifier.requires_grad_(not (self.warming_up and frozen))

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        if self.warming_up:
            return warmup_loss(outputs, targets)
        if self.gate_phase():
            optimal = optimal_exits(outputs, targets, self.costs, self.tradeoff, self.gate_objective)
            return gate_loss(self.net.gate_logits(outputs[:-1]), gate_targets(optimal, len(outputs) - 1),
                             self.pos_weights)
        with torch.no_grad():
            gates = self.net.gate_logits(outputs[:-1])
        return exit_loss(outputs, gates, targets, self.weighting)

    def after_batch(self, outputs: list[torch.Tensor]) -> None:
        self.batch += 1

    @torch.no_grad()
    def evaluation_metrics(self, logits: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict[str, float]:
        """Gated accuracy and normalised cost on a split; validation's optimal exits feed the positive weights."""
        device = self.costs.device
        exits = [z.to(device) for z in logits]
        y = targets.to(device)
        taken = self.net.exits_taken(exits[:-1])
        chosen = torch.stack(exits)[taken, torch.arange(len(y), device=device)]
        if prefix == "val":
            self._val_optimal = optimal_exits(exits, y, self.costs, self.tradeoff, self.gate_objective)
        metrics = {f"{prefix}.gated.acc": (chosen.argmax(1) == y).float().mean().item(),
                   f"{prefix}.gated.cost": self.costs[taken].mean().item()}
        fractions = torch.bincount(taken, minlength=len(exits)).float() / len(y)
        metrics.update({f"{prefix}.gated.exit{k + 1}": f.item() for k, f in enumerate(fractions)})
        return metrics

    def end_epoch(self, metrics: dict[str, float]) -> None:
        """After validation: the warm-up's per-exit early stopping, or the joint epoch's positive weights."""
        metrics["train.warmup"] = float(self.warming_up)
        if self.warming_up:
            self._warmup_step([metrics[f"val.acc.exit{k + 1}"] for k in range(len(self.net.heads))])
            return
        self.joint_epochs += 1
        if self._val_optimal is not None:
            self.pos_weights.copy_(positive_weights(self._val_optimal, len(self.net.heads), self.pos_weight_cap,
                                                    self.pos_weight_counts))

    def _warmup_step(self, accuracies: list[float]) -> None:
        for k, acc in enumerate(accuracies):
            if self.frozen[k]:
                continue
            if acc > self.best_acc[k]:
                self.best_acc[k], self.waiting[k] = acc, 0
                self._keep_best(k)
            else:
                self.waiting[k] += 1
                if self.waiting[k] >= self.patience:
                    self._restore_best(k)
                    self.frozen[k] = True
        done = int(self.epoch) + 1
        if bool(self.frozen.all()) or done >= self.max_warmup_epochs:
            for k in torch.nonzero(~self.frozen).flatten().tolist():
                self._restore_best(k)
            self.warmup_epochs.fill_(done)

    def _keep_best(self, k: int) -> None:
        for name, p in self.net.heads[k].classifier.named_parameters():
            getattr(self, f"best_exit{k}_{name}").copy_(p.detach())

    def _restore_best(self, k: int) -> None:
        with torch.no_grad():
            for name, p in self.net.heads[k].classifier.named_parameters():
                p.copy_(getattr(self, f"best_exit{k}_{name}"))

    def selection_score(self, metrics: dict[str, float]) -> float:
        """Validation gated accuracy of joint epochs (a warm-up epoch is never selected)."""
        return -math.inf if metrics.get("train.warmup") else metrics.get("val.gated.acc", -math.inf)

    def lr_factor(self, base_lr: float, eta_min: float, t_max: int) -> float:
        """The released cosine (T_max = all epochs, down to ``eta_min``), stepped once per joint epoch only."""
        step = int(self.joint_epochs)
        return (eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * step / t_max)) / 2) / base_lr
