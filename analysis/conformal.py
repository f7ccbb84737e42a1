"""Split-conformal prediction sets for an early-exit model, as JEI-DNN (networkslab/dynn) evaluates them.

Score: LAC ("least ambiguous set-valued classifier"), s = 1 - p_y. A threshold q_hat is fitted on
validation scores and the test set of sample i is {c : p_c >= 1 - q_hat}. With an early-exit model every
sample has the probabilities of the exit it took, and the reference fits q_hat four ways
(``papers/dih-eenet-jei.md`` section 3.7):

* ``general``: one q_hat from the validation scores of the gated predictions (each sample at its exit);
* ``gated_strict``: per exit k, from the validation samples that exited at k (placeholder 1 - alpha if none);
* ``gated_all``: per exit k, from every validation sample's score at exit k;
* ``gated``: ``gated_strict`` where more than 20 validation samples exited at k, else ``gated_all``.

A test sample is judged with the q_hat of the exit it took. Reported: mean set size (inefficiency) and
empirical coverage (the reference logs the miscoverage 1 - coverage). Probabilities are ``[K, N, C]``
(exit, sample, class) with the final head as exit K - 1; exit indices are 0-based.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import pandas as pd

#: the reference's miscoverage levels 0.01, 0.015, ..., 0.05 (literal floats, as it writes them)
DEFAULT_ALPHAS = (0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05)
#: 'gated' uses an exit's own samples only when more than this many validation samples exited there
MIN_EXITED = 20
STRATEGIES = ("general", "gated", "gated_all", "gated_strict")


def lac_scores(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Non-conformity 1 - p_y of probabilities ``[..., N, C]`` and labels ``[N]``: shape ``[..., N]``."""
    probs = np.asarray(probs)
    targets = np.asarray(targets, dtype=np.int64)
    index = np.broadcast_to(targets[:, None], probs.shape[:-1] + (1,))
    return 1.0 - np.take_along_axis(probs, index, axis=-1)[..., 0].astype(np.float64)


def lac_quantile(scores: np.ndarray, alpha: float) -> float:
    """q_hat: the empirical quantile of ``scores`` at level min(1, ceil((n + 1)(1 - alpha)) / n), 'higher'
    interpolation, i.e. a score that was observed, never an interpolated one (the finite-sample split-
    conformal correction). With n = 0 the reference has no data and returns 1 - alpha.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n = scores.size
    if n == 0:
        return 1.0 - alpha
    level = min(1.0, np.ceil((n + 1) * (1 - alpha)) / n)
    return float(np.quantile(scores, level, method="higher"))


def prediction_sets(probs: np.ndarray, qhat: Union[float, np.ndarray]) -> np.ndarray:
    """Boolean sets ``[N, C]``: class c is in when p_c >= 1 - q_hat; ``qhat`` is a scalar or one per sample."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs >= 1.0 - np.asarray(qhat, dtype=np.float64)[..., None]


def set_metrics(sets: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(mean set size, empirical coverage = fraction of samples whose label is in their set)."""
    sets = np.asarray(sets, dtype=bool)
    covered = sets[np.arange(len(sets)), np.asarray(targets, dtype=np.int64)]
    return float(sets.sum(axis=1).mean()), float(covered.mean())


def gated_probs(probs: np.ndarray, exit_index: np.ndarray) -> np.ndarray:
    """Probabilities ``[N, C]`` of the exit each sample took, from ``[K, N, C]`` and exits ``[N]``."""
    probs = np.asarray(probs)
    exit_index = np.asarray(exit_index, dtype=np.int64)
    return probs[exit_index, np.arange(probs.shape[1])].astype(np.float64)


def exit_qhats(
    scores: np.ndarray,
    exit_index: np.ndarray,
    alpha: float,
    strategy: str,
    min_exited: int = MIN_EXITED,
    released_final_exit_filter: bool = False,
) -> np.ndarray:
    """q_hat of every exit ``[K]`` by ``strategy`` ('general' repeats its one value), from validation
    scores ``[K, N]`` (:func:`lac_scores`) and the exit each validation sample took ``[N]``.

    ``released_final_exit_filter`` reproduces a bug of the released code: its "exited at the final head"
    filter compares exit indices with the number of blocks (G + 1) instead of G, so no validation sample
    ever counts as exited at the final head -- 'gated' then always falls back to all samples there and
    'gated_strict' gets the n = 0 placeholder 1 - alpha. Off by default (the filter is what was meant).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {STRATEGIES}")
    scores = np.asarray(scores, dtype=np.float64)
    exit_index = np.asarray(exit_index, dtype=np.int64)
    n_exits, n = scores.shape
    if strategy == "general":
        return np.full(n_exits, lac_quantile(scores[exit_index, np.arange(n)], alpha))
    exited = exit_index[None, :] == np.arange(n_exits)[:, None]  # [K, N]
    if released_final_exit_filter:
        exited[-1] = False
    qhats = np.empty(n_exits)
    for k in range(n_exits):
        use_exited = strategy == "gated_strict" or (strategy == "gated" and exited[k].sum() > min_exited)
        qhats[k] = lac_quantile(scores[k, exited[k]] if use_exited else scores[k], alpha)
    return qhats


def conformal_table(
    val_probs: np.ndarray,
    val_exit: np.ndarray,
    val_targets: np.ndarray,
    test_probs: np.ndarray,
    test_exit: np.ndarray,
    test_targets: np.ndarray,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    strategies: Sequence[str] = STRATEGIES,
    min_exited: int = MIN_EXITED,
    released_final_exit_filter: bool = False,
) -> pd.DataFrame:
    """Set size and coverage on test for every strategy and alpha, q_hats fitted on validation only.

    Columns: strategy, alpha, set_size (mean number of classes per set), coverage (fraction). These are
    plain full-test means; the reference logs the mean of running averages over 10 test chunks
    (:func:`analysis.chunked.running_chunk_mean` of the per-sample sizes / covered flags reproduces it).
    """
    val_scores = lac_scores(val_probs, val_targets)  # [K, N_val]
    test_gated = gated_probs(test_probs, test_exit)
    test_exit = np.asarray(test_exit, dtype=np.int64)
    rows = []
    for strategy in strategies:
        for alpha in alphas:
            qhats = exit_qhats(val_scores, val_exit, alpha, strategy, min_exited, released_final_exit_filter)
            size, coverage = set_metrics(prediction_sets(test_gated, qhats[test_exit]), test_targets)
            rows.append({"strategy": strategy, "alpha": float(alpha), "set_size": size, "coverage": coverage})
    return pd.DataFrame(rows, columns=["strategy", "alpha", "set_size", "coverage"])
