"""Name -> builder registry for multi-exit backbones (timm-style ``create_model``)."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

from models.multiexit import MultiExitNetwork

_BUILDERS: dict[str, Callable[..., MultiExitNetwork]] = {}
_FAMILIES: dict[str, str] = {}


def register_model(fn: Callable[..., MultiExitNetwork] | None = None, *, family: str | None = None):
    """Decorator (``@register_model`` or ``@register_model(family="resnet")``): make a builder reachable by
    its function name. Builders of one ``family`` take the same knobs (default family: the name itself)."""
    def register(fn: Callable[..., MultiExitNetwork]) -> Callable[..., MultiExitNetwork]:
        if fn.__name__ in _BUILDERS:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _BUILDERS[fn.__name__] = fn
        _FAMILIES[fn.__name__] = family or fn.__name__
        return fn

    return register if fn is None else register(fn)


def family_of(name: str) -> str:
    """The knob family of a registered model (``resnet20`` -> ``resnet``)."""
    _check_name(name)
    return _FAMILIES[name]


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def _check_name(name: str) -> None:
    """An unknown name lists close matches and every valid choice."""
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"Unknown architecture {name!r}.{hint} Valid choices: {', '.join(list_models())}")


def create_model(name: str, **kwargs) -> MultiExitNetwork:
    """Build a registered backbone."""
    _check_name(name)
    return _BUILDERS[name](**kwargs)
