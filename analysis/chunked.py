"""JEI-DNN's (networkslab/dynn) test reporting: the mean of running averages over 10 test chunks.

The reference splits the test set into 10 consecutive chunks (``np.array_split`` of the indices, so the
first ``N mod 10`` chunks hold one sample more), runs them in turn *without* resetting its metric sums, and
logs the mean of the 10 running averages it has after each chunk. That is neither the full-test value nor a
mean over independent chunks: the first chunks weigh more (chunk j enters 10 - j + 1 of the averages). The
plain mean over the whole test set is the honest figure; use this only to match the reference's numbers.
"""
from __future__ import annotations

import numpy as np

#: number of consecutive test chunks of the reference
N_CHUNKS = 10


def running_chunk_mean(values: np.ndarray, n_chunks: int = N_CHUNKS) -> float:
    """Mean over chunks j = 1..n_chunks of the average of ``values`` over chunks 1..j (test-set order).

    ``values`` are per-sample: correct flags (accuracy), costs of the chosen exit, set sizes, covered
    flags; a per-batch metric weighted by batch size (per-batch ECE) enters as its value repeated for every
    sample of the batch. NaN marks a sample that does not count (e.g. per-exit accuracy: NaN where the
    sample left elsewhere); a running average with nothing counted yet is left out, as the reference does
    not log it, and NaN comes back if nothing counts at all.
    """
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    v = np.asarray(values, dtype=np.float64).ravel()
    counted = ~np.isnan(v)
    sums = np.cumsum([chunk.sum() for chunk in np.array_split(np.where(counted, v, 0.0), n_chunks)])
    counts = np.cumsum([chunk.sum() for chunk in np.array_split(counted, n_chunks)])
    logged = counts > 0
    return float(np.mean(sums[logged] / counts[logged])) if logged.any() else float("nan")
