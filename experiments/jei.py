"""JEI-DNN: Regol, Chataoui & Coates, "Jointly-learned Exit and Inference for Dynamic Neural Networks" (ICLR 2024).

Two stages of one experiment, chained by run reference (uid, run id or snapshot path):

    python experiments/jei.py with stage=transfer quick                                  # train the backbone
    python experiments/jei.py with stage=dynn quick backbone_run=<uid> ce_ic_tradeoff=0.5  # exits + gates

``stage=transfer`` fine-tunes a backbone (T2T-ViT-7/14 from an official ImageNet checkpoint with
``backbone_weights=<path>``, or any registered backbone from scratch) with CE on its final exit.
``stage=dynn`` freezes it and trains a new exit on every stage but the last and a gate per new exit, jointly:
a weighted-CE warm-up with per-exit early stopping, then gate and exit phases alternating every
``bilevel_batch_count`` batches. The gate targets trade each exit's CE against ``ce_ic_tradeoff`` times its
normalised cost; a higher trade-off exits earlier. Each trade-off is one run; ``python -m analysis curves`` draws
them against the max-probability thresholds of the same exit records. Defaults are the paper's CIFAR-10 recipe
(T2T-ViT-7 at 224 px, batch 64, SGD 0.01, 15 epochs including the warm-up).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from analysis.exit_record import FILENAME, ExitRecord
from analysis.jei import JEI_FILE, jei_report
from experiments.engine import distributed
from experiments.engine.hardware import resolve_device
from experiments.engine.pipeline import fit_and_record
from experiments.identity import TrackedExperiment
from experiments.ingredients import data as data_ing
from experiments.ingredients import model as model_ing
from experiments.ingredients import optim as optim_ing
from experiments.ingredients import train as train_ing
from experiments.references import load_parent, stores_of
from experiments.tracking import run_cli
from experiments.validation import (ConfigError, boolean, choice, integer, list_of, merge_rules, number, optional,
                                    register_rules, string)
from losses.exits import final_exit_only
from losses.jei import GATE_OBJECTIVES, POS_COUNTS, WEIGHTINGS, JEIObjective
from models.cost import count_exit_costs
from models.jei import GatedExits
from models.multiexit import MultiExitNetwork
from models.released_cost import jei_released_costs
from models.registry import family_of
from models.t2t_vit import load_official_weights

NAME = "jei"
STAGES = ("transfer", "dynn")
COST_CONVENTIONS = ("released", "macs")
LR_SCHEDULES = ("joint_cosine", "optim")

data_ingredient = data_ing.data_ingredient(name="cifar10", val_size=5000, batch_size=64, eval_batch_size=100,
                                           resize=224, augment=True)
model_ingredient = model_ing.model_ingredient(arch="t2t_vit_7")
optim_ingredient = optim_ing.optim_ingredient(lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4,
                                              schedule="cosine", milestones=[], gamma=0.1)
train_ingredient = train_ing.train_ingredient(epochs=15)
ex = TrackedExperiment(NAME, ingredients=[data_ingredient, model_ingredient, optim_ingredient, train_ingredient])


@ex.config
def config():
    stage = None  # transfer (train/fine-tune the backbone) or dynn (frozen backbone: new exits and gates)
    backbone_weights = None  # stage transfer: an official T2T-ViT checkpoint (.pth.tar) to start from
    transfer_ratio = 1.0  # stage transfer: lr multiplier of everything but the final head (released: 0.01)
    freeze_norm_and_cls = False  # stage transfer, T2T-ViT: keep the final norm and CLS token fixed (released)
    backbone_run = None  # stage dynn: uid, run id or snapshot path of a finished stage=transfer run
    ce_ic_tradeoff = 0.7  # stage dynn: lambda of the gate targets argmin CE_l + lambda C_l (higher: earlier exits)
    max_warmup_epochs = 6  # stage dynn: warm-up epochs at most (train.epochs counts them too)
    warmup_patience = 2  # stage dynn: a new exit freezes after this many warm-up epochs without improvement
    bilevel_batch_count = 200  # stage dynn: batches per gate / exit phase (gates first in every epoch)
    weighting = "cancelling"  # stage dynn: exits' loss: cancelling (released: plain mean CE) or detached
    gate_objective = "ce"  # stage dynn: the per-exit loss of the gate targets: ce, zero_one or prob
    pos_weight_cap = 5.0  # stage dynn: cap of the gates' positive-class weights
    pos_weight_counts = "exact"  # stage dynn: weights from exact optimal-exit counts (released) or cumulative ones
    cost_convention = "released"  # stage dynn: normalised costs of the targets: released (T2T-ViT's counter) or macs
    stochastic_backbone = True  # stage dynn: the frozen backbone's drop-path and dropout stay on in training (released)
    lr_schedule = "joint_cosine"  # stage dynn: cosine to min_lr stepped once per joint epoch (released), or optim
    min_lr = 2e-4  # joint_cosine: the cosine's floor (T_max = train.epochs)
    alphas = [0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05]  # conformal miscoverage levels
    ece_bins = 15  # equal-mass bins of the calibration error
    test_chunks = 10  # the released test figure: mean of running averages over this many consecutive chunks
    locals()  # sacred reads these names; this line tells linters they are used


RULES = dict(
    stage=choice(*STAGES),
    backbone_weights=optional(string),
    transfer_ratio=number(min=0, min_open=True),
    freeze_norm_and_cls=boolean,
    backbone_run=train_ing.SNAPSHOT_REF,
    ce_ic_tradeoff=number(min=0),
    max_warmup_epochs=integer(min=1),
    warmup_patience=integer(min=1),
    bilevel_batch_count=integer(min=1),
    weighting=choice(*WEIGHTINGS),
    gate_objective=choice(*GATE_OBJECTIVES),
    pos_weight_cap=number(min=0, min_open=True),
    pos_weight_counts=choice(*POS_COUNTS),
    cost_convention=choice(*COST_CONVENTIONS),
    stochastic_backbone=boolean,
    lr_schedule=choice(*LR_SCHEDULES),
    min_lr=number(min=0),
    alphas=list_of(number(min=0, max=1, min_open=True, max_open=True)),
    ece_bins=integer(min=1),
    test_chunks=integer(min=1),
)
register_rules(NAME, merge_rules(data_ing.RULES, model_ing.RULES, optim_ing.RULES, train_ing.RULES, RULES))


@ex.named_config
def transfer_recipe():
    """The released fine-tuning: 60 epochs, backbone at lr x 0.01, the final norm and CLS token fixed (pass
    backbone_weights=<the official checkpoint>)."""
    train = dict(epochs=60)
    transfer_ratio = 0.01
    freeze_norm_and_cls = True
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def cifar100():
    """CIFAR-100: 10 000 validation images, as released."""
    data = dict(name="cifar100", val_size=10000)
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def cifar100_lt():
    """CIFAR-100-LT (factor 0.01; the long-tailed test set, as released): 1 000 validation images."""
    data = dict(name="cifar100_lt", val_size=1000, class_balanced=False)
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def svhn():
    """SVHN at 32 px, pixels in [0, 1] without normalisation or augmentation, batch 256 (the authors' runs)."""
    data = dict(name="svhn", resize=None, normalize=False, augment=False, batch_size=256)
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def t2t_vit_14():
    """The larger backbone, T2T-ViT-14."""
    model = dict(arch="t2t_vit_14")
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def quick():
    """Fashion-MNIST in minutes on 2 CPU cores: T2T-ViT-7 from scratch at 32 px (7 exits), 450 + 50 images per
    class, 15 epochs per stage (dynn: up to 6 of warm-up), phases of 20 batches."""
    data = dict(name="fashion_mnist", n_per_class=500, val_size=500, batch_size=64, eval_batch_size=500, resize=32)
    optim = dict(lr=0.05)
    train = dict(epochs=15, amp="bf16")
    bilevel_batch_count = 20
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def fast():
    """Seconds, for tests: tiny synthetic data, a 3-exit ResNet-8 of width 4 (2 new exits), three epochs."""
    data = dict(data_ing.FAST, resize=None)
    model = model_ing.FAST_RESNET
    optim = optim_ing.FAST
    train = dict(train_ing.FAST, epochs=3)
    max_warmup_epochs = 1
    bilevel_batch_count = 1
    cost_convention = "macs"
    locals()  # sacred reads these names; this line tells linters they are used


def load_backbone_run(config: dict, stores):
    return load_parent(config["backbone_run"], "backbone_run", NAME, "transfer", config["train"]["snapshot_root"],
                       stores)


@ex.derive_config
def dynn_runs_on_its_backbone(config: dict, stores) -> dict:
    """Stage dynn trains on the backbone run's split and network; its settings are checked before a run exists."""
    if config["stage"] != "dynn":
        return {}
    if config["train"]["epochs"] <= config["max_warmup_epochs"]:
        raise ConfigError(f"train.epochs={config['train']['epochs']} leaves no joint epoch after up to "
                          f"max_warmup_epochs={config['max_warmup_epochs']} warm-up epochs (train.epochs counts both)")
    parent, snapshot = load_backbone_run(config, stores)
    meta = snapshot["meta"]
    if not meta["data"].get("val_size"):
        raise ConfigError("stage=dynn needs a validation split (the warm-up and the gates' weights read it): "
                          f"backbone_run {parent.uid} has data.val_size=0")
    if config["cost_convention"] == "released" and family_of(meta["model"]["arch"]) != "t2t_vit":
        raise ConfigError(f"cost_convention=released reproduces the released counter of T2T-ViT backbones; "
                          f"backbone_run {parent.uid} is {meta['model']['arch']}: use cost_convention=macs")
    return {"data": data_ing.inherit_split(config["data"], meta["data"], parent.snapshot.parent / "split.npz"),
            "model": meta["model"]}


@ex.derive_config
def transfer_weights_exist(config: dict, stores) -> dict:
    """A missing checkpoint is one clear line, before any run is recorded."""
    path = config["backbone_weights"]
    if config["stage"] == "transfer" and path is not None and not Path(path).is_file():
        raise ConfigError(f"backbone_weights: no file {path} (an official T2T-ViT checkpoint, e.g. "
                          "71.7_T2T_ViT_7.pth.tar from github.com/yitu-opensource/T2T-ViT)")
    return {}


def scale_backbone_lr(net: MultiExitNetwork, ratio: float) -> None:
    """Everything but the final exit's classifier learns at ``ratio`` x lr (``build_optimizer`` reads lr_scale)."""
    head = {id(p) for p in net.heads[-1].classifier.parameters()}
    for p in net.parameters():
        if id(p) not in head:
            p.lr_scale = ratio


def transfer(_run, _seed, config: dict) -> dict:
    """Stage transfer: CE on the final exit, from an official checkpoint or from scratch."""
    data, model, train = config["data"], config["model"], config["train"]
    device = resolve_device(train["device"])
    bundle = data_ing.build(data, device, _seed)
    net = model_ing.build(model, bundle.num_classes, bundle.in_channels, bundle.image_size)
    if config["backbone_weights"]:
        load_official_weights(net, config["backbone_weights"])
    if config["freeze_norm_and_cls"] and family_of(model["arch"]) == "t2t_vit":
        for p in (*net.norm.parameters(), net.cls_token):
            p.requires_grad_(False)
    if config["transfer_ratio"] != 1.0:
        scale_backbone_lr(net, config["transfer_ratio"])
    meta = {"stage": "transfer", "model": model, "data": data}
    return fit_and_record(_run, NAME, net.to(device), final_exit_only(net.num_exits), bundle, config["optim"], train,
                          device, variant=model["arch"], meta=meta)


def normalised_costs(net: GatedExits, convention: str, input_shape: tuple[int, ...]) -> list[float]:
    """Exit costs over the full network's, for the gate targets: the released counter's, or true MACs."""
    if convention == "released":
        costs = jei_released_costs(net.backbone, input_shape, net.num_classes)
    else:
        costs = count_exit_costs(net, input_shape).macs
    return [c / costs[-1] for c in costs]


def dynn(_run, _seed, config: dict) -> dict:
    """Stage dynn: the frozen backbone's new exits and gates, trained jointly; JEI's metrics at the end."""
    data, model, train = config["data"], config["model"], config["train"]
    device = resolve_device(train["device"])
    parent, snapshot = load_backbone_run(config, stores_of(_run.observers))
    bundle = data_ing.build(data, device, _seed)  # the backbone's split (dynn_runs_on_its_backbone)
    backbone = model_ing.build(model, bundle.num_classes, bundle.in_channels, bundle.image_size)
    backbone.load_state_dict(snapshot["model"])
    net = GatedExits(backbone, bundle.input_shape(), stochastic_backbone=config["stochastic_backbone"]).to(device)
    costs = normalised_costs(net, config["cost_convention"], bundle.input_shape())
    objective = JEIObjective(net, costs, config["ce_ic_tradeoff"], config["max_warmup_epochs"],
                             config["warmup_patience"], config["bilevel_batch_count"], config["weighting"],
                             config["gate_objective"], config["pos_weight_cap"], config["pos_weight_counts"])
    lr = config["optim"]["lr"]
    multiplier = (None if config["lr_schedule"] == "optim" else
                  lambda: objective.lr_factor(lr, config["min_lr"], train["epochs"]))
    meta = {"stage": "dynn", "parent": parent.record(), "model": model, "data": data}
    _run.info["parent"] = parent.record()
    variant = f"{snapshot['meta']['variant']}+jei lambda={config['ce_ic_tradeoff']:g}"
    summary = fit_and_record(_run, NAME, net, objective, bundle, config["optim"], train, device, variant=variant,
                             meta=meta, lr_multiplier=multiplier)
    if not distributed.is_main():  # under torchrun rank 0 evaluates and records
        return summary
    folder = Path(_run.info["snapshot_dir"])
    report = jei_report(net, ExitRecord.load(folder / FILENAME), np.asarray(costs), config["ce_ic_tradeoff"],
                        snapshot["meta"]["variant"], alphas=config["alphas"], ece_bins=config["ece_bins"], chunks=config["test_chunks"],
                        ece_batch=data["eval_batch_size"])
    path = folder / JEI_FILE
    path.write_text(json.dumps(report, indent=1))
    _run.add_artifact(str(path), name=JEI_FILE)
    _run.info["jei"] = report["summary"]
    print(json.dumps(report["summary"], indent=1), flush=True)
    return {**summary, "jei": report["summary"]}


@ex.main
def main(_run, _seed, _config) -> dict:
    """Stage transfer trains the backbone; stage dynn trains exits and gates on it, frozen."""
    return (transfer if _config["stage"] == "transfer" else dynn)(_run, _seed, _config)


if __name__ == "__main__":
    run_cli(ex)
