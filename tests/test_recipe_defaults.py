"""The papers' recipe defaults, read from each experiment's config as a user gets it: each test fails if a
default is flipped (Nesterov, T/gamma, schedules, data regimes, selection on the mean over exits)."""
from __future__ import annotations

import pytest
import torch

from experiments import imta
from experiments import multiexit_distillation as phuong
from experiments.engine.trainer import Trainer
from experiments.ingredients.optim import build_lr_scheduler
from losses import ExitCrossEntropy
from models import create_model


def config(ex, *named: str, **updates) -> dict:
    """The config a run of ``ex`` with these named configs and updates would record (no run is started)."""
    return ex._create_run(named_configs=list(named), config_updates=updates).config


def test_phuong_sgd_is_nesterov_and_imta_is_not():
    assert config(phuong.ex)["optim"]["nesterov"] is True
    assert config(imta.ex, stage="ge")["optim"]["nesterov"] is False
    for ex, extra in ((phuong.ex, {}), (imta.ex, {"stage": "ge"})):
        optim = config(ex, **extra)["optim"]
        assert (optim["lr"], optim["momentum"], optim["weight_decay"]) == (0.1, 0.9, 1e-4)


@pytest.mark.parametrize("named, t, gamma", [((), 3.0, 0.9), (("imagenet_step4",), 1.0, 0.1)])
def test_imta_temperature_and_gamma_per_recipe(named, t, gamma):
    c = config(imta.ex, *named, stage="ge")
    assert (c["temperature"], c["gamma"]) == (t, gamma)


def lr_drops(optim: dict, epochs: int) -> list[int]:
    """Epochs after which the learning rate has just dropped, from the scheduler a run builds."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim["lr"])
    scheduler = build_lr_scheduler(optim, opt, epochs, iters_per_epoch=2)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        for _ in range(2):
            opt.step()
            scheduler.step()
    return [e for e in range(1, epochs) if lrs[e] < lrs[e - 1]]


def test_schedules_drop_where_the_references_do():
    assert lr_drops(config(phuong.ex)["optim"], 300) == [150, 225]
    assert lr_drops(config(phuong.ex, "released_schedule")["optim"], 300) == [149, 224]
    # IMTA's code drops at 50 % and 75 % of training, whatever the number of epochs
    assert lr_drops(config(imta.ex, stage="ge")["optim"], 300) == [150, 225]
    assert lr_drops(config(imta.ex, stage="ge", train={"epochs": 40})["optim"], 40) == [20, 30]
    assert lr_drops(config(imta.ex, "imagenet_step4", stage="ge")["optim"], 90) == [30, 60]


def test_data_regimes():
    reduced = config(phuong.ex)["data"]
    assert (reduced["name"], reduced["n_per_class"], reduced["val_size"], reduced["drop_last"]) == (
        "cifar100", 150, 5000, True)  # 100 train + 50 val per class; the reference drops the last batch
    full = config(phuong.ex, "cifar100_full")["data"]
    assert (full["n_per_class"], full["val_size"]) == (None, 5000)
    anytime = config(imta.ex, "cifar100_anytime", stage="ge")
    assert (anytime["data"]["val_size"], anytime["train"]["select"]) == (5000, "best_val")
    reference = config(imta.ex, "cifar100_anytime_reference", stage="ge")
    assert (reference["data"]["val_size"], reference["train"]["select"]) == (0, "last")  # never the test set
    assert reference["model"] == anytime["model"]


def tiny_trainer(folder, select: str, epochs: int, **kwargs) -> Trainer:
    """A ResNet-8 on one fixed batch (train, validation and test alike); validation is patched by the tests."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=2, width=4)
    batch = (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_lr_scheduler({"schedule": "constant", "milestones": [], "gamma": 0.1, "warmup_epochs": 0},
                                   optimizer, epochs, 1)
    return Trainer(model, ExitCrossEntropy(), optimizer, scheduler, [batch], [batch], torch.device("cpu"),
                   snapshot_dir=folder, select=select, progress=False, **kwargs)


def test_selection_is_by_the_mean_over_exits_not_the_last_exit(tmp_path, monkeypatch):
    """Epoch 1 has the best mean over exits, epoch 2 the best last exit: best_val keeps epoch 1."""
    per_epoch = {1: [0.9, 0.3], 2: [0.1, 0.8]}

    def evaluate(self, loader, prefix):
        accs = per_epoch[self.epoch]
        return {**{f"{prefix}.acc.exit{k + 1}": a for k, a in enumerate(accs)},
                f"{prefix}.acc.mean": sum(accs) / len(accs)}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    trainer = tiny_trainer(tmp_path, config(phuong.ex)["train"]["select"], 2)
    trainer.fit(2)
    assert trainer.restore_selected() == 1


def test_released_selection_keeps_the_epoch_with_the_lowest_test_loss(tmp_path, monkeypatch):
    """DIH's released code chose checkpoints by the lowest test loss: a recorded switch, never the default."""
    from experiments import dih

    losses = {1: 0.9, 2: 0.4, 3: 0.7}

    def evaluate(self, loader, prefix):
        return {f"{prefix}.acc.mean": 0.5, f"{prefix}.loss": losses[self.epoch] if prefix == "test" else 1.0}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    select = config(dih.ex, "released_selection", stage="teacher")["train"]["select"]
    trainer = tiny_trainer(tmp_path, select, 3, test_loader=[(torch.zeros(1, 3, 8, 8), torch.tensor([0]))])
    trainer.fit(3)
    assert trainer.restore_selected() == 2
    assert config(dih.ex, stage="teacher")["train"]["select"] == "best_val"


def test_dih_recipes():
    from experiments import dih

    paper = config(dih.ex, stage="teacher")
    assert (paper["train"]["epochs"], paper["data"]["batch_size"]) == (200, 64)
    assert {k: paper["optim"][k] for k in ("lr", "momentum", "nesterov", "weight_decay", "milestones", "gamma")} == {
        "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "milestones": [60, 120, 180], "gamma": 0.2}
    assert (paper["alpha"], paper["kd_temperature"], paper["cohort_reduction"]) == (0.1, 5.0, "mean")
    assert (paper["model"]["arch"], paper["student_arch"], paper["data"]["val_size"]) == ("resnet110", "resnet8", 5000)
    crd = config(dih.ex, "crd_recipe", stage="teacher")
    assert (crd["train"]["epochs"], crd["data"]["batch_size"], crd["optim"]["lr"]) == (240, 128, 0.05)
    assert (crd["optim"]["milestones"], crd["optim"]["gamma"]) == ([150, 180, 210], 0.1)
    assert lr_drops(paper["optim"], 200) == [60, 120, 180]
