"""JEI-DNN evaluation metrics (analysis/calibration, conformal, chunked) against values worked out by hand.

Probabilities are multiples of 1/8 wherever a threshold 1 - q_hat is compared with them, so every
comparison in the comments is exact in floating point.
"""
from __future__ import annotations

import numpy as np
import pytest

from analysis.calibration import ece, ece_per_batch
from analysis.chunked import running_chunk_mean
from analysis.conformal import (
    DEFAULT_ALPHAS,
    STRATEGIES,
    conformal_table,
    exit_qhats,
    gated_probs,
    lac_quantile,
    lac_scores,
    prediction_sets,
    set_metrics,
)


# ------------------------------------------------------------------------------------------------- ECE
def test_ece_three_equal_mass_bins():
    # 6 samples, 3 bins. Edges = percentiles at 0, 1/3, 2/3, 1 (linear): positions 5q = 0, 1.67, 3.33, 5 ->
    #   e1 = 0.4 + 0.67 * 0.2 = 0.533, e2 = 0.7 + 0.33 * 0.2 = 0.767 -> bins {0.2, 0.4} {0.6, 0.7} {0.9, 0.95}
    #   |hits - sum conf| per bin: |1 - 0.6| = 0.4, |1 - 1.3| = 0.3, |2 - 1.85| = 0.15 -> ECE = 0.85 / 6.
    # Equal-width bins would give {0.2} {0.4, 0.6} {0.7, 0.9, 0.95}: (0.2 + 0 + 0.45) / 6; one bin 0.25 / 6.
    conf = np.array([0.2, 0.4, 0.6, 0.7, 0.9, 0.95])
    correct = np.array([0, 1, 0, 1, 1, 1], dtype=bool)
    assert ece(conf, correct, bins=3) == pytest.approx(0.85 / 6)


def test_ece_tie_on_an_inner_edge_goes_to_the_lower_bin():
    # conf 0.3, 0.6 x4, 0.9: both inner edges (positions 1.67 and 3.33) interpolate 0.6 and 0.6 -> e1 = e2 = 0.6.
    # A sample's bin = number of inner edges strictly below it: 0.3 -> 0, 0.6 -> 0, 0.9 -> 2; bin 1 is empty.
    #   bin 0: hits 1+1+1+0+0 = 3, conf 0.3 + 2.4 = 2.7 -> 0.3;  bin 2: |1 - 0.9| = 0.1  -> ECE = 0.4 / 6.
    # Upper-bin ties ({0.3}, {0.6 x4, 0.9}): (0.7 + 0.3) / 6; equal width ({0.3}, {0.6 x4}, {0.9}): 1.2 / 6;
    # an unweighted mean over the non-empty bins: (|3/5 - 2.7/5| + 0.1) / 2 = 0.08.
    conf = np.array([0.3, 0.6, 0.6, 0.6, 0.6, 0.9])
    correct = np.array([1, 1, 1, 0, 0, 1], dtype=bool)
    assert ece(conf, correct, bins=3) == pytest.approx(0.4 / 6)


def test_ece_per_batch_differs_from_dataset_level():
    # One bin, so the ECE of a group is |hits - sum conf| / n. batch_size 3 -> batches of 3, 3, 2:
    #   (0.9 0.8 0.7 | 1 1 0): |2 - 2.4| = 0.4;  (0.6 0.9 0.5 | 1 1 1): |3 - 2.0| = 1.0;  (0.8 0.4 | 1 0): 0.2
    #   weighted by size: (0.4/3 * 3 + 1.0/3 * 3 + 0.2/2 * 2) / 8 = 1.6 / 8 = 0.2
    #   (unweighted mean of the batches: (0.133 + 0.333 + 0.1) / 3 = 0.189).
    # Dataset level: hits 6, conf 5.6 -> 0.4 / 8 = 0.05.
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.9, 0.5, 0.8, 0.4])
    correct = np.array([1, 1, 0, 1, 1, 1, 1, 0], dtype=bool)
    assert ece_per_batch(conf, correct, batch_size=3, bins=1) == pytest.approx(0.2)
    assert ece(conf, correct, bins=1) == pytest.approx(0.05)
    assert ece_per_batch(conf, correct, batch_size=8, bins=1) == pytest.approx(0.05)  # one batch = dataset


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError):
        ece(np.array([0.5, 1.5]), np.array([1, 0]))
    with pytest.raises(ValueError):
        ece(np.array([0.5, 0.5]), np.array([1, 0, 1]))
    with pytest.raises(ValueError):
        ece(np.array([]), np.array([]))


# ------------------------------------------------------------------------------------------- conformal
def test_lac_quantile_level_and_higher_interpolation():
    # n = 10, alpha = 0.3: level = ceil(11 * 0.7) / 10 = ceil(7.7) / 10 = 0.8; position 9 * 0.8 = 7.2.
    # Sorted scores 0.05 0.1 ... 0.9: 'higher' takes index 8 -> 0.8.
    # Mutants: 'linear' 0.7 + 0.2 * 0.1 = 0.72; 'lower'/'nearest' 0.7; level ceil(10 * 0.7) / 10 = 0.7 or
    # plain 1 - alpha (position 6.3, 'higher' -> index 7) -> 0.7; no ceil 0.77 (position 6.93) -> 0.7.
    scores = np.array([0.05, 0.4, 0.1, 0.3, 0.2, 0.6, 0.5, 0.9, 0.7, 0.8])
    assert lac_quantile(scores, 0.3) == pytest.approx(0.8)


def test_lac_quantile_level_capped_at_one_and_empty_placeholder():
    # n = 5, alpha = 0.05: ceil(6 * 0.95) / 5 = 6 / 5 > 1 -> level 1 -> the maximum.
    assert lac_quantile(np.array([0.1, 0.3, 0.2, 0.5, 0.4]), 0.05) == pytest.approx(0.5)
    assert lac_quantile(np.array([]), 0.05) == pytest.approx(0.95)  # n = 0: 1 - alpha


def test_lac_scores_per_exit():
    probs = np.array([[[0.5, 0.25, 0.25], [0.125, 0.875, 0.0]],
                      [[0.0, 0.75, 0.25], [0.25, 0.25, 0.5]]])  # [K=2, N=2, C=3]
    targets = np.array([1, 2])
    # exit 0: 1 - 0.25, 1 - 0.0; exit 1: 1 - 0.75, 1 - 0.5
    np.testing.assert_allclose(lac_scores(probs, targets), [[0.75, 1.0], [0.25, 0.5]])


def test_prediction_sets_size_and_coverage():
    # q_hat = 0.75 -> class c is in when p_c >= 0.25:
    #   s0 (target 0) {0, 1} covered; s1 (target 1) {0, 1} covered; s2 (target 0) {2} missed;
    #   s3 (target 1) {0, 1, 2} covered -> sizes 2 2 1 3: mean 2.0, coverage 3/4.
    # With '>' instead of '>=': sizes 1 2 1 1 (1.25), coverage 2/4.
    probs = np.array([[0.625, 0.25, 0.125],
                      [0.5, 0.375, 0.125],
                      [0.125, 0.125, 0.75],
                      [0.25, 0.25, 0.5]])
    targets = np.array([0, 1, 0, 1])
    sets = prediction_sets(probs, 0.75)
    np.testing.assert_array_equal(sets, [[1, 1, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]])
    assert set_metrics(sets, targets) == (pytest.approx(2.0), pytest.approx(0.75))


# Validation: K = 2 exits, 6 samples, 2 classes, all labels 0, so the score is 1 - p[..., 0]. Samples 0-2 exit at
# exit 0, samples 3-5 at exit 1 (the final head). Scores:
#   exit 0, all samples: 0.125 0.25 0.375 | 0.5 0.75 0.625
#   exit 1, all samples: 0.875 0.75 0.625 | 0.125 0.25 0.25
# alpha = 0.5: n = 6 -> level ceil(3.5) / 6 = 4/6, position 5 * 4/6 = 3.33 -> sorted index 4;
#              n = 3 -> level ceil(2.0) / 3 = 2/3, position 2 * 2/3 = 1.33 -> sorted index 2 (the maximum).
VAL_SCORES = np.array([[0.125, 0.25, 0.375, 0.5, 0.75, 0.625],
                       [0.875, 0.75, 0.625, 0.125, 0.25, 0.25]])
VAL_PROBS = np.stack([1 - VAL_SCORES, VAL_SCORES], axis=-1)  # [K, N, C]
VAL_EXIT = np.array([0, 0, 0, 1, 1, 1])
VAL_TARGETS = np.zeros(6, dtype=int)


@pytest.mark.parametrize("strategy, min_exited, released, expected", [
    # gated scores 0.125 0.25 0.375 0.125 0.25 0.25, sorted 0.125 0.125 0.25 0.25 0.25 0.375 -> index 4: 0.25
    ("general", 20, False, [0.25, 0.25]),
    # exit 0 sorted 0.125 0.25 0.375 0.5 0.625 0.75 -> 0.625; exit 1 sorted 0.125 0.25 0.25 0.625 0.75 0.875 -> 0.75
    ("gated_all", 20, False, [0.625, 0.75]),
    # exited only: exit 0 {0.125, 0.25, 0.375} -> 0.375; exit 1 {0.125, 0.25, 0.25} -> 0.25
    ("gated_strict", 20, False, [0.375, 0.25]),
    ("gated", 2, False, [0.375, 0.25]),  # 3 exited > 2: own samples
    ("gated", 3, False, [0.625, 0.75]),  # 3 exited, not more than 3: all samples
    # released filter: nobody counts as exited at the final head -> 'gated' falls back to all samples there,
    # 'gated_strict' gets the placeholder 1 - alpha = 0.5; exit 0 is unaffected.
    ("gated", 2, True, [0.375, 0.75]),
    ("gated_strict", 20, True, [0.375, 0.5]),
    ("general", 20, True, [0.25, 0.25]),
])
def test_exit_qhats_by_hand(strategy, min_exited, released, expected):
    got = exit_qhats(VAL_SCORES, VAL_EXIT, 0.5, strategy, min_exited=min_exited,
                     released_final_exit_filter=released)
    np.testing.assert_allclose(got, expected)


def test_gated_falls_back_to_all_samples_with_20_or_fewer_exited():
    # 41 validation samples. Samples 0-20 (21 of them) exit at exit 0, samples 21-40 (20) at exit 1.
    # Scores: exit 0: 0.125 for everyone; exit 1: 0.75 for samples 0-20, 0.125 for the 20 that exited there.
    # alpha = 0.5 over all 41: level ceil(42 * 0.5) / 41 = 21/41, position 40 * 21/41 = 20.5 -> index 21 of
    # (20 x 0.125, 21 x 0.75) -> 0.75. Exit 0: 21 > 20 exited -> own scores -> 0.125; exit 1: 20 exited, not
    # more than 20 -> all samples -> 0.75 (the exited ones alone would give 0.125).
    scores = np.array([[0.125] * 41, [0.75] * 21 + [0.125] * 20])
    exit_index = np.array([0] * 21 + [1] * 20)
    got = exit_qhats(scores, exit_index, 0.5, "gated")
    np.testing.assert_allclose(got, [0.125, 0.75])


# Test: 4 samples; samples 0, 1 exit at exit 0, samples 2, 3 at exit 1. Probabilities of the exit taken:
#   s0 [0.625 0.375] label 0, s1 [0.5 0.5] label 1, s2 [0.875 0.125] label 0, s3 [0.25 0.75] label 1.
# The exits not taken say something else ([0.125 0.875] and [0.5 0.5]) so that using them would show.
TEST_PROBS = np.array([[[0.625, 0.375], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],
                       [[0.125, 0.875], [0.125, 0.875], [0.875, 0.125], [0.25, 0.75]]])
TEST_EXIT = np.array([0, 0, 1, 1])
TEST_TARGETS = np.array([0, 1, 0, 1])


def test_gated_probs_takes_the_exit_each_sample_took():
    np.testing.assert_array_equal(gated_probs(TEST_PROBS, TEST_EXIT),
                                  [[0.625, 0.375], [0.5, 0.5], [0.875, 0.125], [0.25, 0.75]])


def test_conformal_table_by_hand():
    # Thresholds 1 - q_hat per exit (q_hats from test_exit_qhats_by_hand, alpha = 0.5, min_exited = 2):
    #   general 0.75 / 0.75:  s0 {} s1 {} s2 {0} s3 {1}          -> size 2/4 = 0.5, coverage 2/4
    #   gated_all 0.375 / 0.25: s0 {0,1} s1 {0,1} s2 {0} s3 {0,1}  -> size 7/4, coverage 1
    #   gated_strict and gated 0.625 / 0.75: s0 {0} s1 {} s2 {0} s3 {1} -> size 3/4, coverage 3/4
    table = conformal_table(VAL_PROBS, VAL_EXIT, VAL_TARGETS, TEST_PROBS, TEST_EXIT, TEST_TARGETS,
                            alphas=(0.5,), min_exited=2)
    assert list(table.columns) == ["strategy", "alpha", "set_size", "coverage"]
    assert list(table["strategy"]) == list(STRATEGIES)
    by = table.set_index("strategy")
    np.testing.assert_allclose(by.loc[list(STRATEGIES), "set_size"], [0.5, 0.75, 1.75, 0.75])
    np.testing.assert_allclose(by.loc[list(STRATEGIES), "coverage"], [0.5, 0.75, 1.0, 0.75])
    assert (table["alpha"] == 0.5).all()


def test_conformal_table_default_alphas():
    table = conformal_table(VAL_PROBS, VAL_EXIT, VAL_TARGETS, TEST_PROBS, TEST_EXIT, TEST_TARGETS)
    assert len(table) == len(STRATEGIES) * 9
    # exactly the literals (np.arange(0.01, 0.0501, 0.005) would give 0.019999999999999997, ...)
    assert sorted(set(table["alpha"])) == [0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05]
    assert tuple(DEFAULT_ALPHAS) == tuple(table["alpha"].iloc[:9])


# ---------------------------------------------------------------------------------------------- chunks
def test_running_chunk_mean_differs_from_plain_mean():
    # 12 samples in 10 chunks (np.array_split): sizes 2 2 1 1 1 1 1 1 1 1. Chunks: [1 0] [0 0] then eight 1s.
    # Running averages after each chunk: 1/2, 1/4, 2/5, 3/6, 4/7, 5/8, 6/9, 7/10, 8/11, 9/12 -> their mean.
    # Plain mean 9/12 = 0.75; mean of independent chunks (0.5 + 0 + 8) / 10 = 0.85; extra samples in the
    # last chunks instead (sizes 1 x8, 2, 2) would start 1, 1/2, 1/3, ...
    values = np.array([1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], dtype=float)
    expected = np.mean([1 / 2, 1 / 4, 2 / 5, 3 / 6, 4 / 7, 5 / 8, 6 / 9, 7 / 10, 8 / 11, 9 / 12])
    assert running_chunk_mean(values) == pytest.approx(expected)
    assert expected != pytest.approx(values.mean())


def test_running_chunk_mean_skips_what_does_not_count():
    # Per-exit accuracy, 3 chunks of 2: [nan nan] [1 0] [nan 1]. After chunk 1 nothing counted (not logged);
    # after chunk 2: 1/2; after chunk 3: 2/3 -> (1/2 + 2/3) / 2 = 7/12.
    values = np.array([np.nan, np.nan, 1, 0, np.nan, 1])
    assert running_chunk_mean(values, n_chunks=3) == pytest.approx(7 / 12)
    assert np.isnan(running_chunk_mean(np.full(4, np.nan), n_chunks=2))
