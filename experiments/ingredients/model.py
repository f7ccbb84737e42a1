"""The ``model`` ingredient: an architecture name from the registry and its knobs.

Knobs live in one sub-dict per family (``msdnet``, ``resnet``) so that switching ``arch`` never
feeds one family's knobs to another; every MSDNet preset of the papers is a named config
(``model.phuong_cifar``, ``model.cifar_anytime``, ...).
"""
from __future__ import annotations

import inspect

from sacred import Ingredient

from experiments.ingredients import ingredient
from experiments.validation import boolean, choice, integer, list_of, merge_rules, number, optional, scoped
from models import MultiExitNetwork, create_model, list_models
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

RULES = merge_rules(
    {"model.arch": choice(*list_models()), "model.resnet.width": integer(min=1)},
    scoped("model.msdnet", MSDNET_RULES),
)

# A tiny two-scale, 3-exit MSDNet for tests and smoke runs (16 px synthetic images).
FAST_MSDNET = dict(n_blocks=3, base=1, step=1, stepmode="even", n_channels=4, growth_rate=4, gr_factor=[1, 2],
                   bn_factor=[1, 2], prune="min", head_width=8, n_scales=2)


def msdnet_knobs(preset: str) -> dict:
    """Every MSDNet knob, with the preset's values over the builder's defaults."""
    return {**MSDNET_KNOBS, **MSDNET_PRESETS[preset]}


def model_config():
    arch = "msdnet"  # msdnet, resnet8/14/20/56/110 (models.list_models())
    resnet = dict(width=16)  # CIFAR ResNet knobs (arch resnet*)
    locals()  # sacred reads these names; this line tells linters they are used


def model_ingredient(preset: str = "phuong_cifar", **defaults) -> Ingredient:
    """A ``model`` ingredient defaulting to an MSDNet preset; one named config per preset."""
    named = {name: dict(arch="msdnet", msdnet=msdnet_knobs(name)) for name in MSDNET_PRESETS}
    named["fast"] = dict(arch="msdnet", msdnet=FAST_MSDNET)
    return ingredient("model", model_config, dict(msdnet=msdnet_knobs(preset), **defaults), named)


def family(arch: str) -> str:
    """Which knob dict an architecture reads: 'msdnet' or 'resnet'."""
    return "msdnet" if arch.startswith("msdnet") else "resnet" if arch.startswith("resnet") else ""


def build(config: dict, num_classes: int, in_channels: int, image_size: int, ge_scope: str = "off") -> MultiExitNetwork:
    """Build ``config['arch']`` for the data's shape, with its family's knobs."""
    knobs = dict(config.get(family(config["arch"]), {}))
    knobs.pop("num_classes", None)
    return create_model(
        config["arch"], num_classes=num_classes, in_channels=in_channels, image_size=image_size,
        ge_scope=ge_scope, **knobs,
    )
