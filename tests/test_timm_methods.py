"""The papers' stage chains on a timm backbone through the ordinary config (``model.arch=timm/<name>``):
IMTA's two stages, DIH's teacher -> heads -> student, EENet's train -> schedule, JEI-DNN's transfer -> gates."""
from __future__ import annotations

import pytest

from conftest import run_fast
from experiments import dih, eenet, imta, jei

NARROW = dict(arch="timm/resnet18", timm=dict(kwargs=dict(channels=[8, 16, 32, 64])))


@pytest.fixture
def run(tmp_path):
    def run(experiment, **updates):
        result = run_fast(experiment, tmp_path, **{"seed": 1, "train": {"latency_batch": 0}, **updates})
        assert result.status == "COMPLETED"
        return result
    return run


def test_imta_both_stages_on_a_timm_backbone(run):
    ge = run(imta, stage="ge", model=NARROW)
    assert ge.info["variant"] == "timm/resnet18+ge"
    stage2 = run(imta, stage="imta", ge_run=ge.info["uid"])
    assert stage2.info["parent"]["uid"] == ge.info["uid"] and len(stage2.info["exits"]) > 0


def test_dih_chain_on_timm_teacher_and_student(run):
    teacher = run(dih, stage="teacher", model=NARROW)
    heads = run(dih, stage="heads", teacher_run=teacher.info["uid"])
    assert heads.info["variant"] == "timm/resnet18+heads"
    student = run(dih, stage="student", method="dih", teacher_run=teacher.info["uid"], heads_run=heads.info["uid"],
                  student_arch="timm/resnet18")
    assert student.info["variant"] == "dih: timm/resnet18 -> timm/resnet18"


def test_eenet_train_and_schedule_on_a_timm_backbone(run):
    trained = run(eenet, stage="train", model=NARROW)
    scheduled = run(eenet, stage="schedule", train_run=trained.info["uid"], policies=["max_prob", "eenet"],
                    budgets=[0.8, 0.9])  # timm's 64-wide stem makes exit 1 two thirds of the MACs
    assert {row["policy"] for row in scheduled.info["policies"]} == {"max_prob", "eenet"}


def test_jei_gates_on_a_timm_backbone(run):
    backbone = run(jei, stage="transfer", model=NARROW)
    gated = run(jei, stage="dynn", backbone_run=backbone.info["uid"], ce_ic_tradeoff=0.5)
    assert gated.info["variant"] == "timm/resnet18+jei lambda=0.5"
    assert len(gated.info["exits"]) > 0 and 0 < gated.info["jei"]["macs_ratio"] <= 1
