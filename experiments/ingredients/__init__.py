"""Sacred ingredients shared by every experiment: ``data``, ``model``, ``optim``, ``train``.

Each is built by a factory taking the paper's defaults, so one experiment's ``print_config`` shows
its paper's values while the keys, their comments and the ``fast`` named configs stay shared.
"""
from __future__ import annotations

from typing import Callable

from sacred import Ingredient


def ingredient(name: str, config_scope: Callable, defaults: dict, named: dict[str, dict] | None = None) -> Ingredient:
    """An ingredient from a commented config scope, paper ``defaults`` over it, and named configs."""
    result = Ingredient(name)
    result.config(config_scope)
    if defaults:
        result.add_config(defaults)
    for key, values in (named or {}).items():
        result.add_named_config(key, values)
    return result
