"""DIH stages A (teacher) and B (intermediate heads): head placement and sizes (the spec's Table 1 and head
table), the frozen teacher, the teacher -> heads chain by uid, and the references a heads run refuses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import dih
from experiments.references import RunReferenceError
from experiments.tracking import RunFolderObserver
from models import count_exit_costs, create_model
from models.dih import IntermediateHeads


@pytest.mark.parametrize("arch, sizes", [
    # DIH spec, section 1.2: one head per stage on the flattened post-ReLU output, 32x32 inputs
    ("resnet8", [16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8]),
    ("resnet110", [16384, 8192, 4096]),
])
def test_one_flattened_linear_head_per_teacher_stage(arch, sizes):
    teacher = create_model(arch, num_classes=100)
    net = IntermediateHeads(teacher, (3, 32, 32))
    assert [h.classifier.in_features for h in net.heads] == sizes
    assert all(isinstance(h.features, torch.nn.Flatten) for h in net.heads)  # no pooling, no conv, no BN
    assert net.num_exits == len(sizes) + 1  # the cohort: k heads and the teacher's final exit
    # heads only: (size + 1) x 100 parameters each (ResNet-110: 1.64 M, 0.82 M, 0.41 M in the spec's table)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == sum((n + 1) * 100 for n in sizes)


def test_the_cohort_ends_with_the_teachers_own_exit_and_staged_equals_forward():
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=5, width=4)
    net = IntermediateHeads(teacher, (3, 16, 16)).train()  # the teacher stays in eval mode regardless
    assert not teacher.training
    x = torch.randn(3, 3, 16, 16)
    outputs = net(x)
    torch.testing.assert_close(outputs[-1], teacher(x)[-1])
    state = net.init_state(x)
    for k in range(net.num_exits):
        state, logits = net.run_stage(k, state)
        torch.testing.assert_close(logits, outputs[k])
    macs = count_exit_costs(net, (3, 16, 16)).macs
    assert all(a < b for a, b in zip(macs, macs[1:]))


def run(tmp_path: Path, **updates):
    saved = dih.ex.observers
    dih.ex.observers = [RunFolderObserver(str(tmp_path / "runs"))]
    try:
        train = {"snapshot_root": str(tmp_path / "snapshots"), "latency_batch": 0}
        return dih.ex.run(named_configs=["fast"], config_updates={"train": train, "seed": 3, **updates},
                          options={"--loglevel": "ERROR"})
    finally:
        dih.ex.observers = saved


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("dih")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = run(root, stage="teacher", data={"split_seed": 5})
        heads = run(root, stage="heads", teacher_run=teacher.info["uid"])
    finally:
        torch.set_num_threads(threads)
    return root, teacher, heads


def test_heads_train_on_the_frozen_teacher_and_leave_it_bit_identical(chain):
    root, teacher, heads = chain
    assert teacher.status == heads.status == "COMPLETED"
    assert (teacher.info["variant"], heads.info["variant"]) == ("resnet8", "resnet8+heads")
    before = torch.load(Path(teacher.info["snapshot_dir"]) / "final.pt", weights_only=True)["model"]
    after = torch.load(Path(heads.info["snapshot_dir"]) / "final.pt", weights_only=True)["model"]
    frozen = {k[len("teacher."):]: v for k, v in after.items() if k.startswith("teacher.")}
    assert frozen.keys() == before.keys()
    assert all(torch.equal(before[k], frozen[k]) for k in before)  # BN running statistics included
    trained = [k for k in after if k.startswith("heads.")]
    assert len(trained) == 6  # three Linear heads: weight and bias each


def test_heads_run_records_its_teacher_and_what_it_ran_on(chain):
    root, teacher, heads = chain
    assert heads.info["parent"]["uid"] == teacher.info["uid"]
    config = json.loads((root / "runs" / heads.info["uid"] / "config.json").read_text())
    assert config["data"]["split_seed"] == 5  # the teacher's split, not this command's default
    assert config["data"]["split_file"] == str(Path(teacher.info["snapshot_dir"]) / "split.npz")
    record = json.loads((root / "runs" / heads.info["uid"] / "info.json").read_text())["exits"]
    assert "test_acc_exit4" in record  # 3 heads + the teacher's final exit
    assert record["test_acc_exit4"] == pytest.approx(teacher.info["exits"]["test_acc_exit3"])


def test_a_heads_run_needs_a_finished_teacher_run(chain, tmp_path):
    root, teacher, heads = chain
    with pytest.raises(RunReferenceError, match="teacher_run is needed"):
        run(root, stage="heads")
    with pytest.raises(RunReferenceError, match="not a finished stage=teacher run of dih .*'heads'"):
        run(root, stage="heads", teacher_run=heads.info["uid"])
