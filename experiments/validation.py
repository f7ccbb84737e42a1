"""Config validation before a run starts: unknown keys and impossible values fail in one line.

Sacred accepts any key inside an ingredient (``train.resum=1`` silently starts a fresh run) and any
value; the mistake surfaces later as a traceback, after a FAILED run record exists. Here each
ingredient and experiment declares ``RULES`` (dotted key -> validator) and :func:`validate_run`
checks a created run against them before any observer has started.

A validator takes a value and returns ``None`` when it is fine, else a phrase saying what is valid
("an integer >= 1"), so validators compose (``optional``, ``either``, ``list_of``) into readable
messages.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable, Iterable, Mapping, Optional

from sacred.utils import convert_to_nested_dict

Validator = Callable[[Any], Optional[str]]

_NOTHING = object()  # a value every type-checking validator refuses: asking it yields the validator's phrase

_REGISTRY: dict[str, dict[str, Validator]] = {}


class ConfigError(ValueError):
    """A config key that no rule knows, or a value its rule refuses; the message is one line."""


# ------------------------------------------------------------------------------------ validators


def satisfies(ok: Callable[[Any], bool], expected: str) -> Validator:
    """A validator from a predicate and the phrase describing what it accepts."""
    return lambda value: None if ok(value) else expected


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """Finite int or float; bools are excluded because ``True`` would pass as 1."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _bounds(min: float | None, max: float | None, min_open: bool, max_open: bool) -> tuple[Callable, str]:
    """A range predicate and its wording: '>= 1', '> 0', 'in (0, 1]'."""
    def within(value) -> bool:
        above = min is None or (value > min if min_open else value >= min)
        below = max is None or (value < max if max_open else value <= max)
        return above and below

    if min is not None and max is not None:
        text = f" in {'(' if min_open else '['}{min}, {max}{')' if max_open else ']'}"
    elif min is not None:
        text = f" {'>' if min_open else '>='} {min}"
    elif max is not None:
        text = f" {'<' if max_open else '<='} {max}"
    else:
        text = ""
    return within, text


def integer(min: int | None = None, max: int | None = None) -> Validator:
    """An int (not a bool, not 2.0) within [min, max]."""
    within, text = _bounds(min, max, False, False)
    return satisfies(lambda v: _is_int(v) and within(v), f"an integer{text}")


def number(min: float | None = None, max: float | None = None, min_open: bool = False,
           max_open: bool = False) -> Validator:
    """A finite int or float within the bounds; ``*_open`` excludes that bound."""
    within, text = _bounds(min, max, min_open, max_open)
    return satisfies(lambda v: _is_real(v) and within(v), f"a number{text}")


boolean: Validator = satisfies(lambda v: isinstance(v, bool), "True or False")
string: Validator = satisfies(lambda v: isinstance(v, str) and v != "", "a non-empty string")
none: Validator = satisfies(lambda v: v is None, "None")


def matches(pattern: str, expected: str) -> Validator:
    """A string matching the whole regular expression ``pattern``."""
    return satisfies(lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None, expected)


def choice(*values: Any, normalize: Callable[[Any], Any] = lambda v: v) -> Validator:
    """One of ``values`` (after ``normalize``, e.g. dataset aliases), with a close-match hint for strings."""
    expected = "one of " + ", ".join(repr(v) for v in values)

    def check(value: Any) -> str | None:
        if normalize(value) in values:
            return None
        close = _close(value, [v for v in values if isinstance(v, str)])
        return expected + (f" (did you mean {_alternatives(close)}?)" if close else "")

    return check


def either(*validators: Validator) -> Validator:
    """Valid when any of ``validators`` accepts the value."""
    def check(value: Any) -> str | None:
        errors = [v(value) for v in validators]
        return None if None in errors else " or ".join(errors)

    return check


def optional(validator: Validator) -> Validator:
    """None (sacred's 'not set' default) or what ``validator`` accepts."""
    return either(none, validator)


def list_of(validator: Validator) -> Validator:
    """A list (or tuple) whose every element ``validator`` accepts."""
    def check(value: Any) -> str | None:
        ok = isinstance(value, (list, tuple)) and all(validator(v) is None for v in value)
        return None if ok else f"a list with each item {validator(_NOTHING)}"

    return check


# Keys sacred itself puts in every config: ``seed`` (numpy refuses seeds outside [0, 2**32)) and
# ``__doc__``, the docstring of the last named config used.
SACRED_RULES: dict[str, Validator] = {"seed": integer(min=0, max=2**32 - 1), "__doc__": string}


# ------------------------------------------------------------------------------------- checking


def _close(word: Any, candidates: Iterable[str]) -> list[str]:
    """The (at most two) candidates closest to a mistyped string; none for other values."""
    return difflib.get_close_matches(word, list(candidates), n=2) if isinstance(word, str) else []


def _alternatives(words: Iterable[str]) -> str:
    return " or ".join(repr(w) for w in words)


def _walk(config: Mapping, rules: Mapping[str, Validator], prefix: str = "") -> Iterable[str]:
    """Every dotted key of ``config``; dicts under a rule key are that rule's business, not walked."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, Mapping) and path not in rules:
            yield from _walk(value, rules, path + ".")


def _key_space(rules: Mapping[str, Validator]) -> set[str]:
    """Rule keys and every dict above them ('model.msdnet.n_blocks' makes 'model' and 'model.msdnet')."""
    parts = [key.split(".") for key in rules]
    return {".".join(p[:i]) for p in parts for i in range(1, len(p) + 1)}


def _is_known(key: str, space: set[str], rules: Mapping[str, Validator]) -> bool:
    return key in space or any(key.startswith(r + ".") for r in rules)


def _children(key: str, space: set[str]) -> list[str]:
    """Sorted dotted keys one level below ``key`` ('' for the top level)."""
    return sorted(k for k in space if k.rpartition(".")[0] == key)


def _unknown_key_message(key: str, space: set[str]) -> str:
    """The key, its closest valid siblings (matched on the last name only), and every valid sibling."""
    parent, _, name = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    names = [k.rpartition(".")[2] for k in _children(parent, space)]
    close = _close(name, names)
    hint = f". Did you mean {_alternatives(prefix + c for c in close)}?" if close else ""
    where = f"of {parent}" if parent else "at the top level"
    listed = ", ".join(n for n in names if not n.startswith("__"))
    return f"unknown config key {key!r}{hint} Valid keys {where}: {listed}"


def _dict_of(key: str, space: set[str]) -> Validator:
    """Accepts a dict, as every key holding other keys must be."""
    names = ", ".join(k.rpartition(".")[2] for k in _children(key, space))
    return satisfies(lambda v: isinstance(v, Mapping), f"a dict of {names}")


def _lookup(config: Mapping, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate(config: Mapping, rules: Mapping[str, Validator], added_keys: Iterable[str] = (),
             check_values: bool = True) -> None:
    """Raise :class:`ConfigError` for the first unknown key (shallowest first), then the first refused value.

    ``added_keys`` are the keys sacred saw added on top of the config scopes; they are checked with
    the keys found by walking ``config``. Rule keys absent from ``config`` are not required.
    ``check_values=False`` checks the keys only.
    """
    space = _key_space(rules)
    keys = set(_walk(config, rules)) | set(added_keys)
    unknown = sorted((k for k in keys if not _is_known(k, space, rules)), key=lambda k: (k.count("."), k))
    if unknown:
        raise ConfigError(_unknown_key_message(unknown[0], space))
    if not check_values:
        return
    # A dict above rule keys replaced by a scalar ('model.msdnet=3') would hide every rule below it.
    containers = {key: _dict_of(key, space) for key in sorted(space - rules.keys())}
    for key, validator in {**containers, **rules}.items():
        present, value = _lookup(config, key)
        problem = validator(value) if present else None
        if problem is not None:
            raise ConfigError(f"invalid {key}={value!r}: expected {problem}")


def validate_run(run: Any, rules: Mapping[str, Validator]) -> None:
    """Validate a sacred ``Run`` fresh from ``Experiment._create_run``: before observers, so no record.

    Sacred's commands that only show the config (``print_config``, ``save_config``, ...; marked
    ``unobserved``) get their keys checked but not their values, so a config can be shown before a
    required choice such as IMTA's ``stage`` is made.
    """
    shows_only = getattr(run.main_function, "unobserved", False)
    validate(run.config, rules, run.config_modifications.added, check_values=not shows_only)


def validate_updates(config_updates: Mapping, rules: Mapping[str, Validator]) -> None:
    """Check config updates before ``_create_run``, where sacred fails on two mistakes with a traceback.

    Creating the run raises ``ConfigAddedError`` for an unknown top-level key and asserts on a
    non-integer ``seed``; so here every key is checked, and of the values only sacred's own (the
    rest wait for :func:`validate_run`, which knows whether the command only shows the config).
    """
    updates = convert_to_nested_dict(dict(config_updates))
    validate(updates, rules, check_values=False)
    validate({k: v for k, v in updates.items() if k in SACRED_RULES}, SACRED_RULES)


# ------------------------------------------------------------------------------- rule sets, registry


def scoped(prefix: str, rules: Mapping[str, Validator]) -> dict[str, Validator]:
    """``rules`` with their keys under ``prefix``: ``scoped('train', {'epochs': ...})`` -> 'train.epochs'."""
    return {f"{prefix}.{key}": validator for key, validator in rules.items()}


def merge_rules(*rule_sets: Mapping[str, Validator]) -> dict[str, Validator]:
    """One rule set from several; a key claimed twice is a programming error."""
    merged: dict[str, Validator] = {}
    for rules in rule_sets:
        clash = merged.keys() & rules.keys()
        if clash:
            raise ValueError(f"config rules defined twice: {sorted(clash)}")
        merged.update(rules)
    return merged


def register_rules(experiment_name: str, rules: Mapping[str, Validator]) -> None:
    """Make an experiment's rules (plus sacred's own ``seed`` and ``__doc__``) findable by its name."""
    _REGISTRY[experiment_name] = merge_rules(SACRED_RULES, rules)


def rules_of(experiment_name: str) -> dict[str, Validator]:
    """The rules registered for ``experiment_name`` (its module must have been imported)."""
    if experiment_name not in _REGISTRY:
        raise KeyError(f"no config rules registered for experiment {experiment_name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[experiment_name]
