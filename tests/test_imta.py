"""IMTA stage 2: OFA loss values, ISC wiring, freezing, stage-2 cost, and the two-stage pipeline."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sacred.observers import FileStorageObserver

from data import load_split, save_split
from experiments import imta
from experiments.references import RunReferenceError
from experiments.validation import ConfigError
from experiments.ingredients.model import FAST_MSDNET, msdnet_knobs
from losses import OneForAllLoss
from models import build_imta, count_exit_costs, create_model

LN3 = math.log(3.0)


def tiny_msdnet(num_classes=5):
    knobs = dict(msdnet_knobs("cifar_anytime"), **FAST_MSDNET)
    torch.manual_seed(0)
    return create_model("msdnet", num_classes=num_classes, in_channels=3, image_size=16, **knobs)


@pytest.mark.parametrize("reduction, kl_divisor", [("batchmean", 1), ("mean", 2)])
def test_ofa_loss_by_hand(reduction, kl_divisor):
    # exit 1 [0, 0] -> p = (1/2, 1/2); last exit and teacher [0, ln 3] -> (1/4, 3/4); label 1; T = 1.
    z1, z2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, LN3]])
    teacher = torch.tensor([[0.0, LN3]])
    gamma = 0.9
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    expected = -math.log(0.75) + (1 - gamma) * math.log(2) + gamma * kl / kl_divisor  # 'mean' also / C = 2
    loss = OneForAllLoss(lambda: teacher, gamma=gamma, temperature=1.0, kl_reduction=reduction)
    assert loss([z1, z2], torch.tensor([1])).item() == pytest.approx(expected, rel=1e-6)


def test_ofa_temperature_and_last_exit_ce_only():
    z1, z2 = torch.tensor([[LN3, 0.0]]), torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, 2 * LN3]])  # at T = 2: softmax([0, ln 3]) = (1/4, 3/4)
    q, p = (0.25, 0.75), (math.sqrt(3) / (1 + math.sqrt(3)), 1 / (1 + math.sqrt(3)))
    kl = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    ce1 = -math.log(0.25)
    expected = math.log(2) + 0.5 * ce1 + 0.5 * 4 * kl  # last exit: CE only, whatever the teacher says
    loss = OneForAllLoss(lambda: teacher, gamma=0.5, temperature=2.0)
    assert loss([z1, z2], torch.tensor([1])).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="batchmean"):
        OneForAllLoss(lambda: teacher, kl_reduction="sum")


def test_isc_wiring_shapes_and_trainable_parameters():
    base = tiny_msdnet()
    net = build_imta(base, (3, 16, 16))
    widths = [8, 8, 8]  # head_width: every head's feature vector
    assert [c.in_features for c in net.classifiers] == [widths[0]] + [2 * w for w in widths[1:]]
    assert [(link[0].in_features, link[0].out_features) for link in net.links] == [(5, 8), (5, 8)]
    assert all(isinstance(link[1], torch.nn.BatchNorm1d) and isinstance(link[2], torch.nn.ReLU) for link in net.links)
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"links", "classifiers"}
    outputs = net.train()(torch.randn(4, 3, 16, 16))
    assert [o.shape for o in outputs] == [(4, 5)] * 3


@pytest.mark.parametrize("detach", [False, True])
def test_isc_detach_switch(detach):
    net = build_imta(tiny_msdnet(), (3, 16, 16), isc_detach=detach).train()
    outputs = net(torch.randn(4, 3, 16, 16))
    outputs[-1].sum().backward()  # only the last exit's output
    first_grad = net.classifiers[0].weight.grad
    if detach:
        assert first_grad is None
    else:
        assert first_grad is not None and first_grad.abs().sum() > 0


def test_teacher_is_the_frozen_original_last_exit():
    base = tiny_msdnet()
    net = build_imta(base, (3, 16, 16)).train()
    x = torch.randn(4, 3, 16, 16)
    net(x)
    with torch.no_grad():
        expected = base.eval()(x)[-1]
    torch.testing.assert_close(net.teacher_logits, expected)


@pytest.mark.parametrize("frozen_bn", ["eval", "train"])
def test_stage2_changes_no_stage1_parameter(frozen_bn):
    base = tiny_msdnet()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = build_imta(base, (3, 16, 16), frozen_bn=frozen_bn)
    new_before = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    loss_fn = OneForAllLoss(lambda: net.teacher_logits)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    net.train()
    for _ in range(3):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = base.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        # BN running statistics move only in the released 'train' mode; weights never move.
        assert changed == (frozen_bn == "train" and name.endswith(("running_mean", "running_var", "num_batches_tracked"))), name
    new_after = [p for p in net.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(new_before, new_after))


# Per exit, stage 2 widens exit k >= 2's Linear from 128 to 256 inputs (+12,800 MACs) and adds the ISC
# link into it: Linear(100 -> 128) + ReLU (12,928 + 128 MACs) = +25,856 per link (spec: "~+26 k per exit").
CIFAR_ISC_MACS = 128 * 100 + (100 * 128 + 128) + 128


@pytest.mark.parametrize("preset, spec_mmacs", [
    ("cifar_anytime", [15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94]),
    ("cifar_budgeted", [6.86, 14.35, 27.54, 41.71, 58.48]),
])
def test_stage2_macs_include_isc_links(preset, spec_mmacs):
    base = create_model("msdnet", num_classes=100, image_size=32, **msdnet_knobs(preset))
    stage1 = np.array(count_exit_costs(base, (3, 32, 32)).macs)
    stage2 = np.array(count_exit_costs(build_imta(base, (3, 32, 32)), (3, 32, 32)).macs)
    extra = np.arange(len(stage1)) * CIFAR_ISC_MACS
    np.testing.assert_array_equal(stage2 - stage1, extra)
    np.testing.assert_allclose(stage2 / 1e6, np.array(spec_mmacs) + extra / 1e6, atol=0.006)


def test_stage2_macs_imagenet_step4():
    base = create_model("msdnet", num_classes=1000, image_size=224, **msdnet_knobs("imagenet_step4"))
    widths = [384, 384, 352, 304, 560]  # IMTA's hard-coded ISC widths = each head's feature width
    stage1 = np.array(count_exit_costs(base, (3, 224, 224)).macs)
    stage2 = np.array(count_exit_costs(build_imta(base, (3, 224, 224)), (3, 224, 224)).macs)
    per_exit = [0] + [w * 1000 + (1000 * w + w) + w for w in widths[1:]]  # wider Linear + ISC Linear + ReLU
    np.testing.assert_array_equal(stage2 - stage1, np.cumsum(per_exit))
    np.testing.assert_allclose(stage1 / 1e6, [339.90, 685.46, 1008.16, 1254.47, 1360.53], atol=0.006)


@pytest.fixture
def imta_runs(tmp_path):
    observer = FileStorageObserver(str(tmp_path / "runs"))
    imta.ex.observers.append(observer)
    yield tmp_path
    imta.ex.observers.remove(observer)


def run_stage(tmp_path, **updates):
    train = {"snapshot_root": str(tmp_path / "snapshots")}
    return imta.ex.run(named_configs=["fast"], config_updates={"train": train, "seed": 4, **updates})


def test_two_stage_pipeline_passes_snapshot_and_split(imta_runs):
    ge = run_stage(imta_runs, stage="ge")
    assert ge.status == "COMPLETED" and ge.info["variant"] == "msdnet+ge"
    ge_final = Path(ge.info["snapshot_dir"]) / "final.pt"
    weights_before = torch.load(ge_final, weights_only=True)["model"]
    # a split no seed draws: stage 2 matches it only by reading stage 1's split file
    split_file = Path(ge.info["snapshot_dir"]) / "split.npz"
    split = load_split(split_file)
    split["train"][0], split["val"][0] = split["val"][0], split["train"][0]
    save_split(split, split_file)
    second = run_stage(imta_runs, stage="imta", ge_run=str(ge._id))
    assert second.status == "COMPLETED" and second.info["variant"] == "msdnet+ge+isc+ofa"
    config = json.loads((imta_runs / "runs" / str(second._id) / "config.json").read_text())
    assert config["ge_run"] == str(ge._id) and second.info["parent"]["snapshot"] == str(ge_final)
    assert second.info["parent"]["uid"] == ge.info["uid"]
    used = load_split(Path(second.info["snapshot_dir"]) / "split.npz")
    for key in ("train", "val"):
        np.testing.assert_array_equal(used[key], split[key])
    # stage 2 kept the stage-1 network frozen: its own final weights hold the parent's, unchanged
    stage2 = torch.load(Path(second.info["snapshot_dir"]) / "final.pt", weights_only=True)["model"]
    base = {k[len("base."):]: v for k, v in stage2.items() if k.startswith("base.")}
    assert base.keys() == weights_before.keys()
    assert all(torch.equal(weights_before[k], base[k]) for k in weights_before)
    record = np.load(Path(second.info["snapshot_dir"]) / "exit_record.npz")
    assert np.all(np.diff(record["macs"]) > 0)


@pytest.mark.parametrize("updates, error, match", [
    ({}, ConfigError, "invalid stage=None: expected one of 'ge', 'imta'"),
    ({"stage": "gee"}, ConfigError, "invalid stage='gee'"),
    ({"stage": "imta"}, RunReferenceError, "ge_run is needed: the uid, run id or snapshot path of a finished stage=ge"),
    ({"stage": "imta", "ge_run": "999"}, RunReferenceError, "no imta run with id 999"),
    ({"stage": "ge", "ge_scope": "some"}, ConfigError, "invalid ge_scope='some'"),
])
def test_bad_stage_input_is_a_clear_error(tmp_path, updates, error, match):
    with pytest.raises(error, match=match):
        run_stage(tmp_path, **updates)
