"""analysis/eenet.py: EENet's thresholds, scheduler losses and fit, and the budgeted baselines, by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import analysis.eenet as eenet
from analysis.budgeted import exit_fractions
from analysis.eenet import (
    GEOMETRIC_QS,
    ExitScheduler,
    SchedulerFit,
    SchedulerSettings,
    assignment_distribution,
    budget_points,
    calibrate_scheduler,
    choose_trial,
    eenet_thresholds,
    evaluate_policies,
    fit_scheduler,
    max_probability,
    normalised_neg_entropy,
    patience_exits,
    route,
    scheduler_features,
    scheduler_losses,
    scheduler_scores,
    summarise,
)


def synthetic(seed: int, n: int = 2000, n_classes: int = 4):
    """Three exits; half the samples are "easy" (every exit right and confident), a quarter are solved from
    exit 2 on, a quarter only by exit 3. An exit that is wrong predicts some other class with low confidence."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, n_classes, n)
    first_right = rng.choice(3, size=n, p=[0.5, 0.25, 0.25])
    logits = rng.normal(0.0, 0.5, size=(3, n, n_classes))
    for k in range(3):
        solved = first_right <= k
        wrong = (targets + rng.integers(1, n_classes, n)) % n_classes
        bump = np.where(solved, rng.uniform(2, 4, n), rng.uniform(0, 1.5, n))
        logits[k, np.arange(n), np.where(solved, targets, wrong)] += bump
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True), targets


FAST = dict(lr=3e-2, epochs=40, period=5, weight_decay=0.0, restarts=2)


# ------------------------------------------------------------------------------------------ criteria
def test_criteria_by_hand():
    probs = np.array([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
    np.testing.assert_allclose(max_probability(probs), [[0.5, 1.0, 1 / 3]])
    # 1 - H/log C: H = log 2 for (0.5, 0.5, 0); a one-hot vector is 1 (zeros give no NaN), uniform is 0
    np.testing.assert_allclose(normalised_neg_entropy(probs), [[1 - math.log(2) / math.log(3), 1.0, 0.0]], atol=1e-12)


# ------------------------------------------------------------------------------ thresholds and routing
def test_thresholds_reproduce_target_fractions():
    rng = np.random.default_rng(0)
    scores = rng.permutation(300).reshape(3, 100) / 300  # 100 distinct scores per exit
    thresholds = eenet_thresholds(scores, np.array([0.5, 0.3, 0.2]))
    np.testing.assert_array_equal(np.bincount(route(scores, thresholds), minlength=3), [50, 30, 20])
    assert thresholds[-1] == 0.0


def test_thresholds_sequential_pool_and_empty_exit():
    # exit 1: n1 = floor(6 * 0.5) = 3 -> T1 = 0.7 (s0..s2 leave). Exit 2: n2 = floor(6 * 1/3) = 2 over the pool
    # s3..s5 only (0.5, 0.6, 0.2) -> T2 = 0.5; counting s0..s2 (0.99, 0.98, 0.97) would have given 0.98.
    scores = np.array([[0.9, 0.8, 0.7, 0.3, 0.2, 0.1], [0.99, 0.98, 0.97, 0.5, 0.6, 0.2], [0.5] * 6])
    np.testing.assert_allclose(eenet_thresholds(scores, np.array([0.5, 1 / 3, 1 / 6])), [0.7, 0.5, 0.0])
    # n1 = floor(6 * 0.1) = 0: T1 = 1 (the reference's value), and a score of 1 or more still exits there
    thresholds = eenet_thresholds(scores, np.array([0.1, 0.5, 0.4]))
    np.testing.assert_allclose(thresholds, [1.0, 0.97, 0.0])
    np.testing.assert_array_equal(route(np.array([[1.2, 0.9], [0.1, 0.1], [0.0, 0.0]]), thresholds), [0, 2])


def test_unrouted_samples_and_expected_cost_by_hand():
    # Thresholds (0.7, 0.5, 0) from the example above; costs (1, 2, 4); test samples:
    #   t0: 0.8 -> exit 1 (right)      t1: 0.1, 0.6 -> exit 2 (wrong)      t2: 0.1, 0.1, 0.3 -> exit 3 (right)
    #   t3: 0.1, 0.1, -0.2 -> below every threshold (unbounded scores): last exit (right) or "no exit"
    scores = np.array([[0.9, 0.8, 0.7, 0.3, 0.2, 0.1], [0.99, 0.98, 0.97, 0.5, 0.6, 0.2], [0.5] * 6])
    thresholds = eenet_thresholds(scores, np.array([0.5, 1 / 3, 1 / 6]))
    test = np.array([[0.8, 0.1, 0.1, 0.1], [0.0, 0.6, 0.1, 0.1], [0.0, 0.0, 0.3, -0.2]])
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=bool)
    costs = np.array([1.0, 2.0, 4.0])
    faithful = summarise(route(test, thresholds), correct, costs)
    assert faithful["cost"] == pytest.approx((1 + 2 + 4 + 4) / 4) and faithful["accuracy"] == pytest.approx(3 / 4)
    assert [faithful[f"frac_exit{k}"] for k in (1, 2, 3)] == [0.25, 0.25, 0.5] and faithful["frac_none"] == 0
    # the reference counts t3 wrong at zero cost
    reference = summarise(route(test, thresholds, unrouted="reference"), correct, costs)
    assert reference["cost"] == pytest.approx((1 + 2 + 4 + 0) / 4) and reference["accuracy"] == pytest.approx(2 / 4)
    assert reference["frac_exit3"] == 0.25 and reference["frac_none"] == 0.25


# ------------------------------------------------------------------------------------------ baselines
def test_budget_points():
    assert budget_points([1.0, 2.0, 3.0], 2.5) == {"over": 2, "under": 1}
    assert budget_points([1.0, 2.0, 3.0], 2.0) == {"over": 2, "under": 1}  # "exceeds" is strict
    assert budget_points([1.0, 2.0, 3.0], 3.0) == {"over": 2, "under": 2}  # nothing exceeds: the last point
    assert budget_points([1.5, 2.0, 3.0], 1.0) == {"over": 0, "under": 0}  # nothing within: the first point


def test_geometric_baselines_over_and_under():
    (vp, vt), (tp, tt) = synthetic(0, n=500), synthetic(1, n=500)
    costs, budget = np.array([1.0, 2.0, 3.0]), 1.8
    table = evaluate_policies(vp, vt, tp, tt, costs, [budget], policies=("max_prob", "entropy"))
    assert list(table["protocol"]) == ["over", "under"] * 2
    for _, row in table.iterrows():
        prior = exit_fractions(row["q"], 3)
        assert row["planned_cost"] == pytest.approx(prior @ costs)
        assert (row["planned_cost"] > budget) == (row["protocol"] == "over")
        # the test columns are the fitted thresholds applied to test
        criterion = eenet.CRITERIA[row["policy"]]
        thresholds = eenet_thresholds(criterion(vp), prior)
        val_exit = route(criterion(vp), thresholds)
        assert row["val_accuracy"] == pytest.approx((vp.argmax(-1)[val_exit, np.arange(500)] == vt).mean())
        exit_at = route(criterion(tp), thresholds)
        assert row["cost"] == pytest.approx(costs[exit_at].mean())
        assert row["frac_exit1"] == pytest.approx((exit_at == 0).mean())
    qs = table["q"].to_numpy()
    i = np.flatnonzero(np.isclose(GEOMETRIC_QS, qs[0]))[0]
    assert qs[1] == pytest.approx(GEOMETRIC_QS[i - 1])  # "under" is the grid point just before "over"


def test_patience_by_hand():
    # Predictions at 4 exits of samples a..d: a agrees from exit 1 on, b from exit 2, c from exit 3, d never.
    preds = np.array([[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 2, 1], [0, 1, 2, 1]]).T
    np.testing.assert_array_equal(patience_exits(preds, 0), [0, 0, 0, 0])
    np.testing.assert_array_equal(patience_exits(preds, 1), [1, 2, 3, 3])
    np.testing.assert_array_equal(patience_exits(preds, 2), [2, 3, 3, 3])
    np.testing.assert_array_equal(patience_exits(preds, 3), [3, 3, 3, 3])
    np.testing.assert_array_equal(patience_exits(np.zeros((3, 5), dtype=int), 1), [1] * 5)


def test_patience_policy_over_and_under():
    (vp, vt), (tp, tt) = synthetic(0, n=500), synthetic(1, n=500)
    costs, budget = np.array([1.0, 2.0, 3.0]), 1.8
    table = evaluate_policies(vp, vt, tp, tt, costs, [budget], policies=("patience",)).set_index("protocol")
    for protocol in ("over", "under"):
        t = table.loc[protocol, "patience"]
        assert table.loc[protocol, "planned_cost"] == pytest.approx(costs[patience_exits(vp.argmax(-1), t)].mean())
        assert table.loc[protocol, "cost"] == pytest.approx(costs[patience_exits(tp.argmax(-1), t)].mean())
    assert table.loc["over", "planned_cost"] > budget >= table.loc["under", "planned_cost"]
    assert table.loc["over", "patience"] == table.loc["under", "patience"] + 1


# ------------------------------------------------------------------------------------- EENet scheduler
@pytest.mark.parametrize("assignment", ["softmax", "sum"])
def test_loss_terms_by_hand(assignment):
    # N = 3 samples, K = 2 exits ([K, N] layout), costs (1, 3), budget 1.5
    rho = torch.tensor([[0.9, 0.2, 0.6], [0.3, 0.7, 0.5]], requires_grad=True)
    scores = torch.tensor([[0.8, 0.3, 0.6], [0.4, 0.9, 0.2]], requires_grad=True)
    correct = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    costs, budget = torch.tensor([1.0, 3.0]), 1.5
    pi = assignment_distribution(rho, assignment)
    bce, kl, cost = scheduler_losses(scores, pi, correct, costs, budget)

    r, s, a = rho.detach().double().numpy(), scores.detach().double().numpy(), correct.double().numpy()
    p = np.exp(r) / np.exp(r).sum(0) if assignment == "softmax" else r / r.sum(0)
    w = p / p.sum(axis=1, keepdims=True)  # per exit, normalised over samples
    bce_hand = np.mean(np.sum(w * -(a * np.log(s) + (1 - a) * np.log(1 - s)), axis=1))
    t = s / s.sum(axis=0)  # beta = 1, per sample over exits
    kl_hand = np.mean(t * (np.log(t) - np.log(p)))
    cost_hand = abs(np.mean(np.sum(p * np.array([[1.0], [3.0]]), axis=0)) - budget) / budget
    assert bce.item() == pytest.approx(bce_hand, rel=1e-5)
    assert kl.item() == pytest.approx(kl_hand, rel=1e-5)
    assert cost.item() == pytest.approx(cost_hand, rel=1e-5)

    # stop-gradients: L_bce does not reach the assignment, L_kl does not reach the scores
    bce.backward(retain_graph=True)
    assert rho.grad is None and scores.grad is not None
    scores.grad = None
    (kl + cost).backward()
    assert scores.grad is None and rho.grad is not None


def test_scores_start_at_max_prob_and_previous_scores_switch():
    probs, _ = synthetic(0, n=20)
    x = scheduler_features(probs)
    model = ExitScheduler(3, 4, hidden_rate=0.5)
    raw, rho = model(x, clamp_prev=True)
    np.testing.assert_allclose(raw.detach().numpy(), max_probability(probs), rtol=1e-6)
    assert ((rho > 0) & (rho < 1)).all()
    # exit 1's score is pushed above 1 and exit 2 weighs it by 0.5: exit 2 sees min(s1, 1) when clipping
    with torch.no_grad():
        model.v[0][0] = 3.0
        model.v[1][2] = 0.5
    clipped, _ = model(x, clamp_prev=True)
    unclipped, _ = model(x, clamp_prev=False)
    s1 = 3 * x[0, :, 4]
    expected_gap = 0.5 * (s1 - s1.clamp(0, 1))
    assert (s1 > 1).any()
    np.testing.assert_allclose((unclipped[1] - clipped[1]).detach().numpy(), expected_gap.numpy(), atol=1e-6)


def test_softmax_over_sigmoids_bound():
    torch.manual_seed(0)
    k = 3
    bound = math.e / (math.e + k - 1)
    x = scheduler_features(synthetic(0, n=50)[0])
    model = ExitScheduler(k, 4, hidden_rate=0.5)
    with torch.no_grad():  # saturate the assignment outputs: exit 1 near 1, the others near 0
        for j, mlp in enumerate(model.assign):
            mlp[2].bias.fill_(30.0 if j == 0 else -30.0)
        _, rho = model(x, clamp_prev=True)
    soft = assignment_distribution(rho, "softmax")
    assert soft.max().item() <= bound + 1e-6 and soft[0].min().item() > bound - 1e-4
    assert assignment_distribution(rho, "sum")[0].min().item() > 0.99  # 0.882 (shipped ResNet) is reachable


@pytest.mark.parametrize("assignment", ["softmax", "sum"])
def test_fitted_eenet_meets_budget(assignment):
    (vp, vt), (tp, tt) = synthetic(0), synthetic(1)
    costs, budget = np.array([1.0, 2.0, 6.0]), 2.5
    assert abs(costs.mean() - budget) / budget > 0.15  # the uniform assignment's cost would fail the check
    settings = SchedulerSettings(assignment=assignment, **FAST)
    row = evaluate_policies(vp, vt, tp, tt, costs, [budget], settings, policies=("eenet",)).iloc[0]
    assert row["protocol"] == "fit" and row["trial"] in (0, 1)
    assert abs(row["planned_cost"] - budget) / budget < 0.1
    assert abs(row["cost"] - budget) / budget < 0.15
    fracs = row[["frac_exit1", "frac_exit2", "frac_exit3"]].to_numpy(float)
    assert fracs.sum() == pytest.approx(1.0) and row["cost"] == pytest.approx(fracs @ costs)
    # better than the max-prob baseline's over-budget point at about the same cost
    baseline = evaluate_policies(vp, vt, tp, tt, costs, [budget], policies=("max_prob",)).iloc[0]
    assert row["accuracy"] > baseline["accuracy"] - 0.02


def test_fit_switches_and_early_stop():
    probs, targets = synthetic(0, n=600)
    costs, budget = np.array([1.0, 2.0, 6.0]), 2.5
    base = SchedulerSettings(**{**FAST, "epochs": 12, "batch_size": 128})
    fits = {zg: fit_scheduler(probs, targets, costs, budget, SchedulerSettings(**{**vars(base), "zero_grad": zg}))
            for zg in (True, False)}
    assert not np.allclose(fits[True].thresholds, fits[False].thresholds)  # accumulated gradients differ
    again = fit_scheduler(probs, targets, costs, budget, base)
    np.testing.assert_array_equal(again.thresholds, fits[True].thresholds)  # seeded
    assert fits[True].pibar.sum() == pytest.approx(1.0, abs=1e-5)
    assert fits[True].planned_cost == pytest.approx(fits[True].pibar @ costs)
    # a cost loss always below the bar and a patience of 3 stop after 1 + 3 epochs at the latest
    stopping = SchedulerSettings(**{**vars(base), "stop_cost_loss": 100.0, "stop_patience": 3, "lr": 0.0})
    assert fit_scheduler(probs, targets, costs, budget, stopping).epochs == 4


def test_phases_alternate():
    # period 3, no weight decay: epochs 0-2 fit the scores only, epochs 3-5 the assignment only
    probs, targets = synthetic(0, n=300)
    costs = np.array([1.0, 2.0, 6.0])
    settings = {**FAST, "period": 3, "restarts": 1}
    models = {e: fit_scheduler(probs, targets, costs, 2.5, SchedulerSettings(**{**settings, "epochs": e})).model
              for e in (1, 3, 6)}

    def same(a, b, part):
        return all(torch.equal(x, y) for x, y in zip(getattr(a, part).parameters(), getattr(b, part).parameters()))

    assert same(models[1], models[3], "assign") and not same(models[1], models[3], "u")
    assert same(models[3], models[6], "u") and same(models[3], models[6], "v")
    assert not same(models[3], models[6], "assign")


def test_calibration_uses_clipped_previous_and_unclipped_own_scores():
    probs, _ = synthetic(0, n=200)
    model = ExitScheduler(3, 4, hidden_rate=0.5)
    with torch.no_grad():  # exit 1 scores 3 * max p (often above 1); exit 2 adds 0.5 * exit 1's score
        model.v[0][0] = 3.0
        model.v[1][2] = 0.5
    settings = SchedulerSettings()
    pibar, thresholds = calibrate_scheduler(model, probs, settings)
    m = max_probability(probs)
    s1 = 3 * m[0]
    raw = np.stack([s1, m[1] + 0.5 * np.clip(s1, 0, 1), m[2]])  # previous score clipped, own score not
    with torch.no_grad():
        rho = model(scheduler_features(probs), clamp_prev=True)[1].double().numpy()
    expected_pibar = (np.exp(rho) / np.exp(rho).sum(0)).mean(1)
    np.testing.assert_allclose(pibar, expected_pibar, rtol=1e-5)
    assert (s1 > 1).mean() > pibar[0]  # exit 1's threshold lies above 1: clipping would have changed it
    np.testing.assert_allclose(thresholds, eenet_thresholds(raw, pibar), rtol=1e-5)
    # test time feeds the unclipped score forward by default, the clipped one with prev_scores_at_test="clamped"
    unclipped = raw.copy()
    unclipped[1] = m[1] + 0.5 * s1
    np.testing.assert_allclose(scheduler_scores(model, probs, settings), unclipped, rtol=1e-5)
    clamped = SchedulerSettings(prev_scores_at_test="clamped")
    np.testing.assert_allclose(scheduler_scores(model, probs, clamped), raw, rtol=1e-5)


def test_choose_trial():
    def fit(cost, acc):
        return SchedulerFit(None, np.ones(1), np.zeros(1), cost, acc, 1)

    # budget 10, tolerance 10 %: trial 1 (cost 12) is out, trial 2 is the best of the rest
    assert choose_trial([fit(10.5, 0.7), fit(12.0, 0.9), fit(9.5, 0.8), fit(9.2, 0.6)], 10.0, 0.1) == 2
    assert choose_trial([fit(20.0, 0.9), fit(15.0, 0.5)], 10.0, 0.1) == 1  # none within: the last trial


# ------------------------------------------------------------------------------------------ entry point
def test_budget_range_error_before_fitting(monkeypatch):
    (vp, vt), (tp, tt) = synthetic(0, n=50), synthetic(1, n=50)
    monkeypatch.setattr(eenet, "eenet_policy", lambda *a, **k: pytest.fail("fitted before checking budgets"))
    for bad in (0.5, 3.5):
        with pytest.raises(ValueError, match=r"valid range \[1, 3\]") as err:
            evaluate_policies(vp, vt, tp, tt, np.array([1.0, 2.0, 3.0]), [2.0, bad])
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown policies"):
        evaluate_policies(vp, vt, tp, tt, np.array([1.0, 2.0, 3.0]), [2.0], policies=("pabee",))
    with pytest.raises(ValueError, match="assignment"):
        SchedulerSettings(assignment="softplus")


def test_table_columns():
    (vp, vt), (tp, tt) = synthetic(0, n=300), synthetic(1, n=300)
    settings = SchedulerSettings(**{**FAST, "epochs": 4, "restarts": 1})
    table = evaluate_policies(vp, vt, tp, tt, np.array([1.0, 2.0, 3.0]), [1.5, 2.5], settings)
    assert len(table) == 2 * (1 + 2 + 2 + 2)
    assert list(table.columns[:10]) == ["policy", "budget", "protocol", "accuracy", "cost", "frac_exit1",
                                        "frac_exit2", "frac_exit3", "frac_none", "planned_cost"]
    assert table.filter(like="frac_").sum(axis=1).to_numpy() == pytest.approx(1.0)
    assert table.loc[table["policy"] == "eenet", "thresholds"].str.count(",").eq(2).all()
