"""A run's recipe: every config value that changes its numbers. Runs of one recipe differ only in the seed.

Left out are the seed, references to other runs and where/how fast a run goes (``RUNTIME_KEYS``); the
recipe of a later stage includes its parent's. Each run records ``info.recipe``, a short key of its recipe;
:func:`recipe_labels` names a run's recipe for a table or legend by the config values that set it apart
from the other runs of its experiment and variant (``kl_reduction=mean, frozen_bn=train``), so runs of
different recipes are never averaged as seeds of one.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd

# Where and how fast a run goes, never what it computes.
RUNTIME_KEYS = ("train.resume", "train.progress", "train.threads", "train.device", "train.latency_batch",
                "train.snapshot_root", "data.root", "data.workers", "data.download", "data.eval_batch_size")
# Not part of a recipe: the seeds, references to other runs (their recipe counts instead), sacred's docs.
NOT_RECIPE_KEYS = RUNTIME_KEYS + ("seed", "data.split_file", "ge_run", "teacher_run", "heads_run", "hint_run",
                                  "assistant_run", "train_run", "backbone_run", "__doc__")
PARENT_KEY = "parent.recipe"
NO_DIFFERENCE = "-"


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{'optim': {'lr': 0.1}}`` -> ``{'optim.lr': 0.1}`` (empty dicts stay values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def is_free(key: str, free: tuple[str, ...]) -> bool:
    """Whether ``key`` is one of ``free`` or lies below one of them."""
    return any(key == f or key.startswith(f + ".") for f in free)


def recipe_config(config: dict, parent_recipe: str | None = None) -> dict[str, Any]:
    """The flat config values that make up the recipe, plus the parent's recipe key."""
    recipe = {k: v for k, v in flatten(config).items() if not is_free(k, NOT_RECIPE_KEYS)}
    if parent_recipe is not None:
        recipe[PARENT_KEY] = parent_recipe
    return recipe


def recipe_key(config: dict, parent_recipe: str | None = None) -> str:
    """8 hex digits naming the recipe: equal for the seeds of one recipe, different otherwise."""
    text = json.dumps(recipe_config(config, parent_recipe), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _label(values: pd.Series) -> str:
    parts = [f"{key.split('.', 1)[1]}={value}" for key, value in values.items()]  # without config./info.
    return ", ".join(parts) or NO_DIFFERENCE


def recipe_labels(runs: pd.DataFrame) -> pd.Series:
    """Per run, the recipe values that differ among the runs of its experiment and variant (``-`` if none).

    Reads the flat ``config.*`` columns and ``info.parent.recipe`` of :func:`analysis.runs.load_runs`.
    """
    columns = [c for c in runs.columns if c.startswith("config.") and not is_free(c[7:], NOT_RECIPE_KEYS)]
    if f"info.{PARENT_KEY}" in runs.columns:
        columns.append(f"info.{PARENT_KEY}")
    values = runs[columns].astype(str)
    labels = pd.Series(NO_DIFFERENCE, index=runs.index, dtype=object)
    for _, group in runs.groupby(["experiment", "variant"], dropna=False, sort=False):
        block = values.loc[group.index]
        varying = [c for c in columns if block[c].nunique(dropna=False) > 1]
        labels.loc[group.index] = [_label(row) for _, row in block[varying].iterrows()]
    return labels
