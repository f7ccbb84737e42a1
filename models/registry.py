"""Name -> builder registry for multi-exit backbones (timm-style ``create_model``).

Besides registered names, a prefix resolves names of an outside library: ``timm/<name>`` builds any timm model
(models/timm_backbone.py). Those names are checked on use, not listed: timm has over a thousand.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable

from models.multiexit import MultiExitNetwork

_BUILDERS: dict[str, Callable[..., MultiExitNetwork]] = {}
_FAMILIES: dict[str, str] = {}


@dataclass(frozen=True)
class Prefix:
    """How ``<prefix>/<name>`` resolves: ``build(name, **kwargs)``, whether ``name`` exists, and every name (for
    close matches to a typo). The two lookups may import the library, so they run only for prefixed names."""

    build: Callable[..., MultiExitNetwork]
    is_model: Callable[[str], bool]
    names: Callable[[], list[str]]


_PREFIXES: dict[str, Prefix] = {}


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


def register_prefix(prefix: str, build: Callable[..., MultiExitNetwork], is_model: Callable[[str], bool],
                    names: Callable[[], list[str]]) -> None:
    """Make ``<prefix>/<name>`` reach ``build(name, **kwargs)`` for every ``name`` that ``is_model`` accepts; the
    prefix is also the knob family of those names."""
    if prefix in _PREFIXES or "/" in prefix:
        raise ValueError(f"prefix {prefix!r} is registered twice or contains '/'")
    _PREFIXES[prefix] = Prefix(build, is_model, names)


def split_prefix(name: str) -> tuple[str | None, str]:
    """``('timm', 'resnet18')`` for ``'timm/resnet18'``; ``(None, name)`` for names without a registered prefix."""
    prefix, sep, rest = name.partition("/")
    return (prefix, rest) if sep and prefix in _PREFIXES else (None, name)


def list_prefixes() -> list[str]:
    """Prefixes that resolve ``<prefix>/<name>`` names (``['timm']``)."""
    return sorted(_PREFIXES)


def family_of(name: str) -> str:
    """The knob family of a model (``resnet20`` -> ``resnet``, ``timm/resnet18`` -> ``timm``)."""
    _check_name(name)
    prefix, _ = split_prefix(name)
    return prefix or _FAMILIES[name]


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def is_known(name: str) -> bool:
    """A registered name, or ``<prefix>/<name>`` whose library has that model."""
    prefix, rest = split_prefix(name)
    return _PREFIXES[prefix].is_model(rest) if prefix else name in _BUILDERS


def close_matches(name: str, n: int = 3) -> list[str]:
    """Valid names closest to a mistyped one: the library's, with the prefix, for a prefixed name."""
    prefix, rest = split_prefix(name)
    if prefix:
        return [f"{prefix}/{m}" for m in difflib.get_close_matches(rest, _PREFIXES[prefix].names(), n=n)]
    return difflib.get_close_matches(name, _BUILDERS, n=n)


def _check_name(name: str) -> None:
    """An unknown name lists close matches and every valid choice (a prefix's names are only described)."""
    if is_known(name):
        return
    close = close_matches(name)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    if split_prefix(name)[0]:
        raise KeyError(f"Unknown architecture {name!r}.{hint}")
    prefixed = "".join(f", or {p}/<a {p} model name>" for p in list_prefixes())
    raise KeyError(f"Unknown architecture {name!r}.{hint} Valid choices: {', '.join(list_models())}{prefixed}")


def create_model(name: str, **kwargs) -> MultiExitNetwork:
    """Build a registered backbone, or ``<prefix>/<name>`` through its prefix (``timm/resnet18``)."""
    _check_name(name)
    prefix, rest = split_prefix(name)
    return _PREFIXES[prefix].build(rest, **kwargs) if prefix else _BUILDERS[name](**kwargs)
