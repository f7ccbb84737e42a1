"""Name -> builder registry for multi-exit backbones (timm-style ``create_model``)."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

from models.multiexit import MultiExitNetwork

_BUILDERS: dict[str, Callable[..., MultiExitNetwork]] = {}


def register_model(fn: Callable[..., MultiExitNetwork]) -> Callable[..., MultiExitNetwork]:
    """Decorator: make a builder reachable by its function name."""
    if fn.__name__ in _BUILDERS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _BUILDERS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs) -> MultiExitNetwork:
    """Build a registered backbone; an unknown name lists close matches and every valid choice."""
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"Unknown architecture {name!r}.{hint} Valid choices: {', '.join(list_models())}")
    return _BUILDERS[name](**kwargs)
