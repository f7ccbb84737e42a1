"""Resolve a reference to an earlier run (``ge_run``, ``train.resume``, ``teacher_run``, ...) to exactly one run.

A reference is one of

* a path to a snapshot file, or to a run's snapshot folder;
* a run's **uid** (the identity printed at its start, e.g. ``20261125-110512-3fa9c1``) or a unique prefix
  of it: snapshots live under ``<snapshot_root>/<experiment>/<uid>/``, so a uid never names two runs;
* a store's run **id** (the number sacred or MongoDB gave it): looked up in the stores the current run
  is observed by (its runs folder, its MongoDB), which say the uid of the run that id names there.

Ids repeat across runs folders and databases, so an id that names different runs in two stores is
refused, naming the candidates, and a snapshot whose recorded uid differs from the one resolved is
refused too: a later stage never trains on another run's network.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from experiments.engine.checkpoint import load_snapshot


class RunReferenceError(ValueError):
    """A run reference that names no run, or more than one."""


@dataclass(frozen=True)
class ResolvedRun:
    """The run a reference names: its identity, its snapshot file, how it was found, and its recipe key."""

    uid: str | None
    snapshot: Path
    found: str
    recipe: str | None = None
    contents: dict | None = field(default=None, repr=False, compare=False)  # the snapshot, loaded once

    def record(self) -> dict[str, Any]:
        """Plain data for ``_run.info`` and snapshot ``meta`` of the run that uses it."""
        return {"uid": self.uid, "snapshot": str(self.snapshot), "found": self.found, "recipe": self.recipe}


# ------------------------------------------------------------------------------------------------ stores
class FileStore:
    """A sacred ``FileStorageObserver`` folder: ``<root>/<id>/run.json`` (+ ``info.json``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def lookup(self, run_id: int, experiment: str) -> list[tuple[str | None, str | None]]:
        folder = self.root / str(run_id)
        try:
            run = json.loads((folder / "run.json").read_text())
            info = json.loads((folder / "info.json").read_text()) if (folder / "info.json").is_file() else {}
        except (OSError, ValueError):
            return []
        if (run.get("experiment") or {}).get("name") != experiment:
            return []
        return [(run_uid(run.get("meta"), info), info.get("snapshot_dir"))]


class MongoStore:
    """The ``runs`` collection of a MongoDB that observes this run."""

    def __init__(self, collection: Any, label: str):
        self.collection = collection
        self.label = label

    def __str__(self) -> str:
        return self.label

    def lookup(self, run_id: int, experiment: str) -> list[tuple[str | None, str | None]]:
        doc = self.collection.find_one({"_id": run_id, "experiment.name": experiment}, {"meta": 1, "info": 1})
        if doc is None:
            return []
        info = doc.get("info") or {}
        return [(run_uid(doc.get("meta"), info), info.get("snapshot_dir"))]


def run_uid(meta: dict | None, info: dict | None) -> str | None:
    """The uid a run record carries (``meta.uid``, written at start; ``info.uid`` as a fallback)."""
    return (meta or {}).get("uid") or (info or {}).get("uid")


def stores_of(observers: Iterable[Any]) -> list[FileStore | MongoStore]:
    """The stores behind sacred observers (wrappers expose the observer they wrap as ``inner``)."""
    from sacred.observers import FileStorageObserver, MongoObserver

    stores: list[FileStore | MongoStore] = []
    for observer in observers:
        observer = getattr(observer, "inner", observer)
        if isinstance(observer, FileStorageObserver):
            stores.append(FileStore(observer.basedir))
        elif isinstance(observer, MongoObserver):
            db = observer.runs.database
            host, port = db.client.address if db.client.topology_description.has_known_servers else ("?", "?")
            stores.append(MongoStore(observer.runs, f"mongodb {db.name} ({host}:{port})"))
    return stores


# ------------------------------------------------------------------------------------------------ resolving
def _snapshot_in(folder: Path, name: str) -> Path | None:
    return folder / name if (folder / name).is_file() else None


def _why_missing(name: str) -> str:
    return " (a run writes final.pt when it completes: is it finished?)" if name == "final.pt" else ""


def _by_path(ref: str, name: str) -> ResolvedRun | None:
    path = Path(ref).expanduser()
    if path.is_file():
        return ResolvedRun(None, path.resolve(), "path")
    if path.is_dir():
        found = _snapshot_in(path, name)
        if found is None:
            raise RunReferenceError(f"{path} holds no {name}" + _why_missing(name))
        return ResolvedRun(None, found.resolve(), "path")
    return None


def _by_id(run_id: int, experiment: str, root: Path, stores: Sequence, name: str) -> ResolvedRun:
    hits, unreachable = {}, []
    for store in stores:
        try:
            found = store.lookup(run_id, experiment)
        except Exception as err:  # noqa: BLE001 - a store that is down is reported, not fatal
            unreachable.append(f"{store} ({type(err).__name__})")
            continue
        for uid, snapshot_dir in found:
            hits.setdefault(uid or snapshot_dir, []).append((store, uid, snapshot_dir))
    if not hits:
        searched = ", ".join(str(s) for s in stores) or "none (this run is not observed)"
        down = f"; unreachable: {', '.join(unreachable)}" if unreachable else ""
        raise RunReferenceError(f"no {experiment} run with id {run_id} in the stores this run is observed by "
                              f"({searched}{down}); pass its uid or snapshot path instead")
    if len(hits) > 1:
        named = "; ".join(f"uid {uid or '?'} in {store}" for (store, uid, _), *_ in hits.values())
        raise RunReferenceError(f"run id {run_id} is ambiguous: it names different runs ({named}); "
                              "pass the uid or the snapshot path of the one you mean")
    store, uid, snapshot_dir = next(iter(hits.values()))[0]
    folder = root / experiment / uid if uid else Path(snapshot_dir or "")
    found = _snapshot_in(folder, name) if uid or snapshot_dir else None
    if found is None:
        raise RunReferenceError(f"run id {run_id} in {store} is uid {uid}, but {folder} holds no {name}"
                                + _why_missing(name))
    return ResolvedRun(uid, found.resolve(), f"id {run_id} in {store}")


def _by_uid(ref: str, experiment: str, root: Path, name: str) -> ResolvedRun:
    base = root / experiment
    folders = sorted(p.name for p in base.glob("*") if p.is_dir()) if base.is_dir() else []
    matches = [f for f in folders if f == ref] or [f for f in folders if f.startswith(ref)]
    if not matches:
        recent = ", ".join(folders[-8:]) or "none"
        raise RunReferenceError(f"no {experiment} run {ref!r}: not a snapshot path, not a uid under {base} "
                              f"(latest: {recent}), not a run id")
    if len(matches) > 1:
        raise RunReferenceError(f"{ref!r} matches several {experiment} runs under {base}: {', '.join(matches)}")
    found = _snapshot_in(base / matches[0], name)
    if found is None:
        raise RunReferenceError(f"run {matches[0]} has no {name} in {base / matches[0]}" + _why_missing(name))
    return ResolvedRun(matches[0], found.resolve(), f"uid under {base}")


def resolve_run(ref: Any, experiment: str, snapshot_root: str | Path, stores: Sequence = (),
                name: str = "final.pt") -> ResolvedRun:
    """The one run ``ref`` names (see the module docstring) and its snapshot ``name``.

    ``final.pt`` (the selected weights, written when a run completes) for a later stage's parent,
    ``last.pt`` (the whole training state) for a resume.

    The snapshot's recorded uid must agree with the uid the reference resolved to.
    """
    if ref in (None, ""):
        raise RunReferenceError("no run given: pass a run uid, a run id or a snapshot path")
    text = str(ref)
    root = Path(snapshot_root).expanduser()
    resolved = _by_path(text, name)
    if resolved is None:
        if isinstance(ref, int) or text.isdigit():
            resolved = _by_id(int(text), experiment, root, stores, name)
        else:
            resolved = _by_uid(text, experiment, root, name)
    contents = load_snapshot(resolved.snapshot)
    meta = contents.get("meta") or {}
    recorded = meta.get("uid")
    if resolved.uid and recorded and recorded != resolved.uid:
        raise RunReferenceError(f"{resolved.snapshot} holds run {recorded}, not {resolved.uid} that {ref!r} names")
    return ResolvedRun(resolved.uid or recorded, resolved.snapshot, resolved.found, meta.get("recipe"), contents)


def load_parent(ref: Any, key: str, experiment: str, stage: str, snapshot_root: str | Path,
                stores: Sequence = ()) -> tuple[ResolvedRun, dict]:
    """The finished ``stage`` run of ``experiment`` that the config key ``key`` names, and its final snapshot.

    A later stage starts here: the snapshot's meta holds the parent's model and data configs and its uid.
    """
    if ref in (None, ""):
        raise RunReferenceError(f"{key} is needed: the uid, run id or snapshot path of a finished stage={stage} run")
    parent = resolve_run(ref, experiment, snapshot_root, stores)
    snapshot = parent.contents
    meta = snapshot.get("meta") or {}
    if meta.get("stage") != stage or not {"model", "data", "variant"} <= set(meta):
        raise RunReferenceError(f"{key}={ref!r} names {parent.snapshot}, which is not a finished stage={stage} run "
                                f"of {experiment} (its stage: {meta.get('stage')!r})")
    return parent, snapshot
