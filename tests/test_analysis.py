"""analysis/: budgeted thresholds worked out by hand, curves, run loading from sacred observers, the CLI."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.anytime import anytime_curve
from analysis.budgeted import (
    ALWAYS,
    NEVER,
    accuracy_at_budget,
    apply_thresholds,
    budgeted_curve,
    budgeted_points,
    exit_fractions,
    expected_cost,
    fit_thresholds,
    max_prob,
    neg_entropy,
)
from analysis.exit_record import ExitRecord


# ------------------------------------------------------------------------------------ hand-made thresholds
# 3 exits, 10 validation samples s0..s9; target fractions pi = (0.3, 0.2, 0.5).
#   exit 1: m1 = floor(10 * 0.3) = 3. Confidences by decreasing value: s0 0.9, s1 0.8, s2 0.8, s3 0.8, ...
#           the 3rd is 0.8 -> T1 = 0.8, and every sample with conf >= 0.8 exits: s0..s3 (4 > m1, a tie).
#   exit 2: m2 = floor(10 * 0.2) = 2. Not-yet-exited s4..s9 have 0.5 0.7 0.6 0.2 0.3 0.1: the 2nd largest is
#           0.6 -> T2 = 0.6 (s5, s6 exit). Counting the exited s0..s3 too (0.99 0.98 0.97 0.96) would
#           have given 0.98 instead.
#   exit 3: T3 = -1e8, the rest (s4, s7, s8, s9) exit there.
VAL_CONF = np.array([
    [0.9, 0.8, 0.8, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
    [0.99, 0.98, 0.97, 0.96, 0.5, 0.7, 0.6, 0.2, 0.3, 0.1],
    [0.5] * 10,
])
PI = np.array([0.3, 0.2, 0.5])


def test_fit_thresholds_by_hand():
    np.testing.assert_array_equal(fit_thresholds(VAL_CONF, PI), [0.8, 0.6, ALWAYS])
    # The order of tied samples does not matter: reversing the samples gives the same thresholds.
    np.testing.assert_array_equal(fit_thresholds(VAL_CONF[:, ::-1], PI), [0.8, 0.6, ALWAYS])


def test_fit_thresholds_m_zero_and_too_few_left():
    # pi1 = 0.05 -> m1 = floor(0.5) = 0: T1 = +1e8, nobody exits at 1. Then m2 = floor(4.5) = 4 over all ten
    # samples at exit 2: 0.99 0.98 0.97 0.96 -> T2 = 0.96.
    np.testing.assert_array_equal(fit_thresholds(VAL_CONF, [0.05, 0.45, 0.5]), [NEVER, 0.96, ALWAYS])
    # m1 = 5 with eight samples tied at 0.9: T1 = 0.9 and all eight exit; m2 = 4 but only two are left,
    # so T2 = +1e8 and the two go on to the last exit.
    conf = np.array([[0.9] * 8 + [0.1, 0.1], np.linspace(0.1, 1.0, 10), np.zeros(10)])
    np.testing.assert_array_equal(fit_thresholds(conf, [0.5, 0.4, 0.1]), [0.9, NEVER, ALWAYS])
    # a single exit: everybody leaves there
    np.testing.assert_array_equal(fit_thresholds(VAL_CONF[:1], [1.0]), [ALWAYS])


def test_apply_thresholds_and_cost_by_hand():
    # Thresholds (0.8, 0.6, -1e8) on 5 test samples:
    #   t0: 0.85 >= 0.8 -> exit 1      t1: 0.8 >= 0.8 (tie counts) -> exit 1
    #   t2: 0.5 < 0.8, 0.6 >= 0.6 -> exit 2      t3: 0.2, 0.59 -> exit 3      t4: 0.7, 0.9 -> exit 2
    # Costs (10, 30, 60) MACs: (10 + 10 + 30 + 60 + 30) / 5 = 28.
    test_conf = np.array([[0.85, 0.8, 0.5, 0.2, 0.7], [0.1, 0.1, 0.6, 0.59, 0.9], [0.0] * 5])
    exit_at = apply_thresholds(test_conf, fit_thresholds(VAL_CONF, PI))
    np.testing.assert_array_equal(exit_at, [0, 0, 1, 2, 1])
    assert expected_cost(exit_at, [10, 30, 60]) == pytest.approx(28.0)
    # Correct answers: exit 1 right on t0 only, exit 2 right on t2, exit 3 right on t3.
    # Exits taken: t0@1 right, t1@1 wrong, t2@2 right, t3@3 right, t4@2 wrong -> accuracy 3/5.
    correct = np.array([[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=bool)
    # p with pi = (0.3, 0.2, 0.5) is not on the grid; the budgeted_points path is checked with p = 1
    # (pi = 1/3 each): m1 = 3 -> T1 = 0.8 (s0..s3 exit); m2 = 3 -> remaining 0.7 0.6 0.5 -> T2 = 0.5
    #   t0, t1 exit 1; t2 (0.6), t3 (0.59), t4 (0.9) exit 2 -> cost (10+10+30+30+30)/5 = 22,
    #   correct: t0 yes, t1 no, t2 yes, t3 no, t4 no -> 2/5.
    curve = budgeted_points(VAL_CONF, test_conf, correct, np.array([10.0, 30.0, 60.0]), ps=[1.0])
    row = curve.iloc[0]
    assert row["accuracy"] == pytest.approx(0.4)
    assert row["cost_macs"] == pytest.approx(22.0)
    np.testing.assert_allclose(row[["frac_exit1", "frac_exit2", "frac_exit3"]].to_numpy(float), [0.4, 0.6, 0.0])


def test_exit_fractions():
    for p in (0.05, 0.5, 1.0, 1.7, 2.0):
        pi = exit_fractions(p, 7)
        assert pi.sum() == pytest.approx(1.0)
        k = np.arange(1, 8)
        np.testing.assert_allclose(pi, p ** k / (p ** k).sum())
    np.testing.assert_allclose(exit_fractions(1.0, 4), [0.25] * 4)
    assert exit_fractions(0.5, 3)[0] > exit_fractions(0.5, 3)[-1]
    with pytest.raises(ValueError):
        exit_fractions(0.0, 3)


def test_confidences():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(max_prob(logits), [np.exp(2) / (np.exp(2) + 2), 1 / 3])
    np.testing.assert_allclose(neg_entropy(logits)[1], -np.log(3))
    assert neg_entropy(logits)[0] > neg_entropy(logits)[1]


# ------------------------------------------------------------------------------------ records and curves
def make_record(seed: int = 0, n_exits: int = 4, n: int = 600, n_classes: int = 10, late_acc: float = 1.0,
                macs=None) -> ExitRecord:
    """Early exits guess at random; the last exit is right with probability ``late_acc``."""
    rng = np.random.default_rng(seed)

    def split(m):
        targets = rng.integers(0, n_classes, m)
        logits = rng.normal(size=(n_exits, m, n_classes)).astype(np.float32)
        right = rng.random(m) < late_acc
        logits[-1, np.arange(m), targets] += np.where(right, 6.0, -6.0)
        return logits, targets

    val_logits, val_targets = split(n)
    test_logits, test_targets = split(n)
    macs = np.asarray(macs if macs is not None else 1e6 * np.arange(1, n_exits + 1) ** 2, dtype=np.float64)
    return ExitRecord(val_logits, val_targets, test_logits, test_targets, macs,
                      params=np.arange(1, n_exits + 1) * 1000.0, latency_ms=np.full(n_exits, np.nan))


def test_budgeted_curve_rises_with_cost():
    record = make_record()
    curve = budgeted_curve(record)
    assert len(curve) == 40 and curve["p"].iloc[0] == pytest.approx(0.05) and curve["p"].iloc[-1] == pytest.approx(2.0)
    assert (curve["cost_macs"] >= record.macs[0] - 1e-6).all() and (curve["cost_macs"] <= record.macs[-1] + 1e-6).all()
    assert curve.filter(like="frac_exit").sum(axis=1).to_numpy() == pytest.approx(1.0)
    by_cost = curve.sort_values("cost_macs")
    assert np.corrcoef(by_cost["cost_macs"], by_cost["accuracy"])[0, 1] > 0.9
    assert curve["accuracy"].iloc[-1] > curve["accuracy"].iloc[0] + 0.2
    # the expected cost really is sum_k frac_k * macs_k
    fr = curve[[f"frac_exit{k}" for k in range(1, 5)]].to_numpy()
    np.testing.assert_allclose(fr @ record.macs, curve["cost_macs"])


def test_budgeted_curve_matches_manual_pipeline_and_entropy_option():
    record = make_record(seed=3, n_exits=3, n=200)
    soft = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
    val_conf, test_conf = soft(record.val_logits).max(-1), soft(record.test_logits).max(-1)
    p = 0.7
    exit_at = apply_thresholds(test_conf, fit_thresholds(val_conf, exit_fractions(p, 3)))
    preds = record.test_logits.argmax(-1)[exit_at, np.arange(200)]
    row = budgeted_curve(record, ps=[p]).iloc[0]
    assert row["accuracy"] == pytest.approx((preds == record.test_targets).mean())
    assert row["cost_macs"] == pytest.approx(record.macs[exit_at].mean())
    ent = budgeted_curve(record, ps=[p], confidence="entropy")
    assert set(ent.columns) == set(budgeted_curve(record, ps=[p]).columns)
    with pytest.raises(ValueError):
        budgeted_curve(record, confidence="nope")


def test_accuracy_at_budget():
    curve = pd.DataFrame({"cost_macs": [30.0, 10.0, 20.0], "accuracy": [0.9, 0.5, 0.7]})
    assert accuracy_at_budget(curve, 15.0) == pytest.approx(0.6)
    assert accuracy_at_budget(curve, 30.0) == pytest.approx(0.9)
    assert np.isnan(accuracy_at_budget(curve, 5.0)) and np.isnan(accuracy_at_budget(curve, 31.0))
    np.testing.assert_allclose(accuracy_at_budget(curve, [10.0, 25.0]), [0.5, 0.8])


def test_anytime_curve():
    record = make_record(n_exits=3)
    curve = anytime_curve(record)
    assert list(curve.columns) == ["exit", "macs", "params", "latency_ms", "val_acc", "test_acc"]
    np.testing.assert_array_equal(curve["exit"], [1, 2, 3])
    np.testing.assert_allclose(curve["test_acc"], record.accuracy("test"))
    assert curve["test_acc"].iloc[-1] == 1.0


# ------------------------------------------------------------------------------------ sacred runs
def run_trivial_experiment(observers, runs, uids=None, uid_folders: bool = True) -> list:
    """Really run a trivial sacred Experiment, watched by ``observers`` (one or a list), once per
    (variant, seed, record) in ``runs``.

    With ``uids``, run i carries uid ``uids[i]`` the way the experiments record it (``meta.uid``, ``info.uid``,
    and with ``uid_folders`` a run id, hence FileStorageObserver folder, named after it); ``None`` keeps
    sacred's numeric run id.
    """
    from sacred import Experiment

    ex = Experiment("trivial_exits", save_git_info=False)
    ex.observers.extend(observers if isinstance(observers, list) else [observers])

    @ex.config
    def config():
        variant = "ce"  # noqa: F841
        model = {"name": "toy", "exits": 4}  # noqa: F841

    @ex.main
    def main(_run, variant):  # the record to attach comes as meta info: a path is no recipe setting
        record_path = _run.meta_info.get("record_path")
        _run.info["variant"] = variant
        for step in range(3):
            _run.log_scalar("train.loss", 1.0 / (step + 1), step)
            _run.log_scalar("val.acc.exit1", 0.1 * step, step)
        if record_path:
            accs = ExitRecord.load(record_path).accuracy("test")
            _run.info["exits"] = {**{f"test_acc_exit{k + 1}": float(a) for k, a in enumerate(accs)},
                                  "test_acc_mean": float(accs.mean())}
            _run.add_artifact(record_path, name="exit_record.npz")
        return 0

    finished = []
    for (variant, seed, path), uid in zip(runs, uids or [None] * len(runs)):
        meta = {"record_path": str(path or "")} | ({} if uid is None else {"uid": uid})
        finished.append(ex.run(config_updates={"seed": seed, "variant": variant}, meta_info=meta,
                               info={} if uid is None else {"uid": uid},
                               options={"--loglevel": "ERROR", "--capture": "no", "--id": uid_folders and uid}))
    return finished


@pytest.fixture
def file_runs(tmp_path):
    """A FileStorageObserver folder with ce seeds 1 and 2, distillation seed 1, and one run without a record."""
    from sacred.observers import FileStorageObserver

    records = {}
    specs = []
    for variant, seed, late in (("ce", 1, 0.9), ("ce", 2, 0.8), ("distillation", 1, 1.0)):
        rec = make_record(seed=seed + (10 if variant == "distillation" else 0), late_acc=late)
        path = rec.save(tmp_path / "records" / f"{variant}-{seed}.npz")
        records[(variant, seed)] = rec
        specs.append((variant, seed, path))
    specs.append(("ce", 3, None))
    runs_dir = tmp_path / "runs"
    run_trivial_experiment(FileStorageObserver(str(runs_dir)), specs)
    return runs_dir, records


def test_load_runs_file_storage(file_runs):
    from analysis.runs import AnalysisError, exit_record_loader, load_exit_record, load_metrics, load_runs

    runs_dir, records = file_runs
    runs = load_runs(runs_dir)
    assert len(runs) == 4
    assert runs["run_id"].tolist() == [1, 2, 3, 4]
    assert runs["experiment"].eq("trivial_exits").all() and runs["status"].eq("COMPLETED").all()
    assert runs["variant"].tolist() == ["ce", "ce", "distillation", "ce"]
    assert runs["seed"].tolist() == [1, 2, 1, 3]
    assert runs["has_exit_record"].tolist() == [True, True, True, False]
    assert runs["uid"].isna().all()  # numeric folders from before run uids
    assert runs["config.model.name"].eq("toy").all() and runs["config.model.exits"].eq(4).all()
    assert pd.api.types.is_datetime64_any_dtype(runs["start_time"])
    rec = load_exit_record(runs_dir, 2)
    np.testing.assert_array_equal(rec.test_logits, records[("ce", 2)].test_logits)
    np.testing.assert_array_equal(exit_record_loader(runs.iloc[2])().macs, records[("distillation", 1)].macs)
    with pytest.raises(AnalysisError, match="no exit_record.npz artifact"):
        load_exit_record(runs_dir, 4)
    metrics = load_metrics(runs_dir, 1)
    assert list(metrics.columns) == ["name", "step", "value"]
    assert metrics[metrics["name"] == "train.loss"]["value"].tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    assert load_runs(runs_dir, experiment="other").empty
    assert load_runs(runs_dir, status="FAILED").empty
    with pytest.raises(AnalysisError, match="does-not-exist"):
        load_runs(runs_dir / "does-not-exist")


def test_cli_curves_match_direct_computation(file_runs, tmp_path, capsys):
    from analysis.__main__ import main

    runs_dir, records = file_runs
    out = tmp_path / "out"
    assert main(["curves", str(runs_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ce" in printed and "distillation" in printed and "budget@" in printed
    for name in ("anytime.csv", "budgeted.csv", "anytime.png", "budgeted.png"):
        assert (out / name).stat().st_size > 0
    anytime = pd.read_csv(out / "anytime.csv")
    ce = anytime[anytime["variant"] == "ce"].sort_values("exit")
    accs = np.stack([records[("ce", s)].accuracy("test") for s in (1, 2)])
    np.testing.assert_allclose(ce["test_acc_mean"], accs.mean(0))
    np.testing.assert_allclose(ce["test_acc_std"], accs.std(0, ddof=1))
    assert ce["n_runs"].eq(2).all()
    np.testing.assert_allclose(ce["macs_mean"], records[("ce", 1)].macs)
    budgeted = pd.read_csv(out / "budgeted.csv")
    ce_b = budgeted[budgeted["variant"] == "ce"].sort_values("p")
    direct = [budgeted_curve(records[("ce", s)]) for s in (1, 2)]
    np.testing.assert_allclose(ce_b["accuracy_mean"], (direct[0]["accuracy"] + direct[1]["accuracy"]) / 2)
    np.testing.assert_allclose(ce_b["cost_macs_mean"], (direct[0]["cost_macs"] + direct[1]["cost_macs"]) / 2)
    distil = budgeted[budgeted["variant"] == "distillation"]
    assert distil["n_runs"].eq(1).all() and distil["accuracy_std"].isna().all()

    assert main(["table", str(runs_dir), "--variants", "distillation", "--budgets", "5,9"]) == 0
    printed = capsys.readouterr().out
    assert "distillation" in printed and "budget@5M" in printed and "budget@9M" in printed


def test_cli_errors_name_what_was_searched(file_runs, tmp_path, capsys):
    from analysis.__main__ import main

    runs_dir, _ = file_runs
    assert main(["table", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["table", str(runs_dir), "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no runs found" in err and "nope" in err
    assert main(["table", str(runs_dir), "--variants", "ce", "--status", "FAILED"]) == 2
    assert "no runs found" in capsys.readouterr().err


def test_unreachable_mongo_is_a_clear_error(monkeypatch):
    import analysis.runs as runs_mod

    monkeypatch.setattr(runs_mod, "MONGO_TIMEOUT_MS", 200)
    with pytest.raises(runs_mod.AnalysisError, match=r"could not reach MongoDB at mongodb://127\.0\.0\.1:9/"):
        runs_mod.load_runs("mongodb://127.0.0.1:9/nodb")
    assert runs_mod.mongo_url("localhost:27017:mydb") == ("mongodb://localhost:27017/", "mydb")
    assert runs_mod.mongo_url("mongodb://h:1/?authSource=admin")[1] == "sacred"


# ------------------------------------------------------------------------------------ bad runs, listing, --where
GOOD, CORRUPT, EMPTY_VAL, MISSING = "20261125-110512-aaaaaa", "20261125-110513-bbbbbb", "20261125-110514-cccccc", \
    "20261125-110515-dddddd"


@pytest.fixture
def mixed_runs(tmp_path):
    """Runs named by uid: two good ones (seeds 1, 2), a truncated exit record, an empty validation split, and
    an exit record that is listed but gone. Returns (folder, folder holding copies of the two good runs)."""
    import shutil

    from sacred.observers import FileStorageObserver

    empty_val = make_record(seed=4)
    empty_val = ExitRecord(empty_val.val_logits[:, :0], empty_val.val_targets[:0], empty_val.test_logits,
                           empty_val.test_targets, empty_val.macs, empty_val.params, empty_val.latency_ms)
    records = [make_record(seed=1, late_acc=0.9), make_record(seed=2, late_acc=0.8), make_record(seed=3),
               empty_val, make_record(seed=5)]
    specs = [("ce", i + 1, r.save(tmp_path / "records" / f"{i}.npz")) for i, r in enumerate(records)]
    uids = [GOOD, GOOD[:-1] + "2", CORRUPT, EMPTY_VAL, MISSING]
    runs_dir = tmp_path / "runs"
    run_trivial_experiment(FileStorageObserver(str(runs_dir)), specs, uids)
    corrupt = runs_dir / CORRUPT / "exit_record.npz"
    corrupt.write_bytes(corrupt.read_bytes()[:1000])
    (runs_dir / MISSING / "exit_record.npz").unlink()
    good_dir = tmp_path / "good"
    for uid in uids[:2]:
        shutil.copytree(runs_dir / uid, good_dir / uid)
    return runs_dir, good_dir


def test_one_bad_run_does_not_break_the_analysis(mixed_runs, capsys):
    from analysis.__main__ import main
    from analysis.curves import compute_curves
    from analysis.runs import SkippedRunWarning, load_runs

    runs_dir, good_dir = mixed_runs
    assert main(["table", str(good_dir), "--budgets", "5,9"]) == 0
    good_table = capsys.readouterr().out.splitlines()[1:]
    assert main(["table", str(runs_dir), "--budgets", "5,9"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"2 runs with exit records from {runs_dir} (3 unusable skipped)"
    assert lines[1:] == good_table
    warned = [line for line in captured.err.splitlines() if line.startswith("warning: skipped run")]
    assert len(warned) == 3
    for uid, why in ((CORRUPT, "corrupt"), (EMPTY_VAL, "no validation samples"), (MISSING, "cannot be read")):
        assert any(uid in line and why in line for line in warned), (uid, warned)

    with pytest.warns(SkippedRunWarning) as caught:
        curves = compute_curves(load_runs(runs_dir))
    assert sorted(curves.skipped["uid"]) == sorted([CORRUPT, EMPTY_VAL, MISSING]) and len(caught) == 3
    assert curves.anytime["n_runs"].eq(2).all()

    assert main(["curves", str(runs_dir), "--where", "seed=3", "--out", str(runs_dir.parent / "fig")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[-1].startswith("error: none of the 1 runs with an exit record could be analysed")
    assert CORRUPT in err[-1]


def test_runs_listing_and_uid_column(mixed_runs, capsys):
    from analysis.__main__ import main
    from analysis.runs import SkippedRunWarning, load_runs

    runs_dir, _ = mixed_runs
    runs = load_runs(runs_dir)
    assert runs["uid"].tolist() == runs["run_id"].tolist() and GOOD in runs["uid"].tolist()
    assert main(["runs", str(runs_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"5 runs in {runs_dir}"
    header = out[1].split()
    assert header[:7] == ["id", "uid", "experiment", "variant", "status", "start", "seed"]
    assert header[-2:] == ["test_acc_mean%", "test_acc_last%"]
    good = next(line for line in out if line.startswith(GOOD))
    accs = make_record(seed=1, late_acc=0.9).accuracy("test")
    assert f"{100 * accs.mean():.2f}" in good and f"{100 * accs[-1]:.2f}" in good and "COMPLETED" in good

    (runs_dir / CORRUPT / "config.json").write_text("{not json")
    assert main(["runs", str(runs_dir), "--where", "seed=2", "--status", "COMPLETED"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"1 runs in {runs_dir}"
    assert CORRUPT in captured.err and "config.json" in captured.err
    with pytest.warns(SkippedRunWarning, match=CORRUPT):
        assert len(load_runs(runs_dir)) == 4


def test_where_filter():
    from analysis.runs import AnalysisError, filter_where, parse_where

    where = parse_where(["data.name=cifar100", "seed=1", "distillation=false", "tag=a=b", "lr=0.1"])
    assert where == {"data.name": "cifar100", "seed": 1, "distillation": False, "tag": "a=b", "lr": 0.1}
    runs = pd.DataFrame({
        "run_id": [1, 2, 3, 4],
        "config.seed": [1, 2, 1, np.nan],
        "config.data.name": ["cifar100", "cifar100", "cifar10", "cifar100"],
        "config.distillation": [False, False, 0, True],
    })
    assert filter_where(runs, {"seed": 1})["run_id"].tolist() == [1, 3]
    assert filter_where(runs, parse_where(["data.name=cifar100", "seed=1"]))["run_id"].tolist() == [1]
    assert filter_where(runs, {"config.distillation": False})["run_id"].tolist() == [1, 2]  # 0 is not false
    assert filter_where(runs, {"distillation": 0})["run_id"].tolist() == [3]
    with pytest.raises(AnalysisError, match="unknown config key 'data.nme'.*close matches: data.name"):
        filter_where(runs, {"data.nme": "x"})
    with pytest.raises(AnalysisError, match="KEY=VALUE"):
        parse_where(["seed"])


def test_cli_where(file_runs, capsys):
    from analysis.__main__ import main

    runs_dir, _ = file_runs
    assert main(["table", str(runs_dir), "--where", "model.exits=4", "--where", "seed=1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 runs with exit records") and "distillation" in out
    assert main(["runs", str(runs_dir), "--where", "variant=distillation"]) == 0
    assert capsys.readouterr().out.startswith("1 runs in")
    assert main(["curves", str(runs_dir), "--where", "model.nam=toy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'model.nam'" in err and "model.name" in err
    assert main(["table", str(runs_dir), "--where", "seed=7"]) == 2
    assert "no runs found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ MongoDB
def test_load_runs_mongodb(mongo_url):
    from sacred.observers import MongoObserver

    from analysis.runs import load_exit_record, load_metrics, load_runs

    records = {seed: make_record(seed=seed, n_exits=3, n=100) for seed in (5, 6)}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        specs = [("distillation", s, r.save(Path(tmp) / f"{s}.npz")) for s, r in records.items()]
        run_trivial_experiment(MongoObserver(mongo_url, db_name="multiexit_test", serverSelectionTimeoutMS=3000), specs)
    source = mongo_url.rstrip("/") + "/multiexit_test"
    runs = load_runs(source, experiment="trivial_exits")
    assert runs["seed"].tolist() == [5, 6] and runs["variant"].eq("distillation").all()
    assert runs["has_exit_record"].all() and runs["config.model.name"].eq("toy").all()
    for run_id, seed in zip(runs["run_id"], (5, 6)):
        rec = load_exit_record(source, run_id)
        np.testing.assert_array_equal(rec.val_logits, records[seed].val_logits)
        np.testing.assert_array_equal(rec.macs, records[seed].macs)
    metrics = load_metrics(source, runs["run_id"].iloc[0])
    assert metrics[metrics["name"] == "val.acc.exit1"]["value"].tolist() == pytest.approx([0.0, 0.1, 0.2])

    from analysis.__main__ import main

    assert main(["table", source, "--experiment", "trivial_exits"]) == 0
    assert main(["runs", source, "--where", "seed=6"]) == 0


def test_final_exit_figure_shows_each_groups_last_exit():
    from analysis.plots import plot_final_exit

    anytime = pd.DataFrame({
        "experiment": ["e"] * 5, "variant": ["a", "a", "b", "b", "b"], "exit": [1, 2, 1, 2, 3],
        "n_runs": [3] * 5, "test_acc_mean": [0.5, 0.8, 0.4, 0.6, 0.7], "test_acc_std": [0.1, 0.02, 0.1, 0.1, 0.03],
    })
    fig = plot_final_exit(anytime, group_by=("experiment", "variant"))
    widths = sorted(round(bar.get_width(), 6) for bar in fig.axes[0].patches)
    assert widths == [70.0, 80.0]  # exit 2 of 'a', exit 3 of 'b'
