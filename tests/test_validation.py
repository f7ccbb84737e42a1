"""Config validation: typos in keys and impossible values fail before a run exists, in one line."""
from __future__ import annotations

import math

import pytest
from sacred import Experiment

from data import DATASETS
from experiments import imta, multiexit_distillation
from experiments.engine.hardware import AMP_MODES
from experiments.engine.schedules import SCHEDULES
from experiments.engine.trainer import SELECT_MODES
from experiments.ingredients import model as model_ing
from experiments.validation import (
    ConfigError, _lookup, choice, either, integer, list_of, merge_rules, number, optional, rules_of, validate,
    validate_run, validate_updates,
)
from models import list_models

MODULES = {"imta": imta, "md": multiexit_distillation}
# IMTA has no default stage; every IMTA case below chooses stage 1 unless it is about the stage.
BASE = {"imta": {"stage": "ge"}, "md": {}}


def check(which: str, updates: dict, named: tuple[str, ...] = ("fast",), command: str | None = None) -> None:
    """Validate as the experiments do: the updates first, then the run sacred creates (no observer, no record).

    ``Experiment._create_run`` is sacred's own, so only validation (no resume or parent lookup) runs here.
    """
    module = MODULES[which]
    rules = rules_of(module.NAME)
    updates = {**BASE[which], **updates}
    validate_updates(updates, rules)
    run = Experiment._create_run(module.ex, command_name=command, named_configs=list(named), config_updates=updates)
    validate_run(run, rules)


BAD = [
    # unknown keys inside ingredients (sacred accepts these silently)
    ("imta", {"train.resum": 1}, "unknown config key 'train.resum'. Did you mean 'train.resume'? Valid keys of train:"),
    ("md", {"train.resum": 1}, "Did you mean 'train.resume'?"),
    ("imta", {"optim.lrr": 0.1}, "unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"),
    ("md", {"train.epoch": 3}, "Did you mean 'train.epochs'?"),
    ("imta", {"model.msdnett.n_blocks": 3}, "unknown config key 'model.msdnett'. Did you mean 'model.msdnet'"),
    ("md", {"data.batchsize": 16}, "Did you mean 'data.batch_size'"),
    ("md", {"model.msdnet.n_block": 3}, "Did you mean 'model.msdnet.n_blocks'?"),
    ("imta", {"model.resnet.depth": 20}, "unknown config key 'model.resnet.depth'. Did you mean "
                                         "'model.resnet.width'? Valid keys of model.resnet: shortcut, width"),
    ("md", {"model.msdnet.num_classes": 10}, "unknown config key 'model.msdnet.num_classes'"),
    # unknown top-level keys (sacred's ConfigAddedError would be a multi-line traceback)
    ("imta", {"gama": 0.5}, "unknown config key 'gama'. Did you mean 'gamma'? Valid keys at the top level:"),
    ("md", {"tempreature": "const"}, "Did you mean 'temperature'"),
    # sacred's seed (sacred asserts inside _create_run otherwise)
    ("imta", {"seed": "abc"}, "invalid seed='abc': expected an integer in [0, 4294967295]"),
    ("md", {"seed": -1}, "invalid seed=-1"),
    # train
    ("md", {"train.epochs": -3}, "invalid train.epochs=-3: expected an integer >= 1"),
    ("md", {"train.epochs": 0}, "invalid train.epochs=0: expected an integer >= 1"),
    ("imta", {"train.epochs": 2.5}, "invalid train.epochs=2.5: expected an integer >= 1"),
    ("md", {"train.latency_batch": -1}, "invalid train.latency_batch=-1: expected an integer >= 0"),
    ("imta", {"train.device": "tpu"}, "invalid train.device='tpu': expected one of 'auto', 'cpu', 'cuda', "
                                      "'cuda:N', 'mps'"),
    ("md", {"train.device": "cuda:x"}, "invalid train.device='cuda:x'"),
    ("md", {"train.amp": "fp8"}, "invalid train.amp='fp8': expected one of 'off', 'bf16', 'fp16'"),
    ("imta", {"train.select": "best"}, "expected one of 'best_val', 'last', 'lowest_test_loss' (did you mean 'best_val'?)"),
    ("md", {"train.threads": 0}, "invalid train.threads=0: expected None or an integer >= 1"),
    ("md", {"train.resume": ""}, "invalid train.resume='': expected None or a non-empty string or an integer >= 1"),
    ("imta", {"train.channels_last": 1}, "invalid train.channels_last=1: expected True or False"),
    ("md", {"train.progress": "no"}, "invalid train.progress='no': expected True or False"),
    ("md", {"train.snapshot_root": None}, "invalid train.snapshot_root=None: expected a non-empty string"),
    # optim
    ("md", {"optim.schedule": "cosin"}, "invalid optim.schedule='cosin': expected one of 'multistep', 'cosine', "
                                        "'constant' (did you mean 'cosine'?)"),
    ("imta", {"optim.lr": 0}, "invalid optim.lr=0: expected a number > 0"),
    ("md", {"optim.lr": math.nan}, "invalid optim.lr=nan: expected a number > 0"),
    ("md", {"optim.momentum": 1.0}, "invalid optim.momentum=1.0: expected a number in [0, 1)"),
    ("imta", {"optim.weight_decay": -1e-4}, "expected a number >= 0"),
    ("md", {"optim.gamma": 0}, "invalid optim.gamma=0: expected a number in (0, 1]"),
    ("md", {"optim.milestones": [150, 0]}, "expected a list with each item an integer >= 1"),
    ("imta", {"optim.milestones": 150}, "invalid optim.milestones=150: expected a list with each item an integer"),
    ("md", {"optim.warmup_epochs": -1}, "invalid optim.warmup_epochs=-1: expected a number >= 0"),
    ("md", {"optim.nesterov": "true"}, "invalid optim.nesterov='true': expected True or False"),
    # data
    ("md", {"data.name": "cifar1000"}, "invalid data.name='cifar1000': expected one of 'cifar10', 'cifar100'"),
    ("imta", {"data.batch_size": 0}, "invalid data.batch_size=0: expected an integer >= 1"),
    ("md", {"data.eval_batch_size": 1.5}, "invalid data.eval_batch_size=1.5"),
    ("md", {"data.val_size": -5}, "invalid data.val_size=-5: expected an integer >= 0 or a number in [0, 1)"),
    ("imta", {"data.val_size": 1.5}, "invalid data.val_size=1.5"),
    ("md", {"data.n_per_class": 0}, "invalid data.n_per_class=0: expected None or an integer >= 1"),
    ("md", {"data.workers": -1}, "invalid data.workers=-1: expected an integer >= 0"),
    ("md", {"data.split_seed": -1}, "invalid data.split_seed=-1: expected an integer >= 0"),
    ("imta", {"data.augment": None}, "invalid data.augment=None: expected True or False"),
    ("md", {"data.download": "yes"}, "invalid data.download='yes': expected True or False"),
    ("md", {"data.class_balanced": 0}, "invalid data.class_balanced=0: expected True or False"),
    ("md", {"data.root": 5}, "invalid data.root=5: expected None or a non-empty string"),
    ("md", {"data.split_file": ""}, "invalid data.split_file='': expected None or a non-empty string"),
    # model
    ("md", {"model.arch": "resnet21"}, "invalid model.arch='resnet21': expected one of"),
    ("imta", {"model.msdnet.stepmode": "linear"}, "expected one of 'even', 'lin_grow'"),
    ("md", {"model.msdnet.prune": "mid"}, "invalid model.msdnet.prune='mid': expected one of 'min', 'max'"),
    ("md", {"model.msdnet.reduction": 1.0}, "invalid model.msdnet.reduction=1.0: expected a number in [0, 1)"),
    ("imta", {"model.msdnet.gr_factor": [1, 0]}, "expected a list with each item an integer >= 1"),
    ("md", {"model.msdnet.head_width": 0}, "expected None or an integer >= 1"),
    ("md", {"model.msdnet.n_scales": 0}, "invalid model.msdnet.n_scales=0: expected None or an integer >= 1"),
    ("md", {"model.msdnet.n_blocks": 0}, "invalid model.msdnet.n_blocks=0: expected an integer >= 1"),
    ("md", {"model.msdnet.base": 0}, "invalid model.msdnet.base=0: expected an integer >= 1"),
    ("md", {"model.msdnet.step": -1}, "invalid model.msdnet.step=-1: expected an integer >= 0"),
    ("md", {"model.msdnet.n_channels": 2.5}, "invalid model.msdnet.n_channels=2.5: expected an integer >= 1"),
    ("md", {"model.msdnet.growth_rate": 0}, "invalid model.msdnet.growth_rate=0: expected an integer >= 1"),
    ("md", {"model.msdnet.bn_factor": [1, -2]}, "invalid model.msdnet.bn_factor=[1, -2]: expected a list with each"),
    ("md", {"model.msdnet.bottleneck": "yes"}, "invalid model.msdnet.bottleneck='yes': expected True or False"),
    ("md", {"model.msdnet.conv_bias": None}, "invalid model.msdnet.conv_bias=None: expected True or False"),
    ("md", {"model.msdnet.transition_rounding": "round"}, "expected one of 'channels', 'multiplier'"),
    ("md", {"model.msdnet.init": "kaiming"}, "invalid model.msdnet.init='kaiming': expected one of 'msdnet'"),
    ("md", {"model.msdnet": 3}, "invalid model.msdnet=3: expected a dict of base, bn_factor"),
    ("imta", {"model.resnet.width": 0}, "invalid model.resnet.width=0: expected an integer >= 1"),
    # IMTA's own keys
    ("imta", {"stage": None}, "invalid stage=None: expected one of 'ge', 'imta'"),
    ("imta", {"stage": "gee"}, "invalid stage='gee': expected one of 'ge', 'imta' (did you mean 'ge'?)"),
    ("imta", {"ge_scope": "coarse"}, "invalid ge_scope='coarse': expected one of 'off', 'coarsest', 'all'"),
    ("imta", {"gamma": 1.5}, "invalid gamma=1.5: expected a number in [0, 1]"),
    ("imta", {"temperature": 0}, "invalid temperature=0: expected a number > 0"),
    ("imta", {"kl_reduction": "sum"}, "invalid kl_reduction='sum': expected one of 'batchmean', 'mean'"),
    ("imta", {"isc_detach": "yes"}, "invalid isc_detach='yes': expected True or False"),
    ("imta", {"frozen_bn": "frozen"}, "invalid frozen_bn='frozen': expected one of 'eval', 'train'"),
    ("imta", {"stage": "imta", "ge_run": 0}, "invalid ge_run=0: expected None or a non-empty string or an integer"),
    # Phuong & Lampert's keys
    ("md", {"c": 5}, "invalid c=5: expected a number in [0, 1]"),
    ("md", {"temperature": "adaptiv"}, "expected one of 'adaptive', 'const' (did you mean 'adaptive'?)"),
    ("md", {"initial_temperature": 0}, "invalid initial_temperature=0: expected a number > 0"),
    ("md", {"max_prob": 1}, "invalid max_prob=1: expected a number in (0, 1)"),
    ("md", {"t_mult": 0.9}, "invalid t_mult=0.9: expected a number >= 1"),
    ("md", {"global_scale": 0}, "invalid global_scale=0: expected None or a number > 0"),
    ("md", {"distillation": "no"}, "invalid distillation='no': expected True or False"),
]


@pytest.mark.parametrize("which, updates, fragment", BAD, ids=[f"{w}-{u}" for w, u, _ in BAD])
def test_bad_config_fails_in_one_line(which, updates, fragment):
    with pytest.raises(ConfigError) as err:
        check(which, updates)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_typo_in_a_named_config_is_found_in_the_created_run():
    """A named config's keys reach only the created run: ``validate_run`` walks its whole config."""
    ex = Experiment("typo")
    ex.add_config(train=dict(epochs=1))
    ex.add_named_config("bad", train=dict(epoch=3))
    ex.main(lambda train: None)
    with pytest.raises(ConfigError, match="Did you mean 'train.epochs'"):
        validate_run(ex._create_run(named_configs=["bad"]), {"seed": integer(), "train.epochs": integer(min=1)})


def named_configs(which: str) -> list[str]:
    """Every named config of an experiment, its ingredients' included ('fast', 'data.fast', 'model.cifar_anytime')."""
    return [name for name, _ in MODULES[which].ex.gather_named_configs()]


@pytest.mark.parametrize("which, named", [(w, n) for w in MODULES for n in named_configs(w)])
def test_every_named_config_passes(which, named):
    check(which, {}, named=(named,))


GOOD = [
    ("md", {}),
    ("imta", {"stage": "imta", "ge_run": 3}),
    ("imta", {"stage": "imta", "ge_run": "20261125-110512-3fa9c1"}),
    ("imta", {"stage": "imta", "ge_run": "snapshots/imta/1/final.pt", "gamma": 0, "isc_detach": True}),
    ("md", {"data.name": "CIFAR-10", "data.val_size": 0.1, "data.n_per_class": 20, "data.root": "/data"}),
    ("md", {"data.val_size": 0, "train.select": "last", "train.latency_batch": 0}),
    ("md", {"train.device": "cuda:1", "train.resume": 3, "train.threads": 2, "seed": 0}),
    ("md", {"train.device": "mps", "train.resume": "snapshots/multiexit_distillation/3/last.pt"}),
    ("md", {"model.arch": "resnet8", "model.resnet.width": 8, "optim.schedule": "multistep",
            "optim.milestones": [1], "optim.gamma": 1, "optim.momentum": 0, "optim.warmup_epochs": 0.5}),
    ("md", {"c": 0, "global_scale": 2.5, "temperature": "const", "initial_temperature": 4.0, "t_mult": 1}),
    ("md", {"c": 1, "model.msdnet.head_width": None, "model.msdnet.n_scales": None, "data.split_file": "s.npz"}),
]


@pytest.mark.parametrize("which, updates", GOOD)
def test_good_values_pass(which, updates):
    check(which, updates)


@pytest.mark.parametrize("which", MODULES)
def test_defaults_pass_without_named_configs(which):
    check(which, {}, named=())


@pytest.mark.parametrize("key, values", [
    ("train.amp", AMP_MODES), ("train.select", SELECT_MODES), ("optim.schedule", SCHEDULES),
    ("data.name", DATASETS), ("model.arch", list_models()),
    ("ge_scope", tuple(imta.GE_VARIANTS)), ("stage", imta.STAGES),
])
def test_choices_come_from_the_source_of_truth(key, values):
    rule = rules_of("imta")[key]
    assert all(rule(v) is None for v in values)


def test_every_msdnet_knob_has_a_rule():
    assert set(model_ing.MSDNET_RULES) == set(model_ing.MSDNET_KNOBS) | {"n_scales"}


@pytest.mark.parametrize("which", MODULES)
def test_every_rule_names_a_config_key(which):
    """A rule whose key left the config would validate nothing (``fast`` sets ``__doc__`` too)."""
    run = Experiment._create_run(MODULES[which].ex, named_configs=["fast"], config_updates=BASE[which])
    assert [key for key in rules_of(MODULES[which].NAME) if not _lookup(run.config, key)[0]] == []


def test_showing_the_config_checks_keys_but_not_values():
    """``print_config`` works before IMTA's stage is chosen, yet still reports a typo."""
    check("imta", {"stage": None}, named=(), command="print_config")
    with pytest.raises(ConfigError, match="train.resum"):
        check("imta", {"stage": None, "train.resum": 1}, named=(), command="print_config")


def test_named_configs_have_docstrings_for_print_named_configs():
    for module in MODULES.values():
        assert all(scope.__doc__ for scope in module.ex.named_configs.values())


def test_combinators():
    assert optional(integer(min=1))(None) is None
    assert either(integer(), choice("a"))(True) == "an integer or one of 'a'"
    assert list_of(number(max=1, max_open=True))((0.5, 0)) is None
    assert number()(math.inf) == "a number"
    assert choice("x", normalize=str.lower)("X") is None


def test_validate_reports_the_shallowest_unknown_key_first():
    rules = {"a.b": integer()}
    with pytest.raises(ConfigError, match="unknown config key 'a.c' Valid keys of a: b"):
        validate({"a": {"b": 1, "c": {"d": 2}}}, rules)
    with pytest.raises(ConfigError, match="unknown config key 'z'"):
        validate({"a": {"b": 1}}, rules, added_keys=["z"])


def test_rule_sets_must_not_overlap_and_names_must_be_registered():
    with pytest.raises(ValueError, match="defined twice"):
        merge_rules({"a": integer()}, {"a": integer()})
    with pytest.raises(KeyError, match="no config rules registered"):
        rules_of("nope")
