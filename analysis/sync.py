"""Upload local FileStorageObserver records into MongoDB: the repair path after a MongoDB outage.

:func:`sync_runs` writes every run of a runs folder that has a uid into MongoDB the way sacred's
``MongoObserver`` would have: one doc in ``runs`` (``start_time``, ``heartbeat`` and ``stop_time`` as
datetimes, config, info, captured output, fail trace, sources and artifacts as GridFS files, artifacts as
``{name, file_id}`` entries), one doc per metric in ``metrics`` (``{run_id, name, steps, values,
timestamps}``) and ``info.metrics`` naming those docs, as Omniboard expects.

A run is matched to its doc by uid (``meta.uid`` or ``info.uid``). An existing doc is brought to equal the
local record in place and keeps its ``_id``; a run without one gets the next free integer ``_id``. Nothing
that is already equal is written again and no file whose content is already in GridFS for that run is
uploaded twice, so a second sync changes nothing. GridFS files that a doc stops pointing at are kept.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Sequence

from analysis.runs import AnalysisError, mongo_database, read_json, read_run_folder, run_folders, run_uid

INSERTED, UPDATED, UNCHANGED, SKIPPED = "inserted", "updated", "unchanged", "skipped"
_INSERT_ATTEMPTS = 10  # next-free-_id races lost in a row before giving up


@dataclass
class LocalRun:
    """A FileStorageObserver record; its metrics and captured output are read only if it gets synced."""

    run_id: object
    folder: Path
    run: dict
    config: dict
    info: dict

    @property
    def uid(self) -> str | None:
        return run_uid(self.run.get("meta"), self.info)

    @property
    def experiment(self) -> str | None:
        return (self.run.get("experiment") or {}).get("name")

    @cached_property
    def metrics(self) -> dict:
        return read_json(self.folder / "metrics.json", {}) or {}

    @cached_property
    def captured_out(self) -> str:
        cout = self.folder / "cout.txt"
        # bytes, not read_text: universal newlines would turn progress bars' \r into \n
        return cout.read_bytes().decode("utf-8", errors="replace") if cout.is_file() else ""


@dataclass
class _Changes:
    """What syncing one run wrote, for its report line."""

    uploaded: int = 0
    metrics: bool = False
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- values
def _when(text: str | None) -> datetime | None:
    """An ISO time of run.json as BSON keeps it (naive UTC, whole milliseconds), so that re-syncs compare equal."""
    if text is None:
        return None
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _canonical(value) -> str:
    """A comparable text of a doc: key order, tuples vs lists and NaN != NaN do not matter."""
    return json.dumps(value, sort_keys=True, default=str)


def _local_file(run: LocalRun, *paths: str) -> Path | None:
    """The first of ``paths`` (absolute, relative to the observer folder, or to here) that is a file."""
    for path in paths:
        for candidate in (run.folder.parent / path, Path(path)):
            if candidate.is_file():
                return candidate
    return None


# ----------------------------------------------------------------------------------------------- GridFS
def _holds(fs, file_id, data: bytes) -> bool:
    """Whether GridFS file ``file_id`` exists with exactly ``data`` in it."""
    import gridfs

    try:
        stored = fs.get(file_id)
    except gridfs.errors.NoFile:
        return False
    return stored.length == len(data) and stored.read() == data


def _put_once(fs, old_id, path: Path, changes: _Changes, **put_kwargs):
    """GridFS id holding the bytes of ``path``: ``old_id`` when it already holds them, else a new upload."""
    data = path.read_bytes()
    if old_id is not None and _holds(fs, old_id, data):
        return old_id
    changes.uploaded += 1
    return fs.put(data, **put_kwargs)


def _sync_sources(fs, run: LocalRun, current: dict, changes: _Changes) -> list[list]:
    """``experiment.sources`` as MongoObserver writes it: ``[name, GridFS id]`` of each copied source file."""
    experiment = run.run.get("experiment") or {}
    old = dict((current.get("experiment") or {}).get("sources") or [])
    sources = []
    for name, stored in experiment.get("sources") or []:
        path = _local_file(run, stored)
        if path is None:
            changes.notes.append(f"source {name} not found locally ({stored})")
            continue
        filename = os.path.join(experiment.get("base_dir", ""), name)
        sources.append([name, _put_once(fs, old.get(name), path, changes, filename=filename)])
    return sources


def _sync_artifacts(db, fs, run: LocalRun, current: dict, changes: _Changes) -> list[dict]:
    """``artifacts`` as MongoObserver writes it: ``{name, file_id}`` of each artifact uploaded to GridFS."""
    from sacred.observers.mongo import mimetype_detector

    old = {a.get("name"): a.get("file_id") for a in current.get("artifacts") or []}
    artifacts = []
    for name in run.run.get("artifacts") or []:
        path = run.folder / name
        if not path.is_file():
            changes.notes.append(f"artifact {name} is listed but missing locally")
            continue
        filename = f"artifact://{db['runs'].name}/{current['_id']}/{name}"  # MongoObserver's naming
        file_id = _put_once(fs, old.get(name), path, changes, filename=filename, metadata=None,
                            content_type=mimetype_detector.guess_type(name)[0])
        artifacts.append({"name": name, "file_id": file_id})
    return artifacts


def _resources(run: LocalRun) -> list[list]:
    """``resources`` as MongoObserver writes it: ``[filename, md5]`` (md5 None when no copy is found)."""
    from sacred.dependencies import get_digest

    resources = []
    for filename, stored in run.run.get("resources") or []:
        path = _local_file(run, stored, filename)
        resources.append([filename, None if path is None else get_digest(str(path))])
    return resources


# ----------------------------------------------------------------------------------------------- metrics
def _sync_metrics(db, run: LocalRun, run_id, changes: _Changes) -> list[dict]:
    """Make the run's docs in ``metrics`` equal the local metrics.json; ``info.metrics`` entries for them."""
    wanted = [
        {"run_id": run_id, "name": name, "steps": m.get("steps", []), "values": m.get("values", []),
         "timestamps": [_when(t) for t in m.get("timestamps", [])]}
        for name, m in run.metrics.items()
    ]
    current = list(db["metrics"].find({"run_id": run_id}))
    by_name = lambda docs: sorted(({k: v for k, v in d.items() if k != "_id"} for d in docs), key=lambda d: d["name"])
    if _canonical(by_name(current)) != _canonical(by_name(wanted)):
        changes.metrics = True
        db["metrics"].delete_many({"run_id": run_id})
        if wanted:
            db["metrics"].insert_many(wanted)  # sets each doc's _id
        current = wanted
    ids = {d["name"]: str(d["_id"]) for d in current}
    return [{"name": name, "id": ids[name]} for name in run.metrics]


# ----------------------------------------------------------------------------------------------- run docs
def _run_doc(run: LocalRun, run_id, sources: list, artifacts: list, metric_ids: list[dict]) -> dict:
    """The ``runs`` doc MongoObserver would have left for this record."""
    from sacred.observers.mongo import MongoObserver, force_bson_encodeable

    local = run.run
    info = {k: v for k, v in run.info.items() if k != "metrics"}
    if metric_ids:
        info["metrics"] = metric_ids
    doc = {
        "_id": run_id,
        "experiment": {**(local.get("experiment") or {}), "sources": sources},
        "format": MongoObserver.VERSION,
        "command": local.get("command"),
        "host": local.get("host") or {},
        "config": run.config,
        "meta": local.get("meta") or {},
        "status": local.get("status"),
        "resources": _resources(run),
        "artifacts": artifacts,
        "captured_out": run.captured_out,
        "info": info,
    }
    doc.update({key: _when(local[key]) for key in ("start_time", "heartbeat", "stop_time") if key in local})
    doc.update({key: local[key] for key in ("result", "fail_trace") if key in local})
    return force_bson_encodeable(doc)


def _insert_new(db, doc: dict) -> None:
    """Insert ``doc`` under the next free integer ``_id`` (max + 1, as MongoObserver does), retrying on a race."""
    import pymongo.errors

    for attempt in range(_INSERT_ATTEMPTS):
        last = list(db["runs"].find({"_id": {"$type": "number"}}, {"_id": 1}).sort("_id", -1).limit(1))
        doc["_id"] = int(last[0]["_id"]) + 1 if last else 1
        try:
            db["runs"].insert_one(doc)
            return
        except pymongo.errors.DuplicateKeyError:
            if attempt == _INSERT_ATTEMPTS - 1:  # not a race: some other unique index refuses the doc
                raise


def _report(run_id, uid: str | None, action: str = SKIPPED, _id=None, changes: _Changes | None = None) -> dict:
    """The report of one run (see :func:`sync_runs`)."""
    changes = changes or _Changes()
    return {"run_id": run_id, "uid": uid, "_id": _id, "action": action, "uploaded": changes.uploaded,
            "metrics_rewritten": changes.metrics, "notes": changes.notes}


def _sync_run(db, fs, run: LocalRun) -> dict:
    """Bring the MongoDB doc of one local run to equal it; its report."""
    if run.uid is None:
        return _report(run.run_id, None, changes=_Changes(notes=["no uid (a record from before run uids)"]))
    docs = list(db["runs"].find({"$or": [{"meta.uid": run.uid}, {"info.uid": run.uid}]}))
    if len(docs) > 1:
        note = f"{len(docs)} docs share this uid (_id {[d['_id'] for d in docs]}); resolve by hand"
        return _report(run.run_id, run.uid, changes=_Changes(notes=[note]))
    inserted = not docs
    current = docs[0] if docs else _run_doc(run, None, [], [], [])
    if inserted:
        _insert_new(db, current)
    changes = _Changes()
    sources = _sync_sources(fs, run, current, changes)
    artifacts = _sync_artifacts(db, fs, run, current, changes)
    doc = _run_doc(run, current["_id"], sources, artifacts, _sync_metrics(db, run, current["_id"], changes))
    rewritten = _canonical(doc) != _canonical(current)
    if rewritten:
        db["runs"].replace_one({"_id": doc["_id"]}, doc)
    changed = rewritten or changes.uploaded or changes.metrics
    return _report(run.run_id, run.uid, INSERTED if inserted else UPDATED if changed else UNCHANGED, doc["_id"],
                   changes)


def _local_runs(folder: str, experiment: str | None, uids: Sequence[str] | None) -> list[LocalRun | dict]:
    """The runs of ``folder`` to sync (of ``experiment``, with a uid in ``uids``, if given); an unreadable
    one as its skip report."""
    runs: list[LocalRun | dict] = []
    for run_id, run_dir in run_folders(folder):
        try:
            run = LocalRun(run_id, run_dir, *read_run_folder(run_dir))
        except AnalysisError as err:
            runs.append(_report(run_id, None, changes=_Changes(notes=[str(err)])))
            continue
        if (experiment is None or run.experiment == experiment) and (uids is None or run.uid in uids):
            runs.append(run)
    return runs


def sync_runs(folder: str, mongo: str, experiment: str | None = None, *,
              uids: Sequence[str] | None = None) -> list[dict]:
    """Upload the FileStorageObserver records of ``folder`` into the MongoDB ``mongo``, idempotently.

    ``experiment`` and ``uids`` restrict the sync to those runs. Returns one report per run: ``run_id``
    (local), ``uid``, ``_id`` (MongoDB, None if skipped), ``action`` (inserted, updated, unchanged or
    skipped), ``uploaded`` (GridFS files written), ``metrics_rewritten`` and ``notes``. Raises
    :class:`AnalysisError` when the server cannot be reached or fails mid-way.
    """
    import gridfs
    import pymongo.errors

    runs = _local_runs(folder, experiment, uids)
    db = mongo_database(mongo)
    fs = gridfs.GridFS(db)
    reports = []
    for run in runs:
        if isinstance(run, dict):
            reports.append(run)
            continue
        try:
            reports.append(_sync_run(db, fs, run))
        except (OSError, AnalysisError) as err:  # a local file is unreadable: the next sync can finish this run
            note = f"could not read the local record: {err}"
            reports.append(_report(run.run_id, run.uid, changes=_Changes(notes=[note])))
        except pymongo.errors.PyMongoError as err:
            raise AnalysisError(f"MongoDB failed while syncing run {run.run_id} (uid {run.uid}) into {mongo}: "
                                f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
    return reports


def report_line(report: dict) -> str:
    """One line for one run's report."""
    line = f"{report['action']:<9} run {report['run_id']} (uid {report['uid'] or '-'})"
    if report["_id"] is not None:
        line += f" -> _id {report['_id']}"
    details = [f"{report['uploaded']} files uploaded"] if report["uploaded"] else []
    details += ["metrics rewritten"] if report["metrics_rewritten"] else []
    details += report["notes"]
    return line + (f": {'; '.join(details)}" if details else "")


def total_line(reports: list[dict], mongo: str) -> str:
    """The closing line: how many runs ended up in each state."""
    counts = {a: sum(r["action"] == a for r in reports) for a in (INSERTED, UPDATED, UNCHANGED, SKIPPED)}
    return f"{len(reports)} runs synced into {mongo}: " + ", ".join(f"{n} {a}" for a, n in counts.items())
