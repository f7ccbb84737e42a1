"""EENet's learned exit scheduler and the budgeted baselines it is compared with, on cached probabilities.

Ilhan et al., "Learning to Early Exit for Adaptive Inference" (WACV 2024); the spec is
``papers/dih-eenet-jei.md`` sections 2.4-2.6 and 5 "EENet". Every policy reads per-exit softmax probabilities
[K, N, C] of a validation and a test split and a per-exit *cumulative* cost vector c [K] (any unit; budgets
are per-sample averages in the same unit). Everything is fitted on validation and evaluated on test:

* ``max_prob`` (MSDNet) and ``entropy`` (BranchyNet, 1 - H/log C): geometric exit priors pi_k ∝ q^k on the
  reference grid, thresholds by EENet's sequential routine; for a budget, the reference's first grid point
  whose prior cost sum_k pi_k c_k exceeds it (protocol "over") and the last one within it ("under");
* ``patience`` (PABEE, absent from the released code): the same over/under choice on validation cost;
* ``eenet``: the learned scheduler (protocol "fit").

:func:`evaluate_policies` runs them all. Conventions where the spec is silent or the reference is broken:

* a sample below every threshold (possible only with EENet's unbounded scores) exits at the last exit;
  ``SchedulerSettings(unrouted="reference")`` counts it wrong at zero cost as the released code does;
* ties at a threshold: every validation sample at or above T_k leaves the pool (the test-time rule); the
  reference removes exactly floor(pi_k N) in sort order, which differs only when that score is tied;
* "over" falls back to the last grid point when no point exceeds the budget (as the reference's loop
  does), "under" to the first when none is within it;
* PABEE's patience t: exit at the first exit k (1-based) with k > t whose prediction equals the previous t
  exits' (t = 0: exit 1); the operating points are t = 0..K-1, where t = K-1 is "never" (the last exit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from analysis.budgeted import apply_thresholds, exit_fractions, expected_cost, fit_thresholds

#: q = p/15 for p in linspace(1, 81, 80): the reference's grid of geometric exit priors pi_k ∝ q^k
GEOMETRIC_QS = np.linspace(1, 81, 80) / 15
#: T_k of an exit whose target count floor(pi_k N) is 0 (the reference's value; criteria reaching 1 still exit)
EMPTY_EXIT_THRESHOLD = 1.0
#: T_K, the reference's last-exit threshold (what happens below it is :func:`route`'s ``unrouted``)
LAST_EXIT_THRESHOLD = 0.0
POLICIES = ("eenet", "max_prob", "entropy", "patience")


# ------------------------------------------------------------------------------------------ criteria
def max_probability(probs: np.ndarray) -> np.ndarray:
    """MSDNet's criterion, the largest class probability: [K, N, C] -> [K, N]."""
    return np.asarray(probs, dtype=np.float64).max(axis=-1)


def normalised_neg_entropy(probs: np.ndarray) -> np.ndarray:
    """BranchyNet's criterion as EENet uses it, 1 - H(p)/log C in [0, 1]: [K, N, C] -> [K, N].

    xlogy makes p = 0 contribute 0 (the reference's log p gives NaN there).
    """
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    return (1.0 + torch.xlogy(p, p).sum(dim=-1) / math.log(p.shape[-1])).numpy()


CRITERIA: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_prob": max_probability,
    "entropy": normalised_neg_entropy,
}


# ------------------------------------------------------------------------------ thresholds and routing
def eenet_thresholds(val_scores: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """EENet's thresholds [K] from validation scores [K, N] and target exit fractions [K] (spec 2.4 step 4).

    :func:`analysis.budgeted.fit_thresholds` walks the same sequential quantiles (n_k = floor(pi_k N), the
    n_k-th largest score of the samples still in the pool); only EENet's sentinels differ: an exit with
    n_k = 0 gets T_k = 1 instead of +1e8 (so a score >= 1 still exits there, the reference's quirk), and the
    last exit reports T_K = 0 instead of -1e8.
    """
    thresholds = fit_thresholds(val_scores, fractions)
    n = np.shape(val_scores)[1]
    empty = np.floor(np.asarray(fractions, dtype=np.float64) * n) == 0
    thresholds[:-1][empty[:-1]] = EMPTY_EXIT_THRESHOLD
    thresholds[-1] = LAST_EXIT_THRESHOLD
    return thresholds


def route(scores: np.ndarray, thresholds: np.ndarray, unrouted: str = "last_exit") -> np.ndarray:
    """Exit index (0-based) per sample [N]: the first k with score_k >= T_k.

    A sample below every threshold (its last score < T_K, only possible for unbounded scores) exits at the
    last exit with ``unrouted="last_exit"``; with ``"reference"`` it gets index K, "no exit", which
    :func:`summarise` counts as wrong at zero cost, as the released code does.
    """
    exit_at = apply_thresholds(scores, thresholds)
    if unrouted == "last_exit":
        return exit_at
    if unrouted != "reference":
        raise ValueError(f"unrouted must be 'last_exit' or 'reference', got {unrouted!r}")
    last = len(thresholds) - 1
    missed = (exit_at == last) & (np.asarray(scores)[last] < thresholds[last])
    return np.where(missed, last + 1, exit_at)


def summarise(exit_at: np.ndarray, correct: np.ndarray, costs: np.ndarray) -> dict[str, float]:
    """Accuracy, expected cost (mean over samples of their exit's cost) and exit fractions of a routing.

    ``correct`` [K, N] says whether exit k is right on sample i; index K ("no exit") is wrong and costs 0.
    """
    correct = np.asarray(correct, dtype=bool)
    n_exits, n = correct.shape
    right = np.vstack([correct, np.zeros((1, n), dtype=bool)])[exit_at, np.arange(n)]
    fractions = np.bincount(exit_at, minlength=n_exits + 1) / n
    out = {"accuracy": float(right.mean()), "cost": expected_cost(exit_at, np.append(costs, 0.0))}
    out.update({f"frac_exit{k + 1}": float(f) for k, f in enumerate(fractions[:-1])})
    out["frac_none"] = float(fractions[-1])
    return out


# ------------------------------------------------------------------------------------------ baselines
def budget_points(planned: Sequence[float], budget: float) -> dict[str, int]:
    """Which operating points (in order of rising planned cost) a budget picks.

    "over": the reference's first point whose planned cost exceeds the budget (the last point if none
    does); "under": the last point whose planned cost is within it (the first point if none is).
    """
    planned = np.asarray(planned, dtype=np.float64)
    above = np.flatnonzero(planned > budget)
    within = np.flatnonzero(planned <= budget)
    return {
        "over": int(above[0]) if above.size else len(planned) - 1,
        "under": int(within[-1]) if within.size else 0,
    }


def confidence_policy(
    val_scores: np.ndarray,
    val_correct: np.ndarray,
    test_scores: np.ndarray,
    test_correct: np.ndarray,
    costs: np.ndarray,
    budget: float,
    qs: np.ndarray = GEOMETRIC_QS,
) -> list[dict]:
    """MSDNet/BranchyNet under a budget: geometric priors pi_k ∝ q^k, whose prior cost sum_k pi_k c_k
    picks the "over" and "under" points (spec 2.4 step 6); thresholds fit on validation, applied to test.
    """
    costs = np.asarray(costs, dtype=np.float64)
    priors = np.stack([exit_fractions(q, len(costs)) for q in qs])
    planned = priors @ costs
    rows = []
    for protocol, i in budget_points(planned, budget).items():
        thresholds = eenet_thresholds(val_scores, priors[i])
        row = {"protocol": protocol, "q": float(qs[i]), "planned_cost": float(planned[i]),
               "val_accuracy": summarise(route(val_scores, thresholds), val_correct, costs)["accuracy"],
               "fractions": priors[i], "thresholds": thresholds}
        rows.append({**row, **summarise(route(test_scores, thresholds), test_correct, costs)})
    return rows


def patience_exits(preds: np.ndarray, patience: int) -> np.ndarray:
    """PABEE's exit index (0-based) per sample [N] from per-exit predicted classes [K, N].

    A counter starts at 0 at exit 1, grows by one at each exit whose prediction equals the previous exit's
    and drops to 0 otherwise; the sample leaves where it first reaches ``patience`` (so patience 0 means
    exit 1, patience 1 the first exit agreeing with its predecessor), or at the last exit.
    """
    preds = np.asarray(preds)
    run = np.zeros(preds.shape, dtype=np.int64)
    for k in range(1, len(preds)):
        run[k] = np.where(preds[k] == preds[k - 1], run[k - 1] + 1, 0)
    done = run >= patience
    done[-1] = True
    return done.argmax(axis=0)


def patience_policy(
    val_preds: np.ndarray,
    val_correct: np.ndarray,
    test_preds: np.ndarray,
    test_correct: np.ndarray,
    costs: np.ndarray,
    budget: float,
) -> list[dict]:
    """PABEE under a budget: patience 0..K-1 (K-1 = never exit early) ordered by validation cost, the
    "over"/"under" points picked on that cost, evaluated on test.
    """
    patiences = range(len(costs))
    planned = [expected_cost(patience_exits(val_preds, t), costs) for t in patiences]
    rows = []
    for protocol, t in budget_points(planned, budget).items():
        row = {"protocol": protocol, "patience": t, "planned_cost": planned[t],
               "val_accuracy": summarise(patience_exits(val_preds, t), val_correct, costs)["accuracy"]}
        rows.append({**row, **summarise(patience_exits(test_preds, t), test_correct, costs)})
    return rows


# ------------------------------------------------------------------------------------- EENet scheduler
@dataclass(frozen=True)
class SchedulerSettings:
    """EENet scheduler hyper-parameters; defaults are the reference's CNN values (spec 2.5).

    ``zero_grad=False`` reproduces the released loop, which never zeroes gradients.
    ``prev_scores_at_test``: the released code feeds exit k the previous exits' clipped scores while fitting
    and their unclipped scores at test ("unclamped", faithful); "clamped" feeds clipped scores at test too.
    ``unrouted``: see :func:`route`. ``restarts`` trials use seeds ``seed``, ``seed + 1``, ...
    Observed on synthetic data (N = 5000, K = 3): with these defaults and ``zero_grad=True`` Adam's L2 weight
    decay outweighs the alpha-scaled assignment gradients and pibar stays near uniform after 1000 epochs;
    the released accumulating gradients (``zero_grad=False``) do move it towards the budget.
    """

    lr: float = 3e-5
    weight_decay: float = 1e-2
    epochs: int = 1000
    batch_size: int = 512
    period: int = 10
    alpha_ce: float = 1e-3
    alpha_cost: float = 1e-2
    beta: float = 1.0
    hidden_rate: float = 0.5  # 2 for BERT
    assignment: str = "softmax"  # or "sum"
    zero_grad: bool = True
    restarts: int = 10
    cost_tolerance: float = 0.1
    stop_cost_loss: float = 0.1
    stop_patience: int = 100
    prev_scores_at_test: str = "unclamped"  # or "clamped"
    unrouted: str = "last_exit"  # or "reference"
    seed: int = 0

    def __post_init__(self):
        choices = {"assignment": ("softmax", "sum"), "prev_scores_at_test": ("unclamped", "clamped"),
                   "unrouted": ("last_exit", "reference")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "period", "restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def scheduler_features(probs: np.ndarray) -> torch.Tensor:
    """x_ik = [p_ik, max p_ik, 1 - H(p_ik)/log C], float32 [K, N, C + 2]."""
    p = np.asarray(probs, dtype=np.float64)
    extra = np.stack([max_probability(p), normalised_neg_entropy(p)], axis=-1)
    return torch.from_numpy(np.concatenate([p, extra], axis=-1)).float()


def assignment_distribution(rho: torch.Tensor, assignment: str) -> torch.Tensor:
    """pi [K, N] from assignment outputs rho in (0, 1) [K, N], normalised over exits.

    "softmax" is the released rule; over sigmoid outputs it cannot exceed e/(e+K-1) (0.576 for K = 3, below
    the shipped ResNet pickle's 0.882, spec 2.6). "sum" (rho / sum_j rho_j) can reach any distribution.
    """
    if assignment == "softmax":
        return torch.softmax(rho, dim=0)
    if assignment == "sum":
        return rho / rho.sum(dim=0, keepdim=True)
    raise ValueError(f"assignment must be 'softmax' or 'sum', got {assignment!r}")


def _max_prob_start(size: int) -> nn.Parameter:
    """Weights on [max p, neg-entropy, previous scores] starting as "score = max p"."""
    weight = torch.zeros(size)
    weight[0] = 1.0
    return nn.Parameter(weight)


def _assignment_mlp(in_dim: int, hidden_rate: float) -> nn.Sequential:
    hidden = int(in_dim * hidden_rate)
    if hidden < 1:
        raise ValueError(f"hidden width floor({in_dim} * {hidden_rate}) is 0; raise hidden_rate")
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Sigmoid(), nn.Linear(hidden, 1), nn.Sigmoid())


class ExitScheduler(nn.Module):
    """EENet's per-exit score and assignment branches (spec 2.5).

    Score: s~_ik = u_k . p_ik + v_k . [max p, neg-entropy, s_i1..s_i(k-1)], bias-free with 1-D weights, as the
    shipped pickles have them (the released 2-D layer broadcasts to N x N and crashes). u_k starts at 0 and
    v_k at (1, 0, ..): every score starts as the max-probability, which is what the pickles' learnt values
    (max-prob coefficient 0.74-1.16, the rest within +-0.2) suggest; the authors' initialisation is unknown.
    Assignment: rho_ik = sigmoid(w_k . sigmoid(W_k z_ik + b_k) + c_k), z_ik = [x_ik, previous scores].
    """

    def __init__(self, n_exits: int, n_classes: int, hidden_rate: float):
        super().__init__()
        self.n_classes = n_classes
        self.u = nn.ParameterList(nn.Parameter(torch.zeros(n_classes)) for _ in range(n_exits))
        self.v = nn.ParameterList(_max_prob_start(2 + k) for k in range(n_exits))
        self.assign = nn.ModuleList(_assignment_mlp(n_classes + 2 + k, hidden_rate) for k in range(n_exits))

    def forward(self, x: torch.Tensor, clamp_prev: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw scores s~ [K, N] and assignment outputs rho [K, N] from features x [K, N, C + 2].

        Exit k sees the detached scores of the exits before it, clipped to [0, 1] if ``clamp_prev``.
        """
        scores, rhos, fed = [], [], []
        for k, (u, v, mlp) in enumerate(zip(self.u, self.v, self.assign)):
            z = torch.cat([x[k]] + [s[:, None] for s in fed], dim=1)
            score = z[:, :self.n_classes] @ u + z[:, self.n_classes:] @ v
            scores.append(score)
            rhos.append(mlp(z).squeeze(-1))
            fed.append((score.clamp(0, 1) if clamp_prev else score).detach())
        return torch.stack(scores), torch.stack(rhos)


def scheduler_losses(
    scores: torch.Tensor,
    pi: torch.Tensor,
    correct: torch.Tensor,
    costs: torch.Tensor,
    budget: float,
    beta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EENet's loss terms (L_bce, L_kl, L_cost) on a batch; scores s (clipped to [0, 1]), pi (sums to 1 over
    exits) and correct a (0/1) are [K, N], costs [K]:

    * L_bce = (1/K) sum_k sum_i w_ik BCE(s_ik, a_ik), w_ik = sg(pi_ik) / sum_i' sg(pi_i'k);
    * L_kl = KLDiv(log pi, t) with PyTorch's elementwise mean over N*K, t_ik = sg(s_ik)^beta / sum_j sg(s_ij)^beta;
    * L_cost = |mean_i sum_k pi_ik c_k - B| / B.

    BCE clamps log at -100 (PyTorch); a sample whose scores are all 0 gets t = 0 instead of NaN.
    """
    weight = pi.detach() / pi.detach().sum(dim=1, keepdim=True)
    bce = (weight * F.binary_cross_entropy(scores, correct, reduction="none")).sum(dim=1).mean()
    target = scores.detach() ** beta
    target = target / target.sum(dim=0, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)
    kl = (torch.xlogy(target, target) - target * pi.log()).mean()  # F.kl_div's 'mean', without its warning
    cost = ((pi * costs[:, None]).sum(dim=0).mean() - budget).abs() / budget
    return bce, kl, cost


@dataclass
class SchedulerFit:
    """One fitted trial: pibar = mean validation assignment, thresholds on the unclipped validation scores,
    planned_cost = sum_k pibar_k c_k (the training-time cost the restarts are screened by)."""

    model: ExitScheduler
    pibar: np.ndarray
    thresholds: np.ndarray
    planned_cost: float
    val_accuracy: float
    epochs: int


def scheduler_scores(model: ExitScheduler, probs: np.ndarray, settings: SchedulerSettings) -> np.ndarray:
    """Test-time scores s~ [K, N]: unclipped, each exit fed the previous exits' scores as
    ``settings.prev_scores_at_test`` says."""
    with torch.no_grad():
        scores, _ = model(scheduler_features(probs), clamp_prev=settings.prev_scores_at_test == "clamped")
    return scores.double().numpy()


def _fit_step(model, optimiser, x, correct, costs, budget, settings, score_phase: bool) -> torch.Tensor:
    raw, rho = model(x, clamp_prev=True)
    pi = assignment_distribution(rho, settings.assignment)
    bce, kl, cost = scheduler_losses(raw.clamp(0, 1), pi, correct, costs, budget, settings.beta)
    loss = bce if score_phase else settings.alpha_ce * kl + settings.alpha_cost * cost
    if settings.zero_grad:
        optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return torch.stack([bce, kl, cost]).detach()


def _train(x, correct, costs, budget, settings: SchedulerSettings, seed: int) -> tuple[ExitScheduler, int]:
    """Alternating fit (even blocks of ``period`` epochs: L_bce; odd: alpha_ce L_kl + alpha_cost L_cost).

    Early stop as released: once an epoch's mean cost loss is below ``stop_cost_loss``, such epochs are
    compared by total loss L_bce + alpha_ce L_kl + alpha_cost L_cost (the released code compares the loss
    of the current phase), and ``stop_patience`` of them without a new minimum stop the fit. The final
    state is kept: the released "best model" is a reference to the live one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ExitScheduler(x.shape[0], x.shape[2] - 2, settings.hidden_rate)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    batches = torch.from_numpy(np.random.default_rng(seed).permutation(x.shape[1])).split(settings.batch_size)
    best, stale = math.inf, 0
    for epoch in range(settings.epochs):
        score_phase = (epoch // settings.period) % 2 == 0
        terms = torch.stack([_fit_step(model, optimiser, x[:, b], correct[:, b], costs, budget, settings,
                                       score_phase) for b in batches]).mean(dim=0)
        bce, kl, cost = terms.tolist()
        if cost < settings.stop_cost_loss:
            total = bce + settings.alpha_ce * kl + settings.alpha_cost * cost
            best, stale = (total, 0) if total < best else (best, stale + 1)
            if stale >= settings.stop_patience:
                return model, epoch + 1
    return model, settings.epochs


def calibrate_scheduler(model: ExitScheduler, val_probs: np.ndarray, settings: SchedulerSettings
                        ) -> tuple[np.ndarray, np.ndarray]:
    """pibar [K] and thresholds [K] as released: both from the fitting-time forward on validation (previous
    scores clipped), the thresholds on its unclipped scores with target fractions pibar."""
    with torch.no_grad():
        raw, rho = model(scheduler_features(val_probs), clamp_prev=True)
        pibar = assignment_distribution(rho, settings.assignment).mean(dim=1).double().numpy()
    return pibar, eenet_thresholds(raw.double().numpy(), pibar)


def fit_scheduler(
    val_probs: np.ndarray,
    val_targets: np.ndarray,
    costs: np.ndarray,
    budget: float,
    settings: SchedulerSettings = SchedulerSettings(),
    seed: int = 0,
) -> SchedulerFit:
    """One EENet trial on validation: fit, calibrate, and validation accuracy through the test-time path."""
    correct = np.asarray(val_probs).argmax(-1) == np.asarray(val_targets)[None]
    costs = np.asarray(costs, dtype=np.float64)
    model, epochs = _train(scheduler_features(val_probs), torch.from_numpy(correct).float(),
                           torch.from_numpy(costs).float(), budget, settings, seed)
    pibar, thresholds = calibrate_scheduler(model, val_probs, settings)
    val_exit = route(scheduler_scores(model, val_probs, settings), thresholds, settings.unrouted)
    return SchedulerFit(model, pibar, thresholds, float(pibar @ costs),
                        summarise(val_exit, correct, costs)["accuracy"], epochs)


def choose_trial(fits: Sequence[SchedulerFit], budget: float, tolerance: float) -> int:
    """The reference's pick: best validation accuracy among trials whose planned cost is within
    ``tolerance`` (relative) of the budget; the last trial if none is."""
    ok = [i for i, fit in enumerate(fits) if abs(fit.planned_cost - budget) / budget < tolerance]
    return max(ok, key=lambda i: fits[i].val_accuracy) if ok else len(fits) - 1


def eenet_policy(
    val_probs: np.ndarray,
    val_targets: np.ndarray,
    test_probs: np.ndarray,
    test_targets: np.ndarray,
    costs: np.ndarray,
    budget: float,
    settings: SchedulerSettings = SchedulerSettings(),
) -> dict:
    """EENet for one budget: ``settings.restarts`` trials, the chosen one evaluated on test."""
    fits = [fit_scheduler(val_probs, val_targets, costs, budget, settings, settings.seed + r)
            for r in range(settings.restarts)]
    trial = choose_trial(fits, budget, settings.cost_tolerance)
    fit = fits[trial]
    exit_at = route(scheduler_scores(fit.model, test_probs, settings), fit.thresholds, settings.unrouted)
    test_correct = np.asarray(test_probs).argmax(-1) == np.asarray(test_targets)[None]
    row = {"protocol": "fit", "trial": trial, "planned_cost": fit.planned_cost, "val_accuracy": fit.val_accuracy,
           "fractions": fit.pibar, "thresholds": fit.thresholds}
    return {**row, **summarise(exit_at, test_correct, costs)}


# ------------------------------------------------------------------------------------------ entry point
def _check_inputs(val_probs, val_targets, test_probs, test_targets, costs) -> None:
    vp, vt, tp, tt = (np.shape(a) for a in (val_probs, val_targets, test_probs, test_targets))
    if not (len(vp) == len(tp) == 3 and vp[0] == tp[0] and vp[2] == tp[2] >= 2 and vt == vp[1:2] and tt == tp[1:2]):
        raise ValueError(f"expected probs [K, N, C>=2] and targets [N] with equal K and C; got val {vp} / {vt}, "
                         f"test {tp} / {tt}")
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (vp[0],) or not (costs > 0).all() or (np.diff(costs) < 0).any():
        raise ValueError(f"costs must be {vp[0]} positive, non-decreasing cumulative per-exit costs, got {costs}")


def check_budgets(costs: np.ndarray, budgets: Sequence[float]) -> np.ndarray:
    """Budgets as floats; each must lie in [c_1, c_K] (no policy can spend less or more on average)."""
    costs = np.asarray(costs, dtype=np.float64)
    budgets = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    for b in budgets:
        if not costs[0] <= b <= costs[-1]:
            raise ValueError(f"budget {b:g} is outside the valid range [{costs[0]:g}, {costs[-1]:g}] "
                             f"(exit 1's cost to the full network's cost, in the unit of costs)")
    return budgets


def _as_text(values) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def evaluate_policies(
    val_probs: np.ndarray,
    val_targets: np.ndarray,
    test_probs: np.ndarray,
    test_targets: np.ndarray,
    costs: np.ndarray,
    budgets: Sequence[float],
    settings: SchedulerSettings = SchedulerSettings(),
    policies: Sequence[str] = POLICIES,
) -> pd.DataFrame:
    """Every policy at every budget: one row per (policy, budget, protocol), fitted on validation, on test.

    Columns: policy, budget, protocol ("over"/"under" for the baselines, "fit" for EENet), accuracy
    (fraction), cost (mean cost of the test samples' exits), frac_exit1..K and frac_none (test), planned_cost
    (prior cost for max_prob/entropy, validation cost for patience, sum_k pibar_k c_k for EENet),
    val_accuracy, q, patience, trial (EENet's chosen restart), fractions (prior or pibar) and thresholds
    as text. Inputs and budgets are checked before anything is fitted.
    """
    _check_inputs(val_probs, val_targets, test_probs, test_targets, costs)
    costs = np.asarray(costs, dtype=np.float64)
    budgets = check_budgets(costs, budgets)
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown policies {sorted(unknown)}; known: {POLICIES}")
    val_preds, test_preds = np.asarray(val_probs).argmax(-1), np.asarray(test_probs).argmax(-1)
    val_correct = val_preds == np.asarray(val_targets)[None]
    test_correct = test_preds == np.asarray(test_targets)[None]
    scores = {name: (CRITERIA[name](val_probs), CRITERIA[name](test_probs)) for name in CRITERIA if name in policies}
    rows = []
    for budget in budgets:
        for policy in policies:
            if policy in scores:
                val_s, test_s = scores[policy]
                out = confidence_policy(val_s, val_correct, test_s, test_correct, costs, budget)
            elif policy == "patience":
                out = patience_policy(val_preds, val_correct, test_preds, test_correct, costs, budget)
            else:
                out = [eenet_policy(val_probs, val_targets, test_probs, test_targets, costs, budget, settings)]
            rows += [{"policy": policy, "budget": float(budget), **row} for row in out]
    fracs = [f"frac_exit{k + 1}" for k in range(len(costs))]
    columns = ["policy", "budget", "protocol", "accuracy", "cost", *fracs, "frac_none", "planned_cost",
               "val_accuracy", "q", "patience", "trial", "fractions", "thresholds"]
    table = pd.DataFrame(rows, columns=columns)
    for col in ("fractions", "thresholds"):
        table[col] = table[col].map(lambda v: _as_text(v) if isinstance(v, np.ndarray) else "")
    return table.astype({"patience": "Int64", "trial": "Int64"})
