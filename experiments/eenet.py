"""EENet: Ilhan et al., "Learning to Early Exit for Adaptive Inference" (WACV 2024).

Two stages of one experiment:

    python experiments/eenet.py with stage=train quick                         # multi-exit training
    python experiments/eenet.py with stage=schedule quick train_run=<uid>      # policies at five budgets

``stage=train`` trains a multi-exit network with EENet's objective (depth-weighted CE, final-to-early KD in
the last quarter) and leaves the exit record. ``stage=schedule`` reads a finished run's exit record alone
(EENet's, or any experiment's with ``train_experiment=imta`` etc.) and, for every budget, fits each policy
on validation and evaluates it on test: EENet's learned scheduler, max-probability (MSDNet), normalised
entropy (BranchyNet) and patience (PABEE). Defaults are the CIFAR-10 recipe (bottleneck ResNet-56, 150 epochs,
batch 128, SGD 0.1, x0.1 at 50/100, wd 5e-4, the last 5 000 training images for validation); named configs
``cifar100_densenet``, ``agnews_bert`` and ``sst2_bert`` are the paper's other recipes.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from analysis.eenet import POLICIES, SchedulerSettings, evaluate_policies
from analysis.exit_record import FILENAME, ExitRecord
from analysis.recipes import recipe_key
from experiments.engine import distributed
from experiments.engine.hardware import resolve_device
from experiments.engine.pipeline import fit_and_record, plain, run_folder
from experiments.identity import TrackedExperiment
from experiments.ingredients import data as data_ing
from experiments.ingredients import model as model_ing
from experiments.ingredients import optim as optim_ing
from experiments.ingredients import train as train_ing
from experiments.references import RunReferenceError, resolve_run, stores_of
from experiments.tracking import run_cli
from experiments.validation import (ConfigError, boolean, choice, integer, list_of, merge_rules, number, optional,
                                    register_rules, scoped, string)
from losses.eenet import EENetLoss

NAME = "eenet"
# every scheduler setting but the seed, which is the run's
SCHEDULER_DEFAULTS = {k: v for k, v in dataclasses.asdict(SchedulerSettings()).items() if k != "seed"}
STAGES = ("train", "schedule")
COSTS = ("macs", "measured_ms", "table")
COST_UNITS = {"macs": "MACs", "measured_ms": "ms/sample", "table": "table units"}

data_ingredient = data_ing.data_ingredient(name="cifar10", val_size=5000, batch_size=128, class_balanced=False)
model_ingredient = model_ing.model_ingredient(arch="resnet56_bottleneck")
optim_ingredient = optim_ing.optim_ingredient(lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
                                              schedule="multistep", milestones=[50, 100], gamma=0.1)
train_ingredient = train_ing.train_ingredient(epochs=150)
ex = TrackedExperiment(NAME, ingredients=[data_ingredient, model_ingredient, optim_ingredient, train_ingredient])


@ex.config
def config():
    stage = None  # train (multi-exit training with EENet's loss) or schedule (exit policies on a run's exit record)
    kd_temperature = 3.0  # stage train: temperature of the final-to-early KD term
    kd_weight = 0.01  # stage train: weight of that term (its KL is divided by batch x classes, as released)
    kd_from = 0.75  # stage train: the KD term is on once the 0-based epoch exceeds this fraction of the epochs
    train_run = None  # stage schedule: uid, run id or snapshot path of a finished run with an exit record
    train_experiment = "eenet"  # stage schedule: the experiment of train_run (imta, multiexit_distillation, dih)
    cost = "macs"  # stage schedule: budget unit: macs, measured_ms (the record's latency) or table (cost_table)
    cost_table = None  # cost=table: cumulative cost per exit, e.g. the released seconds.csv [2.31, 4.15, 4.93]
    budgets = None  # stage schedule: average cost per test sample, in the cost's unit (or fractions, see next)
    relative_budgets = False  # budgets are fractions of the full network's cost
    policies = list(POLICIES)  # eenet (learned scheduler), max_prob (MSDNet), entropy (BranchyNet), patience (PABEE)
    scheduler = SCHEDULER_DEFAULTS  # EENet's scheduler (analysis.eenet.SchedulerSettings): the released settings
    locals()  # sacred reads these names; this line tells linters they are used


RULES = dict(
    stage=choice(*STAGES),
    kd_temperature=number(min=0, min_open=True),
    kd_weight=number(min=0),
    kd_from=number(min=0, max=1),
    train_run=train_ing.SNAPSHOT_REF,
    train_experiment=string,
    cost=choice(*COSTS),
    cost_table=optional(list_of(number(min=0, min_open=True))),
    budgets=optional(list_of(number(min=0, min_open=True))),
    relative_budgets=boolean,
    policies=list_of(choice(*POLICIES)),
)
SCHEDULER_RULES = dict(
    lr=number(min=0, min_open=True), weight_decay=number(min=0), epochs=integer(min=1), batch_size=integer(min=1),
    period=integer(min=1), alpha_ce=number(min=0), alpha_cost=number(min=0), beta=number(min=0, min_open=True),
    hidden_rate=number(min=0, min_open=True), assignment=choice("softmax", "sum"), zero_grad=boolean,
    restarts=integer(min=1), cost_tolerance=number(min=0), stop_cost_loss=number(min=0), stop_patience=integer(min=1),
    prev_scores_at_test=choice("unclamped", "clamped"), unrouted=choice("last_exit", "reference"),
)
register_rules(NAME, merge_rules(data_ing.RULES, model_ing.RULES, optim_ing.RULES, train_ing.RULES, RULES,
                                 scoped("scheduler", SCHEDULER_RULES)))


@ex.named_config
def cifar100_densenet():
    """CIFAR-100 with DenseNet-121 (k = 12, exits after transitions 1-3), the CIFAR recipe otherwise."""
    data = dict(name="cifar100")
    model = dict(arch="densenet121_cifar")
    locals()  # sacred reads these names; this line tells linters they are used


# EENet's BERT recipe (spec 2.3): bert-base-uncased, exits after layers 3/6/9/12, 20 epochs of batch 16,
# SGD (momentum 0.9) at a constant 3e-5, weight decay 1e-4; the scheduler's assignment MLP twice as wide.
BERT_MODEL = dict(arch="bert_exits", bert=dict(pretrained="bert-base-uncased"))
BERT_OPTIM = dict(lr=3e-5, momentum=0.9, nesterov=False, weight_decay=1e-4, schedule="constant")
BERT_TRAIN = dict(epochs=20)
BERT_SCHEDULER = dict(hidden_rate=2.0)
BERT_DATA = dict(batch_size=16, eval_batch_size=64, tokenizer="bert-base-uncased", max_length=512)


@ex.named_config
def agnews_bert():
    """AG News with EENet's BERT recipe; the last 10 000 of a seeded permutation of the training set validate."""
    data = dict(BERT_DATA, name="ag_news", val_size=10000)
    model, optim, train, scheduler = BERT_MODEL, BERT_OPTIM, BERT_TRAIN, BERT_SCHEDULER
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def sst2_bert():
    """SST-2 with EENet's BERT recipe: GLUE's validation set validates, the labelled SST test set tests."""
    data = dict(BERT_DATA, name="sst2")
    model, optim, train, scheduler = BERT_MODEL, BERT_OPTIM, BERT_TRAIN, BERT_SCHEDULER
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def released_scheduler():
    """The scheduler as the released code fits it: gradients never zeroed (the bug), softmax over sigmoids."""
    scheduler = dict(zero_grad=False, assignment="softmax")
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def quick():
    """Fashion-MNIST in minutes on 2 CPU cores: the bottleneck ResNet-56 at half width, 8 epochs; five budgets
    between 40 % and 80 % of the full network's MACs."""
    data = dict(name="fashion_mnist", n_per_class=500, val_size=1000, batch_size=64, eval_batch_size=500,
                class_balanced=True)
    model = dict(arch="resnet56_bottleneck", resnet_bottleneck=dict(width=8))
    optim = dict(schedule="cosine")
    train = dict(epochs=8, amp="bf16")
    budgets = [0.4, 0.5, 0.6, 0.7, 0.8]
    relative_budgets = True
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def fast():
    """Seconds, for tests: tiny synthetic data, a 3-exit ResNet-8 of width 4, two epochs; a short scheduler fit."""
    data = data_ing.FAST
    model = model_ing.FAST_RESNET
    optim = optim_ing.FAST
    train = train_ing.FAST
    budgets = [0.5, 0.8]
    relative_budgets = True
    scheduler = dict(epochs=20, restarts=2, lr=0.01)
    locals()  # sacred reads these names; this line tells linters they are used


def load_record(config: dict, stores) -> tuple:
    """The finished run ``train_run`` names (in ``train_experiment``) and its exit record."""
    parent = resolve_run(config["train_run"], config["train_experiment"], config["train"]["snapshot_root"], stores)
    path = parent.snapshot.parent / FILENAME
    if not path.is_file():
        raise RunReferenceError(f"train_run {parent.uid or parent.snapshot} has no {FILENAME} in {path.parent}")
    return parent, ExitRecord.load(path)


def exit_costs(record: ExitRecord, cost: str, cost_table: list | None) -> np.ndarray:
    """The cumulative cost per exit in the chosen unit."""
    if cost == "macs":
        return np.asarray(record.macs, dtype=np.float64)
    if cost == "measured_ms":
        costs = np.asarray(record.latency_ms, dtype=np.float64)
        if np.isnan(costs).any():
            raise ConfigError("cost=measured_ms: this exit record has no latency (it was trained with "
                              "train.latency_batch=0); use cost=macs or cost=table")
        return costs
    if cost_table is None or len(cost_table) != record.num_exits:
        raise ConfigError(f"cost=table needs cost_table with one cumulative cost per exit ({record.num_exits}), "
                          f"got {cost_table}")
    return np.asarray(cost_table, dtype=np.float64)


def absolute_budgets(config: dict, costs: np.ndarray) -> np.ndarray:
    """The budgets in the cost's unit, checked against what the network can spend."""
    if not config["budgets"]:
        raise ConfigError(f"stage=schedule needs budgets=[...]: exit costs of this run are {costs.tolist()} "
                          f"({COST_UNITS[config['cost']]}), or pass fractions with relative_budgets=True")
    budgets = np.asarray(config["budgets"], dtype=np.float64) * (costs[-1] if config["relative_budgets"] else 1)
    outside = [f"{b:g}" for b in budgets if not costs[0] <= b <= costs[-1]]
    if outside:
        raise ConfigError(f"budgets [{', '.join(outside)}] lie outside [{costs[0]:g}, {costs[-1]:g}], the costs of exit 1 and "
                          f"of the full network ({COST_UNITS[config['cost']]})")
    return budgets


@ex.derive_config
def schedule_reads_a_finished_run(config: dict, stores) -> dict:
    """Stage schedule: its budgets are checked against the run's costs before anything is recorded."""
    if config["stage"] != "schedule":
        return {}
    _, record = load_record(config, stores)
    absolute_budgets(config, exit_costs(record, config["cost"], config["cost_table"]))
    return {}


def train(_run, _seed, config: dict) -> dict:
    """Stage train: EENet's objective on any registered backbone, the exit record at the end."""
    data, model, train_cfg = config["data"], config["model"], config["train"]
    device = resolve_device(train_cfg["device"])
    bundle = data_ing.build(data, device, _seed)
    net = model_ing.build(model, bundle.num_classes, bundle.in_channels, bundle.image_size)
    loss = EENetLoss(train_cfg["epochs"], config["kd_temperature"], config["kd_weight"], config["kd_from"])
    meta = {"stage": "train", "model": model, "data": data}
    return fit_and_record(_run, NAME, net.to(device), loss, bundle, config["optim"], train_cfg, device,
                          variant=model["arch"], meta=meta)


def with_costs_in_both_units(table, record: ExitRecord):
    """Each policy's average test cost in MACs and in measured ms/sample, from its exit fractions (a sample
    that no exit takes, possible only with ``scheduler.unrouted=reference``, costs nothing, as released)."""
    fractions = table[[f"frac_exit{k + 1}" for k in range(record.num_exits)]].to_numpy(np.float64)
    return table.assign(cost_macs=fractions @ record.macs.astype(np.float64), cost_ms=fractions @ record.latency_ms)


def schedule(_run, _seed, config: dict) -> dict:
    """Stage schedule: every policy at every budget, from the exit record alone; a table as the artifact."""
    if not distributed.is_main():  # no training to share: under torchrun rank 0 fits and records alone
        return {}
    parent, record = load_record(config, stores_of(_run.observers))
    _run.info["parent"] = parent.record()
    costs = exit_costs(record, config["cost"], config["cost_table"])
    budgets = absolute_budgets(config, costs)
    settings = SchedulerSettings(**config["scheduler"], seed=_seed)
    val, test = (torch.from_numpy(z).double().softmax(-1).numpy() for z in (record.val_logits, record.test_logits))
    table = evaluate_policies(val, record.val_targets, test, record.test_targets, costs, budgets, settings,
                              policies=config["policies"])
    table.insert(2, "budget_fraction", table["budget"] / costs[-1])
    table = with_costs_in_both_units(table, record)
    folder = run_folder(_run, NAME, config["train"]["snapshot_root"])
    path = Path(folder) / "policies.csv"
    table.to_csv(path, index=False)
    _run.add_artifact(str(path), name="policies.csv")
    trained = (parent.contents or {}).get("meta", {}).get("variant", "?")
    _run.info.update(variant=f"schedule: {trained}", recipe=recipe_key(plain(config), parent.recipe),
                     snapshot_dir=str(folder), cost_unit=COST_UNITS[config["cost"]],
                     policies=json.loads(table.to_json(orient="records")))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    return {"policies": len(table)}


@ex.main
def main(_run, _seed, _config) -> dict:
    """Stage train trains and records; stage schedule fits the exit policies on a finished run's record."""
    return (train if _config["stage"] == "train" else schedule)(_run, _seed, _config)


if __name__ == "__main__":
    run_cli(ex)
