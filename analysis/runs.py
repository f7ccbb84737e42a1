"""Finding sacred runs and their exit records, in a FileStorageObserver folder or a MongoDB database.

A *source* is either

* a folder written by ``FileStorageObserver`` (``<folder>/<run id>/{run.json, config.json, info.json,
  metrics.json, <artifacts>}``; run folders one level further down, ``<folder>/<sub>/<run id>/``, are
  found too and get the run id ``"<sub>/<run id>"``), or
* a MongoDB written by ``MongoObserver``: ``mongodb://host:port/dbname`` (database ``sacred`` when the
  URL names none, as sacred's own default) or sacred's short ``host:port[:dbname]``.

:func:`load_runs` gives one row per run; :func:`load_exit_record` and :func:`load_metrics` fetch the
heavier parts of one run on demand.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pandas as pd

from analysis.exit_record import FILENAME, ExitRecord

DEFAULT_MONGO_DB = "sacred"
MONGO_TIMEOUT_MS = 3000
_SHORT_MONGO = re.compile(r"^(?P<host>[\w.\-]+):(?P<port>\d+)(?::(?P<db>[\w\-]+))?$")
_MONGO_URL = re.compile(r"^mongodb(\+srv)?://[^/?]+(/(?P<db>[^/?]*))?(\?.*)?$")
_RUN_COLUMNS = ["run_id", "experiment", "status", "variant", "seed", "start_time", "has_exit_record", "source"]


class AnalysisError(RuntimeError):
    """A source, run or artifact could not be found or read; the message says what was tried."""


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


def _mongo_db(source: str):
    """The pymongo Database of a source, after checking that the server answers."""
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


def _read_json(path: Path, default=None):
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
        "experiment": (run.get("experiment") or {}).get("name"),
        "status": run.get("status"),
        "variant": info.get("variant"),
        "seed": config.get("seed"),
        "start_time": run.get("start_time"),
        "has_exit_record": _exit_record_artifact(artifact_names) is not None,
        "source": str(source),
        "_config": config,
    }


def _file_rows(source: str) -> list[dict]:
    root = _folder(source)
    rows = []
    for run_dir in _run_dirs(root):
        run = _read_json(run_dir / "run.json", {})
        info = run.get("info") or _read_json(run_dir / "info.json", {})
        rows.append(
            _row(_file_run_id(root, run_dir), run, _read_json(run_dir / "config.json", {}), info,
                 list(run.get("artifacts") or []), source)
        )
    return rows


def _mongo_rows(source: str, experiment: str | None, status: str | None) -> list[dict]:
    db = _mongo_db(source)
    query = {}
    if experiment is not None:
        query["experiment.name"] = experiment
    if status is not None:
        query["status"] = status
    fields = {"_id": 1, "experiment.name": 1, "status": 1, "start_time": 1, "config": 1, "info": 1, "artifacts": 1}
    return [
        _row(doc["_id"], doc, doc.get("config"), doc.get("info"),
             [a.get("name", "") for a in doc.get("artifacts") or []], source)
        for doc in db["runs"].find(query, fields)
    ]


def load_runs(source: str, experiment: str | None = None, status: str | None = "COMPLETED") -> pd.DataFrame:
    """One row per sacred run in ``source`` (a FileStorageObserver folder or a MongoDB URL).

    Columns: ``run_id``, ``experiment``, ``status``, ``variant`` (``info['variant']``), ``seed``,
    ``start_time`` (datetime), ``has_exit_record``, ``source`` and the flattened config as ``config.<key>``
    columns (``config.model.name``, ...). Filter on the experiment name and on the status (``None`` keeps
    every status). Rows are sorted by start time. Exit records are not read here: see
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
    table = pd.DataFrame(rows, columns=_RUN_COLUMNS)
    if rows:
        flat = pd.json_normalize(configs, sep=".")
        flat.columns = [f"config.{c}" for c in flat.columns]
        table = pd.concat([table, flat], axis=1)
    table["start_time"] = pd.to_datetime(table["start_time"], errors="coerce")
    table["has_exit_record"] = table["has_exit_record"].astype(bool)
    order = table["run_id"].map(lambda r: (0, r, "") if isinstance(r, int) else (1, 0, str(r)))
    table = table.assign(_order=order).sort_values(["start_time", "_order"], kind="stable", na_position="last")
    return table.drop(columns="_order").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- artifacts
def _mongo_run(db, run_id, fields: dict):
    if hasattr(run_id, "item"):  # numpy scalars (e.g. taken from a DataFrame column) are not BSON
        run_id = run_id.item()
    doc = db["runs"].find_one({"_id": run_id}, fields)
    if doc is None and isinstance(run_id, str) and run_id.isdigit():
        run_id = int(run_id)
        doc = db["runs"].find_one({"_id": run_id}, fields)
    return doc, run_id


def load_exit_record(source: str, run_id) -> ExitRecord:
    """The exit record (``exit_record.npz`` artifact) of run ``run_id`` in ``source``."""
    source = str(source)
    if is_mongo(source):
        import gridfs

        db = _mongo_db(source)
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
            raw = gridfs.GridFS(db).get(artifacts[name]).read()
        except gridfs.errors.NoFile as err:
            raise AnalysisError(f"{name} of run {run_id!r} is missing from GridFS in {source}") from err
        return ExitRecord.from_bytes(raw)
    run_dir = _folder(source) / str(run_id)
    run = _read_json(run_dir / "run.json")
    if run is None:
        raise AnalysisError(f"no run {run_id!r} in {source} (looked for {run_dir / 'run.json'})")
    names = list(run.get("artifacts") or [])
    name = _exit_record_artifact(names)
    if name is None:
        raise AnalysisError(f"run {run_id!r} in {source} has no {FILENAME} artifact (artifacts: {names or 'none'})")
    path = run_dir / name
    if not path.is_file():
        raise AnalysisError(f"run {run_id!r} lists {name} as an artifact but {path} does not exist")
    return ExitRecord.load(path)


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
        db = _mongo_db(source)
        doc, run_id = _mongo_run(db, run_id, {"_id": 1})
        if doc is None:
            raise AnalysisError(f"no run with _id {run_id!r} in {source} (collection {db.name}.runs)")
        for m in db["metrics"].find({"run_id": run_id}, {"name": 1, "steps": 1, "values": 1}):
            rows.extend((m["name"], s, v) for s, v in zip(m.get("steps", []), m.get("values", [])))
    else:
        run_dir = _folder(source) / str(run_id)
        if not (run_dir / "run.json").is_file():
            raise AnalysisError(f"no run {run_id!r} in {source} (looked for {run_dir / 'run.json'})")
        for name, m in (_read_json(run_dir / "metrics.json", {}) or {}).items():
            rows.extend((name, s, v) for s, v in zip(m.get("steps", []), m.get("values", [])))
    table = pd.DataFrame(rows, columns=["name", "step", "value"])
    table["value"] = pd.to_numeric(table["value"], errors="coerce")
    return table.sort_values(["name", "step"], kind="stable").reset_index(drop=True)
