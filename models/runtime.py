"""Executed early exit: run a multi-exit network stage by stage and stop computing samples once they exit.

Research code *simulates* early exit (every exit of every sample is computed, then one is picked:
:mod:`analysis.budgeted`, :mod:`analysis.eenet`). :func:`run_early_exit` *executes* it through the contract of
:mod:`models.multiexit`: after stage k an :class:`ExitPolicy` says which of the samples still running leave at
exit k; those are recorded and dropped from the network's state (``select_state``) and from the policy's own
per-sample state, so no later stage computes them. The last exit takes everyone left.

Host synchronisation: one per deciding stage (the number of samples leaving, read off the policy's mask);
the indices of leaving and staying samples come from a stable sort on the device. Decisions run outside
autocast, in float64 for confidences, so ``amp="bf16"`` changes the logits but not how they are judged.

Each policy also has ``simulate(logits [K, N, C]) -> exit index [N]``, the simulated counterpart built on the
analysis functions; :func:`simulate_policy` runs it on every exit of every sample, for equality checks. The
runtime judges logits on their device with torch twins of the analysis scores: :data:`CONFIDENCES` (equal to
analysis.budgeted's numpy ones to float64 rounding; fitting and simulation read these twins too, so all three
agree exactly) and :func:`scheduler_inputs` (equal to analysis.eenet.scheduler_features). Logits themselves
may differ in the last float32 bit between batch sizes (convolution algorithms depend on it), so a sample
whose score is within rounding of a threshold can leave one exit apart; with thresholds fitted on other data
this has probability ~0.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from analysis.budgeted import DEFAULT_PS, apply_thresholds, budgeted_points, exit_confidences, exit_fractions, \
    fit_thresholds
from analysis.eenet import ExitScheduler, SchedulerFit, SchedulerSettings, budget_points, route, scheduler_scores
from analysis.exit_record import ExitRecord
from models.cost import count_exit_costs
from models.jei import exit_step, gated_exits, uncertainty_features
from models.multiexit import MultiExitNetwork, State, select_state

PolicyState = Any
AMP_DTYPES = {"bf16": torch.bfloat16}
#: graphs the one compiled stage function may hold: stages x batch-size regimes (1, small, large) x networks
RECOMPILE_LIMIT = 64


# ------------------------------------------------------------------------------------------------ confidences
def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Largest softmax probability [n] of logits [n, C], in float64 on their device (analysis.budgeted.max_prob)."""
    z = logits.double()
    z = z - z.amax(dim=-1, keepdim=True)
    return 1.0 / z.exp().sum(dim=-1)


def neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Negative softmax entropy (nats) [n] of logits [n, C], float64 (analysis.budgeted.neg_entropy)."""
    logp = logits.double().log_softmax(dim=-1)
    return (logp.exp() * logp).sum(dim=-1)


CONFIDENCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"max_prob": max_prob, "entropy": neg_entropy}


def _confidence(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in CONFIDENCES:
        raise ValueError(f"unknown confidence {name!r}; known: {sorted(CONFIDENCES)}")
    return CONFIDENCES[name]


def _on_numpy(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    """A torch confidence as analysis.budgeted's callables take it, so fitting and simulation read the runtime's
    own values."""
    return lambda logits: fn(torch.from_numpy(np.asarray(logits))).numpy()


def scheduler_inputs(logits: torch.Tensor) -> torch.Tensor:
    """EENet's scheduler features [n, C + 2] of one exit, on the logits' device: analysis.eenet.scheduler_features
    of the float64 softmax (what experiments/eenet.py feeds it), cast to float32 like it."""
    p = logits.double().softmax(dim=-1)
    entropy = 1.0 + torch.xlogy(p, p).sum(dim=-1) / math.log(p.shape[-1])
    return torch.cat([p, p.amax(dim=-1, keepdim=True), entropy[:, None]], dim=1).float()


# --------------------------------------------------------------------------------------------------- policies
class ExitPolicy(Protocol):
    """What the runtime asks after each exit but the last (which takes everyone left).

    ``start`` makes the per-sample policy state for a batch (a pytree of tensors with the samples on dim 0, or
    None); ``decide`` gets exit k's logits of the samples still running and their state and returns a bool mask
    "leaves here" [n] on the logits' device and the updated state, which the runtime then cuts to the samples
    that stay. ``simulate`` is the simulated counterpart: exit indices [N] from every exit's logits [K, N, C].
    """

    def start(self, batch: int, device: torch.device, num_exits: int) -> PolicyState: ...

    def decide(self, k: int, logits: torch.Tensor, state: PolicyState) -> tuple[torch.Tensor, PolicyState]: ...

    def simulate(self, logits: np.ndarray) -> np.ndarray: ...


def _check_exits(policy: str, expected: int, num_exits: int) -> None:
    if expected != num_exits:
        raise ValueError(f"{policy} is for {expected} exits but the network has {num_exits}")


class ThresholdPolicy:
    """analysis.budgeted's rule: leave at the first exit k whose confidence is >= T_k; the last exit takes the rest.

    ``confidence`` names an entry of :data:`CONFIDENCES` (the names of analysis.budgeted.CONFIDENCES).
    """

    def __init__(self, thresholds: Sequence[float], confidence: str = "max_prob"):
        self.score = _confidence(confidence)
        self.thresholds = tuple(float(t) for t in np.asarray(thresholds, dtype=np.float64).reshape(-1))
        self.confidence = confidence

    @classmethod
    def from_record(cls, record: ExitRecord, *, fractions: Sequence[float] | None = None,
                    budget: float | None = None, confidence: str = "max_prob",
                    ps: np.ndarray = DEFAULT_PS) -> "ThresholdPolicy":
        """Thresholds fitted on the record's validation logits (analysis.budgeted.fit_thresholds), for target exit
        ``fractions`` [K] or an average ``budget`` in the record's MACs.

        For a budget, every prior pi_k ∝ p^k of the grid ``ps`` is fitted and costed on validation
        (analysis.budgeted.budgeted_points with validation as the evaluated split) and the last grid point whose
        expected validation cost is within the budget is kept (analysis.eenet.budget_points' "under"); a budget
        below every point's cost raises rather than overspend.
        """
        if (fractions is None) == (budget is None):
            raise ValueError("give exactly one of fractions and budget")
        val_conf = exit_confidences(record.val_logits, _on_numpy(_confidence(confidence)))
        if budget is not None:
            fractions = _budget_fractions(val_conf, record, budget, np.asarray(ps, dtype=np.float64))
        return cls(fit_thresholds(val_conf, np.asarray(fractions, dtype=np.float64)), confidence)

    def start(self, batch: int, device: torch.device, num_exits: int) -> None:
        _check_exits("ThresholdPolicy", len(self.thresholds), num_exits)

    def decide(self, k: int, logits: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        return self.score(logits) >= self.thresholds[k], state

    def simulate(self, logits: np.ndarray) -> np.ndarray:
        conf = exit_confidences(logits, _on_numpy(self.score))
        return apply_thresholds(conf, np.asarray(self.thresholds))


def _budget_fractions(val_conf: np.ndarray, record: ExitRecord, budget: float, ps: np.ndarray) -> np.ndarray:
    """Exit prior of the last grid point whose expected validation cost is within ``budget``."""
    val_correct = record.val_logits.argmax(-1) == record.val_targets[None]
    curve = budgeted_points(val_conf, val_conf, val_correct, record.macs, ps)
    costs = curve["cost_macs"].to_numpy()
    i = budget_points(costs, budget)["under"]
    if costs[i] > budget:
        raise ValueError(f"budget {budget:g} is below every operating point's validation cost "
                         f"(cheapest: {costs.min():g})")
    return exit_fractions(ps[i], record.num_exits)


class FixedExitPolicy:
    """Every sample leaves at exit ``k`` (0-based): a static truncated network; stages after k never run."""

    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"exit index must be >= 0, got {k}")
        self.k = k

    def start(self, batch: int, device: torch.device, num_exits: int) -> None:
        if self.k >= num_exits:
            raise ValueError(f"exit {self.k} does not exist: the network has {num_exits} exits")

    def decide(self, k: int, logits: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        return torch.full((len(logits),), k == self.k, dtype=torch.bool, device=logits.device), state

    def simulate(self, logits: np.ndarray) -> np.ndarray:
        return np.full(np.shape(logits)[1], self.k, dtype=np.int64)


class EENetPolicy:
    """EENet's fitted scheduler (analysis.eenet) as a runtime policy: a sample leaves at the first exit whose score
    is >= T_k (``route`` with ``unrouted="last_exit"``: a runtime has to exit everyone somewhere).

    Exit k's score reads its softmax features and the scores of exits 0..k-1, so those scores are the policy's
    per-sample state [n, k], fed to later exits clipped to [0, 1] (``prev_scores="clamped"``) or as computed
    (``"unclamped"``), as SchedulerSettings.prev_scores_at_test says. The scheduler is copied; the copy follows
    the input to its device.
    """

    def __init__(self, scheduler: ExitScheduler, thresholds: Sequence[float], prev_scores: str = "unclamped"):
        self.settings = SchedulerSettings(prev_scores_at_test=prev_scores)
        self.scheduler = copy.deepcopy(scheduler).eval()
        self.thresholds = tuple(float(t) for t in thresholds)

    @classmethod
    def from_fit(cls, fit: SchedulerFit, settings: SchedulerSettings = SchedulerSettings()) -> "EENetPolicy":
        """The policy of one fitted trial (analysis.eenet.fit_scheduler) under the settings it was fitted with."""
        if settings.unrouted != "last_exit":
            raise ValueError("a runtime exits every sample: settings.unrouted must be 'last_exit'")
        return cls(fit.model, fit.thresholds, settings.prev_scores_at_test)

    def start(self, batch: int, device: torch.device, num_exits: int) -> torch.Tensor:
        _check_exits("EENetPolicy", len(self.thresholds), num_exits)
        self.scheduler.to(device)
        return torch.empty(batch, 0, dtype=self.scheduler.u[0].dtype, device=device)

    def decide(self, k: int, logits: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # exit k's score exactly as ExitScheduler.forward computes it, from the carried previous scores
        z = torch.cat([scheduler_inputs(logits), prev], dim=1)
        n_classes = self.scheduler.n_classes
        score = z[:, :n_classes] @ self.scheduler.u[k] + z[:, n_classes:] @ self.scheduler.v[k]
        fed = score.clamp(0, 1) if self.settings.prev_scores_at_test == "clamped" else score
        return score.double() >= self.thresholds[k], torch.cat([prev, fed[:, None]], dim=1)

    def simulate(self, logits: np.ndarray) -> np.ndarray:
        probs = torch.from_numpy(np.asarray(logits)).double().softmax(dim=-1).numpy()
        scores = scheduler_scores(self.scheduler.cpu(), probs, self.settings)
        return route(scores, np.asarray(self.thresholds), unrouted="last_exit")


class JEIPolicy:
    """JEI-DNN's gates (models.jei) as a runtime policy: gate k reads exit k's uncertainty features and a sample
    leaves at the first exit whose conditional exit probability a_k reaches 0.5 (the final exit takes the rest).

    The rule's running quantities (the sum of earlier gate outputs and prod (1 - a_j)) are the per-sample state
    [n, 2]. The gates are copied; the copy follows the input to its device.
    """

    def __init__(self, gates: torch.nn.ModuleList, threshold: float = 0.5):
        self.gates = copy.deepcopy(gates).eval()
        self.threshold = threshold

    def start(self, batch: int, device: torch.device, num_exits: int) -> torch.Tensor:
        _check_exits("JEIPolicy", len(self.gates) + 1, num_exits)
        self.gates.to(device)
        return torch.stack([torch.zeros(batch, device=device), torch.ones(batch, device=device)], dim=1)

    def decide(self, k: int, logits: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.gates[k](uncertainty_features(logits))).squeeze(1)
        activation, before, stay = exit_step(gate, state[:, 0], state[:, 1])
        return activation >= self.threshold, torch.stack([before, stay], dim=1)

    def simulate(self, logits: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            gates = torch.cat([gate.cpu()(uncertainty_features(torch.from_numpy(np.asarray(z))))
                               for gate, z in zip(self.gates, logits[:-1])], dim=1)
            return gated_exits(torch.sigmoid(gates), self.threshold).numpy()


# ---------------------------------------------------------------------------------------------------- runtime
@dataclass
class EarlyExitResult:
    """Per-sample outcome of a batch, on the input's device.

    ``macs_spent``: cumulative cost of each sample's exit (count_exit_costs' MACs unless other costs were given);
    ``stage_batches[k]``: samples stage k computed (0 for stages no sample reached); ``logits``: [N, C] of each
    sample's exit, or None when not kept.
    """

    predictions: torch.Tensor
    exit_index: torch.Tensor
    macs_spent: torch.Tensor
    stage_batches: list[int]
    logits: torch.Tensor | None = None


_MACS: "weakref.WeakKeyDictionary[MultiExitNetwork, dict[tuple[int, ...], list[int]]]" = weakref.WeakKeyDictionary()


def _exit_macs(model: MultiExitNetwork, input_shape: tuple[int, ...]) -> list[int]:
    """count_exit_costs' cumulative MACs per exit, counted once per network and input shape (a traced run)."""
    per_shape = _MACS.setdefault(model, {})
    if input_shape not in per_shape:
        per_shape[input_shape] = count_exit_costs(model, input_shape).macs
    return per_shape[input_shape]


def _cost_table(model: MultiExitNetwork, x: torch.Tensor, costs: Sequence[float] | None) -> torch.Tensor:
    """Per-exit costs on the input's device, copied without waiting for queued work."""
    table = torch.from_numpy(np.asarray(_exit_macs(model, tuple(x.shape[1:])) if costs is None else costs))
    if table.shape != (model.num_exits,):
        raise ValueError(f"costs must have one entry per exit ({model.num_exits}), got shape {tuple(table.shape)}")
    return table.to(x.device, non_blocking=True)


@contextlib.contextmanager
def _evaluating(model: MultiExitNetwork) -> Iterator[None]:
    """Eval mode and no autograd for the call; the training mode the model had is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _run_stage(model: MultiExitNetwork, k: int, state: State) -> tuple[State, torch.Tensor]:
    return model.run_stage(k, state)


@functools.cache
def _compiled_stage() -> Callable[[MultiExitNetwork, int, State], tuple[State, torch.Tensor]]:
    """One compiled stage function for all networks: dynamo guards on the architecture and the stage, not on the
    instance, so networks of one architecture share graphs and a fresh copy does not recompile."""
    return torch.compile(_run_stage, dynamic=True)


def _autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """The requested autocast for the network's stages (decisions stay outside it)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()


def _leaving_first(exits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A stable order of the running samples with the leaving ones first, and how many leave: the stage's one
    host sync (sorting on the device avoids a second one for ``nonzero``)."""
    order = torch.argsort(exits.logical_not().to(torch.int8), stable=True)
    return order, int(exits.sum())


class _Outputs:
    """Per-sample result buffers, filled exit by exit through index copies (no host sync)."""

    def __init__(self, n: int, device: torch.device, keep_logits: bool):
        self.predictions = torch.empty(n, dtype=torch.long, device=device)
        self.exit_index = torch.empty(n, dtype=torch.long, device=device)
        self.keep_logits = keep_logits
        self.logits: torch.Tensor | None = None

    def record(self, rows: torch.Tensor, k: int, logits: torch.Tensor) -> None:
        """Samples ``rows`` (batch positions) left at exit k with these logits."""
        self.predictions.index_copy_(0, rows, logits.argmax(dim=-1))
        self.exit_index.index_fill_(0, rows, k)
        if self.keep_logits:
            if self.logits is None:
                self.logits = logits.new_empty(len(self.predictions), logits.shape[-1])
            self.logits.index_copy_(0, rows, logits)


def _execute(model: MultiExitNetwork, x: torch.Tensor, policy: ExitPolicy, stage: Callable, amp: str | None,
             out: _Outputs) -> list[int]:
    """The stage loop; returns how many samples each stage computed."""
    last = model.num_exits - 1
    batches = [0] * model.num_exits
    alive = torch.arange(len(x), device=x.device)  # batch positions of the samples still running
    pstate = policy.start(len(x), x.device, model.num_exits)
    with _autocast(x.device, amp):
        state = model.init_state(x)
    for k in range(model.num_exits):
        batches[k] = len(alive)
        with _autocast(x.device, amp):
            state, logits = stage(model, k, state)
        if k == last:
            out.record(alive, k, logits)
            break
        exits, pstate = policy.decide(k, logits, pstate)
        order, n_leaving = _leaving_first(exits)
        leaving, staying = order[:n_leaving], order[n_leaving:]
        out.record(alive[leaving], k, logits[leaving])
        if n_leaving == len(alive):
            break
        if n_leaving:
            state, pstate, alive = select_state(state, staying), select_state(pstate, staying), alive[staying]
    return batches


def run_early_exit(model: MultiExitNetwork, x: torch.Tensor, policy: ExitPolicy,
                   costs: Sequence[float] | None = None, *, keep_logits: bool = True, amp: str | None = None,
                   channels_last: bool = False, compile: bool = False) -> EarlyExitResult:
    """Execute early exit on a batch: stage k runs only on the samples no earlier exit took.

    ``costs``: per-exit cumulative costs for ``macs_spent`` (default: count_exit_costs' MACs for this input
    shape, counted once and cached). ``amp="bf16"`` runs the stages under bfloat16 autocast; ``channels_last``
    lays a 4-D input out NHWC (convolutions follow it). ``compile`` runs every stage through one
    ``torch.compile(dynamic=True)`` function: the first call per stage and batch-size regime compiles (tens of
    seconds on CPU) and its logits match eager ones only to float32 rounding. Runs in eval mode under
    ``torch.inference_mode``; the model's training mode is restored.
    """
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None or one of {sorted(AMP_DTYPES)}, got {amp!r}")
    table = _cost_table(model, x, costs)
    stage = _compiled_stage() if compile else _run_stage
    limit = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if compile else contextlib.nullcontext()
    with _evaluating(model), limit:
        out = _Outputs(len(x), x.device, keep_logits)
        batches = _execute(model, x, policy, stage, amp, out)
        macs = table[out.exit_index]
    return EarlyExitResult(out.predictions, out.exit_index, macs, batches, out.logits)


def simulate_policy(model: MultiExitNetwork, x: torch.Tensor, policy: ExitPolicy,
                    costs: Sequence[float] | None = None) -> EarlyExitResult:
    """The simulated counterpart of :func:`run_early_exit`: every exit of every sample is computed (one
    ``forward``), then ``policy.simulate`` picks the exits the way the analysis code does."""
    table = _cost_table(model, x, costs)
    with _evaluating(model):
        logits = torch.stack(model(x))
        exit_index = torch.from_numpy(policy.simulate(logits.float().cpu().numpy())).to(x.device)
        chosen = logits[exit_index, torch.arange(len(x), device=x.device)]
        macs = table[exit_index]
    return EarlyExitResult(chosen.argmax(dim=-1), exit_index, macs, [len(x)] * model.num_exits, chosen)
