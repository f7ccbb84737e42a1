"""The ``model`` ingredient: an architecture name from the registry and its knobs.

Knobs live in one sub-dict per family (``model.msdnet``, ``model.resnet``, ...), so that switching ``arch``
never feeds one family's knobs to another. A family registers its knobs once (``register_family``: the
defaults ``print_config`` shows and the rules that check them); the registry says which family each
architecture belongs to (``register_model(family=...)``; a prefixed name such as ``timm/resnet18`` to the family
of its prefix, ``model.timm``). Every MSDNet preset of the papers is a named
config (``model.phuong_cifar``, ``model.cifar_anytime``, ...).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sacred import Ingredient

from experiments.ingredients import ingredient
from experiments.validation import (Validator, boolean, choice, either, integer, list_of, merge_rules, number,
                                   optional, satisfies, scoped, string)
from models import MultiExitNetwork, create_model, list_models
from models.bert import ATTENTION_MASKS, bert_exits
from models.registry import close_matches, family_of, is_known, list_prefixes, split_prefix
from models.timm_backbone import HEADS as TIMM_HEADS
from models.resnet_cifar import SHORTCUTS
from models.msdnet import INITS, MSDNET_PRESETS, PRUNE_MODES, STEP_MODES, TRANSITION_ROUNDINGS, MSDNet

MSDNET_KNOBS = {
    name: p.default
    for name, p in inspect.signature(MSDNet).parameters.items()
    if p.default is not inspect.Parameter.empty and name not in ("in_channels", "image_size", "n_scales", "ge_scope")
}

# One rule per MSDNet knob (MSDNET_KNOBS, plus n_scales that the presets set): the ranges of MSDNet._check_knobs.
MSDNET_RULES = dict(
    n_scales=optional(integer(min=1)),
    n_blocks=integer(min=1),
    base=integer(min=1),
    step=integer(min=0),
    stepmode=choice(*STEP_MODES),
    n_channels=integer(min=1),
    growth_rate=integer(min=1),
    gr_factor=list_of(integer(min=1)),
    bn_factor=list_of(integer(min=1)),
    bottleneck=boolean,
    prune=choice(*PRUNE_MODES),
    reduction=number(min=0, max=1, max_open=True),
    conv_bias=boolean,
    transition_rounding=choice(*TRANSITION_ROUNDINGS),
    head_width=optional(integer(min=1)),
    init=choice(*INITS),
)


BERT_KNOBS = {
    name: p.default
    for name, p in inspect.signature(bert_exits).parameters.items()
    if p.default is not inspect.Parameter.empty and name not in ("in_channels", "image_size", "ge_scope")
}
BERT_RULES = dict(
    pretrained=optional(string),  # a local directory or a hub name; None: random init from the sizes below
    vocab_size=integer(min=1),
    hidden_size=integer(min=1),
    layers=integer(min=1),
    heads=integer(min=1),
    intermediate_size=integer(min=1),
    max_length=integer(min=1),
    exits=list_of(integer(min=1)),
    attention_mask=choice(*ATTENTION_MASKS),
)


# timm/<name>: any timm model with feature stages (models/timm_backbone.py). ``kwargs`` go to timm.create_model.
TIMM_KNOBS = dict(exits=None, head="linear", pretrained=False, kwargs={})
TIMM_RULES = dict(
    exits=optional(list_of(integer(min=0))),  # timm feature stage indices; None: every stage
    head=choice(*TIMM_HEADS),
    pretrained=either(boolean, string),  # True: timm's weights (downloaded); a path: a local timm checkpoint
    kwargs=satisfies(lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
                     "a dict of timm.create_model keyword arguments"),
)


def architecture(value: Any) -> str | None:
    """A registered name, or ``<prefix>/<name>`` of a library's model (``timm/resnet18``), which only that library
    can check: its names are too many to list."""
    if not isinstance(value, str):
        value = ""  # no close matches; the phrase lists the choices
    if is_known(value):
        return None
    close = close_matches(value)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    prefix, _ = split_prefix(value)
    if prefix:
        return f"'{prefix}/' and the name of a {prefix} model{hint}"
    prefixed = "".join(f" or '{p}/<a {p} model name>'" for p in list_prefixes())
    return f"one of {', '.join(repr(n) for n in list_models())}{prefixed}{hint}"


@dataclass(frozen=True)
class Family:
    """The knobs every architecture of a family takes: their defaults and the rules that check them."""

    knobs: dict[str, Any]
    rules: dict[str, Validator]


FAMILIES: dict[str, Family] = {}


def register_family(name: str, knobs: dict[str, Any], rules: dict[str, Validator]) -> None:
    """Make ``model.<name>.*`` a knob dict of the model ingredient (call before the experiments import)."""
    unchecked = sorted(set(knobs) - set(rules))
    if unchecked:
        raise ValueError(f"family {name!r}: knobs without a rule: {unchecked}")
    FAMILIES[name] = Family(dict(knobs), dict(rules))


register_family("msdnet", MSDNET_KNOBS, MSDNET_RULES)
register_family("resnet", dict(width=16, shortcut="A"), dict(width=integer(min=1), shortcut=choice(*SHORTCUTS)))
register_family("resnet_imagenet", dict(width=64, shortcut="B"),
                dict(width=integer(min=1), shortcut=choice(*SHORTCUTS)))
register_family("wrn", dict(dropout=0.0), dict(dropout=number(min=0, max=1, max_open=True)))
register_family("vgg", {}, {})
register_family("resnet_bottleneck", dict(width=16), dict(width=integer(min=1)))
register_family("densenet", dict(growth=12), dict(growth=integer(min=1)))
register_family("bert", BERT_KNOBS, BERT_RULES)
register_family("timm", TIMM_KNOBS, TIMM_RULES)
register_family("t2t_vit", dict(exits=None, drop_path=0.1, qk_scale=None, token_dim=64),
                dict(exits=optional(list_of(integer(min=0))), drop_path=number(min=0, max=1, max_open=True),
                     qk_scale=optional(number(min=0, min_open=True)), token_dim=integer(min=1)))

RULES = merge_rules({"model.arch": architecture},
                    *(scoped(f"model.{name}", family.rules) for name, family in FAMILIES.items()))

# A 3-exit ResNet-8 of width 4 for tests and smoke runs of the experiments that train ResNets.
FAST_RESNET = dict(arch="resnet8", resnet=dict(width=4))

# A tiny two-scale, 3-exit MSDNet for tests and smoke runs (16 px synthetic images).
FAST_MSDNET = dict(n_blocks=3, base=1, step=1, stepmode="even", n_channels=4, growth_rate=4, gr_factor=[1, 2],
                   bn_factor=[1, 2], prune="min", head_width=8, n_scales=2)


def msdnet_knobs(preset: str) -> dict:
    """Every MSDNet knob, with the preset's values over the builder's defaults."""
    return {**MSDNET_KNOBS, **MSDNET_PRESETS[preset]}


def model_config():
    arch = "msdnet"  # a registered architecture (models.list_models()) or timm/<name>; knobs: model.<family>
    locals()  # sacred reads these names; this line tells linters they are used


def model_ingredient(preset: str = "phuong_cifar", **defaults) -> Ingredient:
    """A ``model`` ingredient defaulting to an MSDNet preset, every family's knobs, a named config per preset."""
    named = {name: dict(arch="msdnet", msdnet=msdnet_knobs(name)) for name in MSDNET_PRESETS}
    named["fast"] = dict(arch="msdnet", msdnet=FAST_MSDNET)
    knobs = {name: dict(family.knobs) for name, family in FAMILIES.items() if family.knobs}
    return ingredient("model", model_config, {**knobs, "msdnet": msdnet_knobs(preset), **defaults}, named)


def build(config: dict, num_classes: int, in_channels: int, image_size: int, ge_scope: str = "off") -> MultiExitNetwork:
    """Build ``config['arch']`` for the data's shape, with its family's knobs."""
    knobs = dict(config.get(family_of(config["arch"]), {}))
    knobs.pop("num_classes", None)
    return create_model(
        config["arch"], num_classes=num_classes, in_channels=in_channels, image_size=image_size,
        ge_scope=ge_scope, **knobs,
    )
