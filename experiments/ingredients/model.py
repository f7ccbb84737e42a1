"""The ``model`` ingredient: an architecture name from the registry and its knobs.

Knobs live in one sub-dict per family (``msdnet``, ``resnet``) so that switching ``arch`` never
feeds one family's knobs to another; every MSDNet preset of the papers is a named config
(``model.phuong_cifar``, ``model.cifar_anytime``, ...).
"""
from __future__ import annotations

import inspect

from sacred import Ingredient

from experiments.ingredients import ingredient
from models import MultiExitNetwork, create_model
from models.msdnet import MSDNET_PRESETS, MSDNet

MSDNET_KNOBS = {
    name: p.default
    for name, p in inspect.signature(MSDNet).parameters.items()
    if p.default is not inspect.Parameter.empty and name not in ("in_channels", "image_size", "n_scales", "ge_scope")
}


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
