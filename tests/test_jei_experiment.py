"""JEI-DNN's experiment: stage transfer, stage dynn on it (frozen backbone, metrics, exact resume), the checks that
refuse before any record, and the trade-off curve of the analysis command."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import run_fast
from analysis.__main__ import main as analysis_main
from experiments import jei
from experiments.engine.checkpoint import load_snapshot
from experiments.validation import ConfigError
from losses.jei import JEIObjective


def run(root: Path, **updates):
    return run_fast(jei, root, **{"seed": 3, **updates})


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("jei")
    backbone = run(root, stage="transfer", train={"epochs": 4})
    low = run(root, stage="dynn", backbone_run=backbone.info["uid"], ce_ic_tradeoff=0.05)
    high = run(root, stage="dynn", backbone_run=backbone.info["uid"], ce_ic_tradeoff=2.0)
    return root, backbone, low, high


def test_dynn_leaves_the_backbone_untouched_weights_and_statistics(chain):
    _, backbone, low, _ = chain
    before = load_snapshot(Path(backbone.info["snapshot_dir"]) / "final.pt")["model"]
    after = load_snapshot(Path(low.info["snapshot_dir"]) / "final.pt")["model"]
    assert {k for k in after if k.startswith("backbone.")} == {f"backbone.{k}" for k in before}
    for name, value in before.items():  # BatchNorm's running statistics included
        assert torch.equal(after[f"backbone.{name}"], value), name


def test_dynn_records_jeis_metrics_and_its_parent(chain):
    _, backbone, low, _ = chain
    assert low.status == "COMPLETED" and low.info["parent"]["uid"] == backbone.info["uid"]
    assert low.info["variant"] == "resnet8+jei lambda=0.05"
    summary = low.info["jei"]
    assert summary["tradeoff"] == 0.05 and summary["backbone"] == "resnet8"
    assert 0 < summary["macs_ratio"] <= 1 and 0 <= summary["accuracy"] <= 1
    report = json.loads((Path(low.info["snapshot_dir"]) / jei.JEI_FILE).read_text())
    assert sum(report["exit_rates"]) == pytest.approx(1.0) and len(report["exit_rates"]) == 3
    assert report["normalised_costs"][-1] == 1.0
    conformal = pd.DataFrame(report["conformal"])
    assert set(conformal["strategy"]) == {"general", "gated", "gated_all", "gated_strict"}
    assert sorted(conformal["alpha"].unique()) == pytest.approx([0.01 + 0.005 * i for i in range(9)])
    # the epoch chosen is a joint epoch (the fast config warms up for one)
    metrics = json.loads((Path(low.observers[0].basedir) / str(low._id) / "metrics.json").read_text())
    assert metrics["train.warmup"]["values"][0] == 1.0 and low.result["selected_epoch"] >= 2


def test_a_dynn_stopped_mid_epoch_resumes_to_the_same_weights(chain, tmp_path, monkeypatch):
    """A SIGTERM in the middle of a joint epoch (phases alternate every batch) then a resume, against straight."""
    root, backbone, _, _ = chain
    common = dict(stage="dynn", backbone_run=backbone.info["uid"], ce_ic_tradeoff=0.5, train={"epochs": 4})
    straight = run(root, **common)
    original, calls = JEIObjective.after_batch, []

    def stop_in_epoch_three(self, outputs):
        original(self, outputs)
        calls.append(int(self.epoch))
        if int(self.epoch) == 2 and int(self.batch) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(JEIObjective, "after_batch", stop_in_epoch_three)
        with pytest.raises(KeyboardInterrupt):
            run(root, **common)
    killed = jei.ex.current_run
    assert load_snapshot(Path(killed.info["snapshot_dir"]) / "last.pt")["loss"]["batch"] == 3
    resumed = run(root, **{**common, "train": {**common["train"], "resume": killed.info["uid"]}})
    a = load_snapshot(Path(straight.info["snapshot_dir"]) / "last.pt")
    b = load_snapshot(Path(resumed.info["snapshot_dir"]) / "last.pt")
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-6, atol=1e-7, msg=name)
    for name in ("pos_weights", "joint_epochs", "warmup_epochs"):
        assert torch.equal(b["loss"][name], a["loss"][name]), name
    assert resumed.info["jei"] == straight.info["jei"]


@pytest.mark.parametrize("updates, message", [
    (dict(train={"epochs": 1}), "leaves no joint epoch"),
    (dict(cost_convention="released"), "cost_convention=released"),
    (dict(backbone_run=None), "backbone_run is needed"),
])
def test_bad_dynn_settings_are_refused_before_any_record(chain, updates, message):
    root, backbone, _, _ = chain
    before = sorted((root / "runs").iterdir())
    with pytest.raises((ConfigError, ValueError), match=message):
        run(root, stage="dynn", **{"backbone_run": backbone.info["uid"], **updates})
    assert sorted((root / "runs").iterdir()) == before


def test_a_missing_checkpoint_is_one_line_before_any_record(tmp_path):
    with pytest.raises(ConfigError, match="backbone_weights: no file"):
        run(tmp_path, stage="transfer", backbone_weights=str(tmp_path / "71.7_T2T_ViT_7.pth.tar"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_curves_draw_the_trade_off_against_thresholds(chain, tmp_path, capsys):
    root, _, low, high = chain
    assert analysis_main(["curves", str(root / "runs"), "--experiment", "jei", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "trade_off.csv")
    assert (tmp_path / "trade_off.png").stat().st_size > 0
    assert {0.05, 2.0} <= set(table["tradeoff"])
    row = table.set_index("tradeoff").loc[0.05]
    assert row["accuracy_mean"] == pytest.approx(low.info["jei"]["accuracy"])
    assert "JEI-DNN runs" in capsys.readouterr().out


def test_predict_exits_by_the_runs_gates_as_the_record_says(chain, capsys):
    from experiments.predict import main as predict_main

    root, _, low, _ = chain
    code = predict_main([low.info["uid"], "--experiment", "jei", "--gates", "--snapshot-root",
                         str(root / "snapshots"), "--runs", str(root / "runs"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "JEI-DNN's gates" in out
    report = json.loads((Path(low.info["snapshot_dir"]) / jei.JEI_FILE).read_text())
    assert f"top-1 {100 * low.info['jei']['accuracy']:.2f} %" in out  # executed early exit == the simulated rule
    rates = "  ".join(f"{j + 1}: {100 * f:.1f} %" for j, f in enumerate(report["exit_rates"]))
    assert f"exits: {rates}" in out
