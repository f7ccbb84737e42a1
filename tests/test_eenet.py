"""EENet's experiment: stage train with EENet's objective, stage schedule on a run's exit record (EENet's or
another experiment's), the budget checks that refuse before any record, and the curves of policy runs."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_fast
from analysis.__main__ import main as analysis_main
from analysis.exit_record import ExitRecord
from experiments import eenet, imta
from experiments.validation import ConfigError


def run(experiment, root: Path, **updates):
    return run_fast(experiment, root, **{"seed": 2, **updates})


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("eenet")
    trained = run(eenet, root, stage="train", train={"epochs": 5})
    scheduled = run(eenet, root, stage="schedule", train_run=trained.info["uid"])
    return root, trained, scheduled


def test_train_stage_uses_eenets_objective_and_leaves_an_exit_record(chain):
    root, trained, _ = chain
    assert trained.status == "COMPLETED" and trained.info["variant"] == "resnet8"
    assert (Path(trained.info["snapshot_dir"]) / "exit_record.npz").is_file()
    metrics = json.loads((root / "runs" / trained.info["uid"] / "metrics.json").read_text())
    assert metrics["train.distilling"]["values"] == [0.0] * 4 + [1.0]  # KD once the 0-based epoch > 0.75 x 5


def test_schedule_stage_records_every_policy_at_every_budget(chain):
    root, trained, scheduled = chain
    assert scheduled.status == "COMPLETED" and scheduled.info["variant"] == "schedule: resnet8"
    assert scheduled.info["parent"]["uid"] == trained.info["uid"]
    rows = pd.DataFrame(scheduled.info["policies"])
    # fast: budgets at 50 % and 80 %; EENet one fit each, the three baselines "over" and "under" each
    assert len(rows) == 2 * (1 + 3 * 2)
    assert sorted(rows["budget_fraction"].round(6).unique()) == [0.5, 0.8]
    full = ExitRecord.load(Path(trained.info["snapshot_dir"]) / "exit_record.npz").macs[-1]
    assert sorted(rows["budget"].unique()) == pytest.approx([0.5 * full, 0.8 * full])  # fractions of the full MACs
    fractions = rows[[c for c in rows.columns if c.startswith("frac_exit")]]
    assert fractions.sum(axis=1).to_numpy() == pytest.approx(1.0)  # every test sample exits somewhere
    record = ExitRecord.load(Path(trained.info["snapshot_dir"]) / "exit_record.npz")
    by_hand = [sum(f * m for f, m in zip(row, record.latency_ms)) for row in fractions.to_numpy()]
    assert rows["cost_ms"].to_numpy() == pytest.approx(by_hand)  # the cost in the other unit
    assert rows["cost_macs"].to_numpy() == pytest.approx(rows["cost"].to_numpy())  # cost=macs: the same
    saved = pd.read_csv(Path(scheduled.info["snapshot_dir"]) / "policies.csv")
    assert saved["accuracy"].to_numpy() == pytest.approx(rows["accuracy"].to_numpy())


@pytest.mark.parametrize("updates, message", [
    ({"budgets": [0.05]}, r"budgets \[.*\] lie outside \[.*\], the costs of exit 1 and of the full network"),
    ({"budgets": None}, "stage=schedule needs budgets="),
    ({"cost": "table", "cost_table": [1.0, 2.0]}, r"cost=table needs cost_table with one cumulative cost per exit \(3\)"),
])
def test_bad_schedules_are_refused_before_any_record(chain, updates, message):
    root, trained, _ = chain
    before = sorted((root / "runs").iterdir())
    with pytest.raises(ConfigError, match=message):
        run(eenet, root, stage="schedule", train_run=trained.info["uid"], **updates)
    assert sorted((root / "runs").iterdir()) == before


def test_a_cost_table_sets_the_budget_unit(chain):
    root, trained, _ = chain
    scheduled = run(eenet, root, stage="schedule", train_run=trained.info["uid"], cost="table",
                    cost_table=[2.31, 4.15, 4.93], budgets=[2.5, 4.0], relative_budgets=False,
                    policies=["max_prob", "patience"])
    rows = pd.DataFrame(scheduled.info["policies"])
    assert sorted(rows["budget"].unique()) == [2.5, 4.0] and scheduled.info["cost_unit"] == "table units"
    assert set(rows["policy"]) == {"max_prob", "patience"}
    assert rows["cost"].between(2.31, 4.93).all()


def test_the_scheduler_runs_on_another_experiments_exit_record(tmp_path):
    trained = run(imta, tmp_path, stage="ge")
    scheduled = run(eenet, tmp_path, stage="schedule", train_experiment="imta", train_run=trained.info["uid"],
                    policies=["eenet", "entropy"])
    assert scheduled.info["parent"]["uid"] == trained.info["uid"]
    assert set(pd.DataFrame(scheduled.info["policies"])["policy"]) == {"eenet", "entropy"}


def test_curves_draw_the_policies_of_schedule_runs(chain, tmp_path, capsys):
    root, _, _ = chain
    assert analysis_main(["curves", str(root / "runs"), "--experiment", "eenet", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "policies.png").stat().st_size > 0
    table = pd.read_csv(tmp_path / "policies.csv")
    assert {"eenet", "max_prob", "entropy", "patience"} <= set(table["policy"])
    assert "runs with exit-policy results" in capsys.readouterr().out


def test_a_tiny_bert_trains_on_text_and_is_scheduled(tmp_path, text_root, tokenizer_dir):
    """EENet's BERT path end to end on the tiny AG News files conftest writes: 4 exits, costs growing with
    depth, every policy fitted on the record."""
    text = dict(name="ag_news", root=text_root, tokenizer=tokenizer_dir, download=False, val_size=12,
                batch_size=8, eval_batch_size=16, max_length=24, n_per_class=None)
    bert = dict(vocab_size=32, hidden_size=16, layers=4, heads=2, intermediate_size=32, max_length=24,
                exits=[1, 2, 3, 4])
    trained = run(eenet, tmp_path, stage="train", data=text, model=dict(arch="bert_exits", bert=bert),
                  optim=dict(lr=0.05))
    record = ExitRecord.load(Path(trained.info["snapshot_dir"]) / "exit_record.npz")
    assert record.num_exits == 4 and record.test_logits.shape[1:] == (12, 4)  # AG News: 4 classes
    assert (record.macs[1:] > record.macs[:-1]).all() and (record.latency_ms > 0).all()
    scheduled = run(eenet, tmp_path, stage="schedule", train_run=trained.info["uid"])
    assert set(pd.DataFrame(scheduled.info["policies"])["policy"]) == {"eenet", "max_prob", "entropy", "patience"}
