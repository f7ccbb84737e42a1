"""Recipes: runs that differ in anything but the seed (and where they ran) are never grouped as seeds of one."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from analysis.__main__ import main as analysis_main
from analysis.curves import group_label
from analysis.recipes import recipe_key, recipe_labels
from experiments import imta
from experiments.tracking import RunFolderObserver

BASE = {"seed": 1, "kl_reduction": "batchmean", "frozen_bn": "eval", "ge_run": "abc",
        "data": {"name": "cifar100", "n_per_class": None, "split_file": "/x/split.npz", "root": "/data"},
        "train": {"epochs": 300, "device": "cuda", "threads": 4, "resume": None}}


def with_(config: dict, **changes) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        node = out
        for p in path:
            node = node[p]
        node[key] = value
    return out


def test_recipe_key_ignores_seeds_references_and_runtime_but_nothing_else():
    key = recipe_key(BASE)
    same = with_(BASE, seed=2, ge_run="other", data__split_file="/y.npz", data__root="/elsewhere",
                 train__device="cpu", train__threads=1, train__resume="r")
    assert recipe_key(same) == key
    for changes in ({"kl_reduction": "mean"}, {"frozen_bn": "train"}, {"data__n_per_class": 150},
                    {"train__epochs": 30}):
        assert recipe_key(with_(BASE, **changes)) != key, changes
    assert recipe_key(BASE, parent_recipe="0123abcd") != key  # a stage-2 run inherits its parent's recipe


def test_recipe_labels_name_what_sets_runs_apart_within_experiment_and_variant():
    runs = pd.DataFrame({
        "experiment": ["imta"] * 5,
        "variant": ["msdnet+ge+isc+ofa"] * 4 + ["msdnet+ge"],
        "config.seed": [1, 2, 1, 2, 1],
        "config.kl_reduction": ["batchmean", "batchmean", "mean", "mean", "batchmean"],
        "config.frozen_bn": ["eval", "eval", "train", "train", "eval"],
        "config.train.device": ["cpu", "cuda", "cpu", "cpu", "cpu"],
    })
    labels = recipe_labels(runs).tolist()
    assert labels[0] == labels[1] == "kl_reduction=batchmean, frozen_bn=eval"
    assert labels[2] == labels[3] == "kl_reduction=mean, frozen_bn=train"
    assert labels[4] == "-"  # the only recipe of its variant
    assert group_label(("imta", "msdnet+ge", "-"), ("experiment", "variant", "recipe")) == "imta/msdnet+ge"


def test_quick_and_released_stage2_runs_are_two_labelled_groups(tmp_path, capsys):
    """``with released`` against the default stage 2 on one stage-1 network: two groups in the table."""
    saved = imta.ex.observers
    imta.ex.observers = [RunFolderObserver(str(tmp_path / "runs"))]
    threads = torch.get_num_threads()
    try:
        def stage(**updates):
            return imta.ex.run(named_configs=["fast", *updates.pop("named", [])], options={"--loglevel": "ERROR"},
                               config_updates={"train": {"snapshot_root": str(tmp_path / "snaps"),
                                                         "latency_batch": 0}, **updates})
        parent = stage(stage="ge", seed=1)
        runs = [stage(stage="imta", ge_run=parent.info["uid"], seed=s, named=n) for s in (1, 2)
                for n in ([], ["released"])]
    finally:
        imta.ex.observers = saved
        torch.set_num_threads(threads)
    assert len({r.info["recipe"] for r in runs}) == 2  # recorded: seeds share one, released has its own
    assert runs[0].info["recipe"] == runs[2].info["recipe"] != runs[1].info["recipe"]
    capsys.readouterr()
    assert analysis_main(["table", str(tmp_path / "runs"), "--variants", "msdnet+ge+isc+ofa"]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if "msdnet+ge+isc+ofa" in line]
    assert len(lines) == 2
    assert sorted("frozen_bn=train" in line for line in lines) == [False, True]  # with released: train-mode BN
    assert all(" 2 " in line for line in lines)  # n_runs: the two seeds of each recipe


@pytest.mark.parametrize("named, expected", [([], ("mean", "eval")), (["released"], ("mean", "train"))])
def test_stage2_defaults_and_released(named, expected):
    config = imta.ex._create_run(named_configs=["fast", *named], config_updates={"stage": "ge"}).config
    assert (config["kl_reduction"], config["frozen_bn"]) == expected


def test_released_itself_sets_both_kl_reduction_and_frozen_bn():
    """``released`` says the released behaviour whatever the defaults are (a default may move, it may not)."""
    released = dict(imta.ex.named_configs["released"]())
    assert (released["kl_reduction"], released["frozen_bn"]) == ("mean", "train")
