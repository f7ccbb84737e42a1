"""Budgeted batch classification, rebuilt from exit records alone.

The algorithm is the one of MSDNet/IMTA's ``--eval dynamic`` (see ``papers/phuong-lampert-and-imta.md``
section 2.6): for every p in a grid an exit prior pi_k proportional to p^k is set, confidence thresholds
are fitted on the *validation* split so that a fraction pi_k of it leaves at exit k, the thresholds are
applied to the *test* split, and accuracy is plotted against the expected cost
sum_k (fraction of test samples leaving at k) * MACs_k. Nothing here is ever fitted on test data.

Everything is a plain numpy function of per-exit confidences ``[K, N]`` so that other exit policies plug
in: a confidence is any score where higher means "more ready to exit". Two are built in
(:data:`CONFIDENCES`): ``'max_prob'`` (maximum softmax probability, the papers' choice) and ``'entropy'``
(negative entropy of the softmax). A callable ``logits [K, N, C] -> scores [K, N]`` works as well, and
policies whose scores do not come from the logits (EENet's scheduler, JEI's gates) call
:func:`budgeted_points` with their own validation/test scores.
"""
from __future__ import annotations

from typing import Callable, Union

import numpy as np
import pandas as pd

from analysis.exit_record import ExitRecord

#: threshold meaning "nobody exits here" / "everybody left exits here" (the reference code's values)
NEVER = 1e8
ALWAYS = -1e8
#: p = 0.05, 0.10, ..., 2.00, the reference grid
DEFAULT_PS = np.arange(1, 41) / 20

Confidence = Union[str, Callable[[np.ndarray], np.ndarray]]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def max_prob(logits: np.ndarray) -> np.ndarray:
    """Maximum softmax probability over the last axis: [..., C] -> [...]."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return 1.0 / np.exp(z).sum(axis=-1)  # exp(0) / sum exp(z)


def neg_entropy(logits: np.ndarray) -> np.ndarray:
    """Negative entropy (nats) of the softmax over the last axis; 0 is a one-hot prediction."""
    logp = _log_softmax(logits)
    return (np.exp(logp) * logp).sum(axis=-1)


CONFIDENCES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_prob": max_prob,
    "entropy": neg_entropy,
}


def confidence_fn(confidence: Confidence) -> Callable[[np.ndarray], np.ndarray]:
    """Resolve a confidence name from :data:`CONFIDENCES`, or pass a callable through."""
    if callable(confidence):
        return confidence
    try:
        return CONFIDENCES[confidence]
    except KeyError:
        raise ValueError(f"unknown confidence {confidence!r}; known: {sorted(CONFIDENCES)} or a callable") from None


def exit_fractions(p: float, n_exits: int) -> np.ndarray:
    """Exit prior pi_k proportional to p^k for k = 1..n_exits, normalised to sum to 1.

    p < 1 favours early exits, p > 1 late ones, p = 1 is uniform (a truncated geometric distribution).
    """
    if not p > 0:
        raise ValueError(f"p must be positive, got {p}")
    if n_exits < 1:
        raise ValueError(f"n_exits must be >= 1, got {n_exits}")
    k = np.arange(1, n_exits + 1, dtype=np.float64)
    # p^k / sum_j p^j == p^(k-1) / sum_j p^(j-1); the shifted form cannot overflow as soon.
    w = np.power(float(p), k - 1.0)
    return w / w.sum()


def fit_thresholds(val_conf: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Per-exit thresholds [K] from validation confidences [K, N] and target exit fractions [K].

    The reference's sequential rule: for k = 1..K-1, m_k = floor(N * pi_k); walk the samples by
    decreasing confidence at exit k counting only the ones that have not exited yet; the confidence of
    the m_k-th of them is T_k (m_k = 0, or fewer than m_k left: T_k = +1e8 and nobody exits). Then every
    sample with confidence >= T_k at exit k is marked exited (ties may let more than m_k leave). The last
    exit takes everyone left: T_K = -1e8. The result does not depend on how ties are ordered.
    """
    conf = np.asarray(val_conf, dtype=np.float64)
    if conf.ndim != 2:
        raise ValueError(f"val_conf must be [K, N], got shape {conf.shape}")
    n_exits, n = conf.shape
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (n_exits,):
        raise ValueError(f"fractions must have shape ({n_exits},), got {fractions.shape}")
    thresholds = np.full(n_exits, NEVER)
    exited = np.zeros(n, dtype=bool)
    for k in range(n_exits - 1):
        m = int(np.floor(n * fractions[k]))
        remaining = conf[k, ~exited]
        if m == 0 or remaining.size < m:
            continue  # T_k stays +1e8: nobody exits at k
        # the m-th largest remaining confidence (partition instead of a full sort)
        thresholds[k] = np.partition(remaining, remaining.size - m)[remaining.size - m]
        exited |= conf[k] >= thresholds[k]
    thresholds[-1] = ALWAYS
    return thresholds


def apply_thresholds(test_conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Exit index (0-based) of every sample [N]: the first k with conf_k >= T_k (the last exit if none)."""
    conf = np.asarray(test_conf, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if conf.ndim != 2 or thresholds.shape != (conf.shape[0],):
        raise ValueError(f"test_conf [K, N] and thresholds [K] disagree: {conf.shape} vs {thresholds.shape}")
    passes = conf >= thresholds[:, None]
    passes[-1] = True  # the last exit takes everyone left, whatever its threshold
    return passes.argmax(axis=0)


def expected_cost(exit_index: np.ndarray, costs: np.ndarray) -> float:
    """Average cost per sample, sum_k (fraction exiting at k) * costs_k."""
    costs = np.asarray(costs, dtype=np.float64)
    return float(costs[np.asarray(exit_index)].mean())


def budgeted_points(
    val_conf: np.ndarray,
    test_conf: np.ndarray,
    test_correct: np.ndarray,
    macs: np.ndarray,
    ps: np.ndarray = DEFAULT_PS,
) -> pd.DataFrame:
    """The budgeted curve from any per-exit scores: thresholds fitted on ``val_conf`` [K, N_val], applied
    to ``test_conf`` [K, N_test]; ``test_correct`` [K, N_test] says whether exit k is right on sample i.

    Columns: p, accuracy (fraction), cost_macs (expected per sample), frac_exit1..frac_exitK (fraction of
    test samples leaving at each exit).
    """
    val_conf = np.asarray(val_conf, dtype=np.float64)
    test_conf = np.asarray(test_conf, dtype=np.float64)
    test_correct = np.asarray(test_correct, dtype=bool)
    macs = np.asarray(macs, dtype=np.float64)
    n_exits, n_test = test_conf.shape
    if val_conf.shape[0] != n_exits or test_correct.shape != test_conf.shape or macs.shape != (n_exits,):
        raise ValueError(
            f"shapes disagree: val_conf {val_conf.shape}, test_conf {test_conf.shape}, "
            f"test_correct {test_correct.shape}, macs {macs.shape}"
        )
    rows = []
    for p in np.asarray(ps, dtype=np.float64):
        thresholds = fit_thresholds(val_conf, exit_fractions(p, n_exits))
        exit_at = apply_thresholds(test_conf, thresholds)
        row = {
            "p": float(p),
            "accuracy": float(test_correct[exit_at, np.arange(n_test)].mean()),
            "cost_macs": expected_cost(exit_at, macs),
        }
        frac = np.bincount(exit_at, minlength=n_exits) / n_test
        row.update({f"frac_exit{k + 1}": float(f) for k, f in enumerate(frac)})
        rows.append(row)
    return pd.DataFrame(rows)


def exit_confidences(logits: np.ndarray, confidence: Confidence = "max_prob") -> np.ndarray:
    """Scores [K, N] of logits [K, N, C], one exit at a time (keeps float64 copies small)."""
    fn = confidence_fn(confidence)
    return np.stack([np.asarray(fn(logits[k]), dtype=np.float64) for k in range(len(logits))])


def budgeted_curve(
    record: ExitRecord, ps: np.ndarray = DEFAULT_PS, confidence: Confidence = "max_prob"
) -> pd.DataFrame:
    """Budgeted batch classification of one exit record: thresholds on validation, evaluated on test.

    ``confidence`` names an entry of :data:`CONFIDENCES` or is a callable ``logits [N, C] -> [N]``.
    Returns the columns of :func:`budgeted_points`; accuracy is a fraction, cost in the record's MACs.
    """
    if len(record.val_targets) == 0:
        raise ValueError("the exit record has no validation samples: thresholds cannot be fitted")
    val_conf = exit_confidences(record.val_logits, confidence)
    test_conf = exit_confidences(record.test_logits, confidence)
    test_correct = record.test_logits.argmax(-1) == record.test_targets[None]
    return budgeted_points(val_conf, test_conf, test_correct, record.macs, ps)


def accuracy_at_budget(curve: pd.DataFrame, budget, cost: str = "cost_macs", accuracy: str = "accuracy"):
    """Accuracy at an average cost ``budget`` (scalar or array), linearly interpolated along the curve
    sorted by cost; NaN outside the range of costs the curve reaches. Points of equal cost are averaged.
    """
    pts = curve[[cost, accuracy]].dropna().groupby(cost, as_index=False)[accuracy].mean()
    xs, ys = pts[cost].to_numpy(float), pts[accuracy].to_numpy(float)
    b = np.asarray(budget, dtype=np.float64)
    if xs.size == 0:
        out = np.full(b.shape, np.nan)
    else:
        out = np.interp(b, xs, ys)
        out = np.where((b < xs[0]) | (b > xs[-1]), np.nan, out)
    return float(out) if out.ndim == 0 else out
