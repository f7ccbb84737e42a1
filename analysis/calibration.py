"""Expected calibration error (ECE) of top-1 predictions, as JEI-DNN (networkslab/dynn) measures it.

The reference computes ECE with 15 *equal-mass* (quantile) bins on (p_max, correct) -- scikit-learn's
``calibration_curve(strategy='quantile')`` plus a weighted sum, see ``papers/dih-eenet-jei.md`` section 3.7 --
but only ever on one mini-batch at a time, and logs the batch-size-weighted average of the per-batch values
times 100. :func:`ece` is the dataset-level figure (report this one); :func:`ece_per_batch` reproduces the
released estimator, which is noisy, biased upwards and depends on the batch size. Both return a
*fraction*: multiply by 100 for the reference's percent.
"""
from __future__ import annotations

import numpy as np

#: number of equal-mass bins of the reference
DEFAULT_BINS = 15


def _checked(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.ndim != 1 or conf.shape != hit.shape:
        raise ValueError(f"confidence and correct must be 1-D of equal length, got {conf.shape} and {hit.shape}")
    if conf.size == 0:
        raise ValueError("ECE of zero samples is undefined")
    if conf.min() < 0 or conf.max() > 1:
        raise ValueError("confidence has values outside [0, 1]")  # the reference refuses these too
    return conf, hit


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """ECE (fraction) of all samples: sum_b (n_b / N) * |accuracy_b - mean confidence_b|.

    Bins as the reference draws them: the bins + 1 edges are ``np.percentile`` of the confidences at
    0, 1/bins, ..., 1 with numpy's default linear interpolation, so the outer edges are min and max. A
    sample goes to the bin whose number is the count of *inner* edges strictly below it: bins are closed
    on the right, ``[min, e_1], (e_1, e_2], ..., (e_{bins-1}, max]``, and a value equal to an inner edge
    falls in the lower bin. Tied confidences therefore always share a bin; when ties make edges coincide,
    the bins between them stay empty and contribute nothing (so "equal mass" is only approximate).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    conf, hit = _checked(confidence, correct)
    edges = np.percentile(conf, 100 * np.linspace(0.0, 1.0, bins + 1))
    bin_of = np.searchsorted(edges[1:-1], conf, side="left")
    # (n_b / N) * |hits_b / n_b - conf_b / n_b| = |hits_b - conf_b| / N; empty bins add 0
    gap = np.bincount(bin_of, weights=hit, minlength=bins) - np.bincount(bin_of, weights=conf, minlength=bins)
    return float(np.abs(gap).sum() / conf.size)


def ece_per_batch(
    confidence: np.ndarray, correct: np.ndarray, batch_size: int, bins: int = DEFAULT_BINS
) -> float:
    """The released estimator (fraction): :func:`ece` of every consecutive slice of ``batch_size`` samples
    (the last one may be shorter), averaged with the slices' sizes as weights.

    The reference's mini-batches are random within each test chunk (``SubsetRandomSampler``) and random
    on validation, so its logged value also depends on the shuffle; pass the samples in the order that
    is wanted. Test batches were 64 (CIFAR-10) or 100 (the other data sets).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    conf, hit = _checked(confidence, correct)
    batches = [slice(start, start + batch_size) for start in range(0, conf.size, batch_size)]
    total = sum(ece(conf[b], hit[b], bins) * conf[b].size for b in batches)
    return float(total / conf.size)
