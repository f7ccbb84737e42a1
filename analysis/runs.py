"""Finding sacred runs and their exit records, in a FileStorageObserver folder or a MongoDB database.

A *source* is either

* a folder written by ``FileStorageObserver`` (``<folder>/<run id>/{run.json, config.json, info.json,
  metrics.json, <artifacts>}``; run folders one level further down, ``<folder>/<sub>/<run id>/``, are
  found too and get the run id ``"<sub>/<run id>"``), or
* a MongoDB written by ``MongoObserver``: ``mongodb://host:port/dbname`` (database ``sacred`` when the
  URL names none, as sacred's own default) or sacred's short ``host:port[:dbname]``.

:func:`load_runs` gives one row per run; :func:`load_exit_record` and :func:`load_metrics` fetch the
heavier parts of one run on demand; :func:`filter_where` keeps the runs whose config matches ``--where``
conditions and :func:`run_listing` is the one-row-per-run overview of ``python -m analysis runs``.

One unreadable run never breaks a whole source: it is left out with a :class:`SkippedRunWarning` naming it.
"""
from __future__ import annotations

import difflib
import json
import re
import warnings
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from analysis.exit_record import FILENAME, ExitRecord
from analysis.recipes import recipe_labels

if TYPE_CHECKING:
    import pymongo.database

DEFAULT_MONGO_DB = "sacred"
MONGO_TIMEOUT_MS = 3000
_SHORT_MONGO = re.compile(r"^(?P<host>[\w.\-]+):(?P<port>\d+)(?::(?P<db>[\w\-]+))?$")
_MONGO_URL = re.compile(r"^mongodb(\+srv)?://[^/?]+(/(?P<db>[^/?]*))?(\?.*)?$")
_RUN_COLUMNS = ["run_id", "uid", "experiment", "status", "variant", "seed", "start_time", "has_exit_record", "source"]
#: what a truncated or otherwise corrupt .npz raises while being decoded
_CORRUPT_RECORD = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)
#: config keys shown by :func:`run_listing` when the runs have them
LISTING_CONFIG = ("data.name", "model.arch", "train.epochs")


class AnalysisError(RuntimeError):
    """A source, run or artifact could not be found or read; the message says what was tried."""


class SkippedRunWarning(UserWarning):
    """One run was left out of an analysis (unreadable record, no validation split, ...); the others go on."""


def warn_skipped(run_id, uid: str | None, reason: str) -> None:
    """Say which run is left out and why, without stopping the analysis of the others."""
    warnings.warn(SkippedRunWarning(f"skipped run {run_id} (uid {uid or '-'}): {reason}"), stacklevel=3)


def run_uid(meta: dict | None, info: dict | None) -> str | None:
    """A run's identity: ``meta.uid``, else ``info.uid``; None for records older than uids."""
    return (meta or {}).get("uid") or (info or {}).get("uid") or None


# ----------------------------------------------------------------------------------------------- sources
def is_mongo(source: str) -> bool:
    """Whether ``source`` names a MongoDB (URL or sacred's ``host:port[:db]``) rather than a folder."""
    source = str(source)
    if source.startswith(("mongodb://", "mongodb+srv://")):
        return True
    return bool(_SHORT_MONGO.match(source)) and not Path(source).exists()


def mongo_url(source: str) -> tuple[str, str]:
    """(connection URL, database name) of a MongoDB source."""
    source = str(source)
    m = _SHORT_MONGO.match(source)
    if m and not source.startswith("mongodb"):
        return f"mongodb://{m['host']}:{m['port']}/", m["db"] or DEFAULT_MONGO_DB
    m = _MONGO_URL.match(source)
    if m is None:
        raise AnalysisError(f"not a valid MongoDB URL: {source!r} (expected mongodb://host:port/dbname)")
    return source, m["db"] or DEFAULT_MONGO_DB


@lru_cache(maxsize=8)
def _mongo_client(url: str):
    import pymongo

    return pymongo.MongoClient(url, serverSelectionTimeoutMS=MONGO_TIMEOUT_MS)


def mongo_database(source: str) -> "pymongo.database.Database":
    """The pymongo Database of a source, after checking that the server answers (else :class:`AnalysisError`)."""
    import pymongo.errors

    url, db_name = mongo_url(source)
    client = _mongo_client(url)
    try:
        client.admin.command("ping")
    except pymongo.errors.PyMongoError as err:
        raise AnalysisError(
            f"could not reach MongoDB at {url} (database {db_name!r}) within {MONGO_TIMEOUT_MS / 1000:g} s: "
            f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        ) from err
    return client[db_name]


def _folder(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_dir():
        raise AnalysisError(
            f"run source {str(source)!r} is neither an existing FileStorageObserver folder (looked for "
            f"{path.resolve()}) nor a MongoDB URL (mongodb://host:port/dbname or host:port:dbname)"
        )
    return path


def read_json(path: Path, default=None):
    """The JSON in ``path`` (``default`` when there is no such file); :class:`AnalysisError` if unreadable."""
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AnalysisError(f"could not read {path}: {err}") from err


def _run_dirs(root: Path) -> list[Path]:
    """Run folders (holding run.json) directly under ``root`` or one level further down."""
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        if (child / "run.json").is_file():
            found.append(child)
        else:
            found.extend(
                g for g in sorted(child.iterdir())
                if g.is_dir() and not g.name.startswith(("_", ".")) and (g / "run.json").is_file()
            )
    return found


def _file_run_id(root: Path, run_dir: Path):
    rel = run_dir.relative_to(root).as_posix()
    return int(rel) if rel.isdigit() else rel


def run_folders(source: str) -> list[tuple[object, Path]]:
    """(run id, folder) of every run of a FileStorageObserver folder; the id is its path below ``source``."""
    root = _folder(source)
    return [(_file_run_id(root, run_dir), run_dir) for run_dir in _run_dirs(root)]


def read_run_folder(run_dir: Path) -> tuple[dict, dict, dict]:
    """(run.json, config.json, info) of one run folder; raises :class:`AnalysisError` if one is unreadable."""
    run = read_json(run_dir / "run.json", {})
    return run, read_json(run_dir / "config.json", {}), run.get("info") or read_json(run_dir / "info.json", {})


def _exit_record_artifact(names: list[str]) -> str | None:
    """The artifact holding the exit record (the last one if a run stored several)."""
    hits = [n for n in names if n == FILENAME or n.endswith("/" + FILENAME)]
    return hits[-1] if hits else None


# ----------------------------------------------------------------------------------------------- runs
def _row(run_id, run: dict, config: dict, info: dict, artifact_names: list[str], source: str) -> dict:
    info = info or {}
    config = config or {}
    return {
        "run_id": run_id,
        "uid": run_uid(run.get("meta"), info),
        "experiment": (run.get("experiment") or {}).get("name"),
        "status": run.get("status"),
        "variant": info.get("variant"),
        "seed": config.get("seed"),
        "start_time": run.get("start_time"),
        "has_exit_record": _exit_record_artifact(artifact_names) is not None,
        "source": str(source),
        "_config": config,
        # info['metrics'] is MongoObserver's list of metric doc ids, bookkeeping rather than run information
        "_info": {k: v for k, v in info.items() if k != "metrics"},
    }


def _file_rows(source: str) -> list[dict]:
    rows = []
    for run_id, run_dir in run_folders(source):
        try:
            run, config, info = read_run_folder(run_dir)
        except AnalysisError as err:
            warn_skipped(run_id, None, str(err))
            continue
        rows.append(_row(run_id, run, config, info, list(run.get("artifacts") or []), source))
    return rows


def _mongo_rows(source: str, experiment: str | None, status: str | None) -> list[dict]:
    db = mongo_database(source)
    query = {}
    if experiment is not None:
        query["experiment.name"] = experiment
    if status is not None:
        query["status"] = status
    fields = {"_id": 1, "experiment.name": 1, "status": 1, "start_time": 1, "config": 1, "info": 1, "artifacts": 1,
              "meta.uid": 1}
    return [
        _row(doc["_id"], doc, doc.get("config"), doc.get("info"),
             [a.get("name", "") for a in doc.get("artifacts") or []], source)
        for doc in db["runs"].find(query, fields)
    ]


def _flat(dicts: list[dict], prefix: str) -> pd.DataFrame:
    """Nested dicts as ``<prefix>.<key>.<subkey>`` columns, one row each."""
    flat = pd.json_normalize(dicts, sep=".")
    flat.columns = [f"{prefix}.{c}" for c in flat.columns]
    return flat


def load_runs(source: str, experiment: str | None = None, status: str | None = "COMPLETED") -> pd.DataFrame:
    """One row per sacred run in ``source`` (a FileStorageObserver folder or a MongoDB URL).

    Columns: ``run_id``, ``uid`` (``meta.uid``, else ``info.uid``, else None), ``experiment``, ``status``,
    ``variant`` (``info['variant']``), ``recipe`` (what sets the run's recipe apart from the other runs
    of its experiment and variant: :func:`analysis.recipes.recipe_labels`), ``seed``, ``start_time`` (datetime), ``has_exit_record``, ``source``,
    then the flattened config as ``config.<key>`` columns (``config.model.name``, ...) and the flattened
    info as ``info.<key>`` columns (``info.exits.test_acc_mean``, ...). A run folder whose JSON cannot be
    read is left out with a :class:`SkippedRunWarning`. Filter on the experiment name and on the status
    (``None`` keeps every status). Rows are sorted by start time. Exit records are not read here: see
    :func:`load_exit_record` (or :func:`exit_record_loader` for a callable per row).
    An empty table (with the columns above) means nothing matched.
    """
    source = str(source)
    rows = _mongo_rows(source, experiment, status) if is_mongo(source) else _file_rows(source)
    rows = [
        r for r in rows
        if (experiment is None or r["experiment"] == experiment) and (status is None or r["status"] == status)
    ]
    configs = [r.pop("_config") for r in rows]
    infos = [r.pop("_info") for r in rows]
    table = pd.DataFrame(rows, columns=_RUN_COLUMNS)
    if rows:
        table = pd.concat([table, _flat(configs, "config"), _flat(infos, "info")], axis=1)
    table.insert(table.columns.get_loc("variant") + 1, "recipe",
                 recipe_labels(table) if rows else pd.Series(dtype=object))
    table["start_time"] = pd.to_datetime(table["start_time"], errors="coerce")
    table["has_exit_record"] = table["has_exit_record"].astype(bool)
    order = table["run_id"].map(lambda r: (0, r, "") if isinstance(r, int) else (1, 0, str(r)))
    table = table.assign(_order=order).sort_values(["start_time", "_order"], kind="stable", na_position="last")
    return table.drop(columns="_order").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- filters
def parse_where(conditions: Sequence[str]) -> dict[str, object]:
    """``["data.name=cifar100", "seed=1"]`` -> ``{"data.name": "cifar100", "seed": 1}``: values are JSON
    when they parse as such (``1``, ``false``, ``null``, ``[1, 2]``), else plain strings."""
    where: dict[str, object] = {}
    for condition in conditions:
        key, sep, text = condition.partition("=")
        if not sep or not key.strip():
            raise AnalysisError(f"--where expects KEY=VALUE (e.g. data.name=cifar100), got {condition!r}")
        try:
            where[key.strip()] = json.loads(text)
        except ValueError:
            where[key.strip()] = text
    return where


def _same(cell, value) -> bool:
    """Config equality that keeps bools apart from numbers (``seed=1`` must not match ``True``)."""
    if isinstance(cell, np.generic):
        cell = cell.item()
    return isinstance(cell, bool) == isinstance(value, bool) and bool(cell == value)


def _config_column(runs: pd.DataFrame, key: str) -> str:
    """The ``config.<key>`` column of a --where key, or an error naming the closest config keys."""
    column = key if key.startswith("config.") else f"config.{key}"
    if column in runs.columns:
        return column
    known = [c.removeprefix("config.") for c in runs.columns if c.startswith("config.")]
    close = difflib.get_close_matches(key.removeprefix("config."), known, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else f"no close match among {len(known)} config keys"
    raise AnalysisError(f"unknown config key {key!r} in --where ({hint})")


def filter_where(runs: pd.DataFrame, where: dict[str, object]) -> pd.DataFrame:
    """The runs whose config has every ``key == value`` of ``where`` (keys as in ``config.json``: ``data.name``)."""
    mask = pd.Series(True, index=runs.index)
    for key, value in where.items():
        mask &= runs[_config_column(runs, key)].map(lambda cell: _same(cell, value)).astype(bool)
    return runs[mask]


def _last_exit_acc(runs: pd.DataFrame) -> pd.Series:
    """Test accuracy of each run's last exit: its highest-numbered ``info.exits.test_acc_exit<K>``."""
    exits = sorted((c for c in runs.columns if re.fullmatch(r"info\.exits\.test_acc_exit\d+", c)),
                   key=lambda c: int(c.rsplit("exit", 1)[1]))
    if not exits:
        return pd.Series(np.nan, index=runs.index)
    return runs[exits].apply(pd.to_numeric, errors="coerce").ffill(axis=1).iloc[:, -1]


def run_listing(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run of a :func:`load_runs` table: identity, status, key config (those of
    :data:`LISTING_CONFIG` that the runs have) and headline test accuracy in % (NaN when not recorded)."""
    listing = runs[["run_id", "uid", "experiment", "variant", "status", "start_time", "seed"]].rename(
        columns={"run_id": "id", "start_time": "start"})
    for key in LISTING_CONFIG:
        if f"config.{key}" in runs.columns:
            listing[key] = runs[f"config.{key}"]
    mean = runs.get("info.exits.test_acc_mean", pd.Series(np.nan, index=runs.index))
    listing["test_acc_mean%"] = 100 * pd.to_numeric(mean, errors="coerce")
    listing["test_acc_last%"] = 100 * _last_exit_acc(runs)
    return listing.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- artifacts
def _mongo_run(db, run_id, fields: dict):
    if hasattr(run_id, "item"):  # numpy scalars (e.g. taken from a DataFrame column) are not BSON
        run_id = run_id.item()
    doc = db["runs"].find_one({"_id": run_id}, fields)
    if doc is None and isinstance(run_id, str) and run_id.isdigit():
        run_id = int(run_id)
        doc = db["runs"].find_one({"_id": run_id}, fields)
    return doc, run_id


def _mongo_record_bytes(source: str, run_id) -> tuple[bytes, str]:
    """(raw exit record, artifact name) of a MongoDB run, from GridFS."""
    import gridfs

    db = mongo_database(source)
    doc, run_id = _mongo_run(db, run_id, {"artifacts": 1})
    if doc is None:
        raise AnalysisError(f"no run with _id {run_id!r} in {source} (collection {db.name}.runs)")
    artifacts = {a.get("name", ""): a.get("file_id") for a in doc.get("artifacts") or []}
    name = _exit_record_artifact(list(artifacts))
    if name is None:
        raise AnalysisError(
            f"run {run_id!r} in {source} has no {FILENAME} artifact (artifacts: {sorted(artifacts) or 'none'})"
        )
    try:
        return gridfs.GridFS(db).get(artifacts[name]).read(), name
    except gridfs.errors.NoFile as err:
        raise AnalysisError(f"{name} of run {run_id!r} is missing from GridFS in {source}") from err


def _file_record_bytes(source: str, run_id) -> tuple[bytes, str]:
    """(raw exit record, artifact name) of a run folder."""
    run_dir = _folder(source) / str(run_id)
    run = read_json(run_dir / "run.json")
    if run is None:
        raise AnalysisError(f"no run {run_id!r} in {source} (looked for {run_dir / 'run.json'})")
    names = list(run.get("artifacts") or [])
    name = _exit_record_artifact(names)
    if name is None:
        raise AnalysisError(f"run {run_id!r} in {source} has no {FILENAME} artifact (artifacts: {names or 'none'})")
    path = run_dir / name
    try:
        return path.read_bytes(), name
    except OSError as err:
        raise AnalysisError(
            f"run {run_id!r} lists {name} as an artifact but {path} cannot be read ({err.strerror})"
        ) from err


def load_exit_record(source: str, run_id) -> ExitRecord:
    """The exit record (``exit_record.npz`` artifact) of run ``run_id`` in ``source``.

    Raises :class:`AnalysisError` when it is missing or corrupt (truncated, not an .npz, arrays missing).
    """
    source = str(source)
    raw, name = (_mongo_record_bytes if is_mongo(source) else _file_record_bytes)(source, run_id)
    try:
        return ExitRecord.from_bytes(raw)
    except _CORRUPT_RECORD as err:
        raise AnalysisError(
            f"{name} of run {run_id!r} in {source} is corrupt ({len(raw)} bytes): {type(err).__name__}: {err}"
        ) from err


class ExitRecordLoader:
    """A callable that loads (once) the exit record of one run: ``runs.apply(exit_record_loader, axis=1)``."""

    def __init__(self, source: str, run_id) -> None:
        self.source, self.run_id = str(source), run_id
        self._record: ExitRecord | None = None

    def __call__(self) -> ExitRecord:
        if self._record is None:
            self._record = load_exit_record(self.source, self.run_id)
        return self._record

    def __repr__(self) -> str:
        return f"ExitRecordLoader({self.source!r}, {self.run_id!r})"


def exit_record_loader(row) -> ExitRecordLoader:
    """A lazy loader for the run of a :func:`load_runs` row."""
    return ExitRecordLoader(row["source"], row["run_id"])


def load_metrics(source: str, run_id) -> pd.DataFrame:
    """Every scalar metric of a run, long format: columns ``name``, ``step``, ``value`` (sorted)."""
    source = str(source)
    rows: list[tuple] = []
    if is_mongo(source):
        db = mongo_database(source)
        doc, run_id = _mongo_run(db, run_id, {"_id": 1})
        if doc is None:
            raise AnalysisError(f"no run with _id {run_id!r} in {source} (collection {db.name}.runs)")
        for m in db["metrics"].find({"run_id": run_id}, {"name": 1, "steps": 1, "values": 1}):
            rows.extend((m["name"], s, v) for s, v in zip(m.get("steps", []), m.get("values", [])))
    else:
        run_dir = _folder(source) / str(run_id)
        if not (run_dir / "run.json").is_file():
            raise AnalysisError(f"no run {run_id!r} in {source} (looked for {run_dir / 'run.json'})")
        for name, m in (read_json(run_dir / "metrics.json", {}) or {}).items():
            rows.extend((name, s, v) for s, v in zip(m.get("steps", []), m.get("values", [])))
    table = pd.DataFrame(rows, columns=["name", "step", "value"])
    table["value"] = pd.to_numeric(table["value"], errors="coerce")
    return table.sort_values(["name", "step"], kind="stable").reset_index(drop=True)
