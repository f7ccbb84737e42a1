"""analysis.sync: local FileStorageObserver records uploaded into MongoDB (mongoeco), idempotently."""
from __future__ import annotations

import datetime
import uuid

import numpy as np
import pandas as pd
import pytest
from test_analysis import make_record, run_trivial_experiment

from analysis.runs import AnalysisError, load_exit_record, load_metrics, load_runs
from analysis.sync import sync_runs

UID = "20261125-110512-3fa9c1"


@pytest.fixture
def local_runs(tmp_path):
    """A runs folder with one COMPLETED run named by its uid (exit record attached) and one legacy run
    (numeric folder, no uid). Returns (folder, record of the uid run)."""
    from sacred.observers import FileStorageObserver

    record = make_record(seed=7, n_exits=3, n=50)
    path = record.save(tmp_path / "record.npz")
    run_trivial_experiment(FileStorageObserver(str(tmp_path / "runs")), [("ce", 1, path), ("ce", 2, None)],
                           [UID, None])
    return tmp_path / "runs", record


@pytest.fixture
def mongo(mongo_url):
    """(source URL, pymongo Database) of a fresh database on the session's mongoeco server."""
    import pymongo

    name = f"sync_{uuid.uuid4().hex[:10]}"
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=3000)
    yield mongo_url.rstrip("/") + "/" + name, client[name]
    client.drop_database(name)
    client.close()


def _counts(db) -> dict[str, int]:
    return {c: db[c].count_documents({}) for c in ("runs", "metrics", "fs.files", "fs.chunks")}


def _assert_reads_like_folder(folder, source, run_id, record) -> None:
    """load_runs / load_exit_record / load_metrics give the same from MongoDB as from the folder."""
    local, remote = load_runs(folder), load_runs(source, experiment="trivial_exits")
    local = local[local["uid"] == UID].reset_index(drop=True)
    assert remote["run_id"].tolist() == [run_id]
    for table in (local, remote):
        table["start_time"] = table["start_time"].dt.floor("ms")  # BSON keeps milliseconds
    pd.testing.assert_frame_equal(local.drop(columns=["run_id", "source"]), remote.drop(columns=["run_id", "source"]),
                                  check_like=True)
    rec = load_exit_record(source, run_id)
    for name in ("val_logits", "val_targets", "test_logits", "test_targets", "macs", "params", "latency_ms"):
        np.testing.assert_array_equal(getattr(rec, name), getattr(record, name))
    pd.testing.assert_frame_equal(load_metrics(source, run_id), load_metrics(folder, UID))


def test_sync_into_empty_database(local_runs, mongo, capsys):
    from analysis.__main__ import main

    folder, record = local_runs
    source, db = mongo
    assert main(["sync", str(folder), source]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("skipped   run 1 (uid -)") and "no uid" in out[0]
    assert out[1].startswith(f"inserted  run {UID} (uid {UID}) -> _id 1")
    assert out[2] == f"2 runs synced into {source}: 1 inserted, 0 updated, 0 unchanged, 1 skipped"
    _assert_reads_like_folder(folder, source, 1, record)

    doc = db["runs"].find_one({"_id": 1})
    assert doc["status"] == "COMPLETED" and doc["meta"]["uid"] == UID and doc["info"]["uid"] == UID
    assert all(isinstance(doc[k], datetime.datetime) for k in ("start_time", "stop_time", "heartbeat"))
    assert [a["name"] for a in doc["artifacts"]] == ["exit_record.npz"]
    assert {m["name"] for m in doc["info"]["metrics"]} == {"train.loss", "val.acc.exit1"}
    metric = db["metrics"].find_one({"run_id": 1, "name": "train.loss"})
    assert str(metric["_id"]) in {m["id"] for m in doc["info"]["metrics"]}
    assert metric["steps"] == [0, 1, 2] and all(isinstance(t, datetime.datetime) for t in metric["timestamps"])
    sources = doc["experiment"]["sources"]
    assert sources and all(db["fs.files"].count_documents({"_id": file_id}) == 1 for _, file_id in sources)


def test_second_sync_changes_nothing(local_runs, mongo):
    folder, _ = local_runs
    source, db = mongo
    first = sync_runs(str(folder), source)
    before = _counts(db), list(db["runs"].find()), list(db["metrics"].find())
    second = sync_runs(str(folder), source)
    assert [r["action"] for r in first] == ["skipped", "inserted"]
    assert [r["action"] for r in second] == ["skipped", "unchanged"]
    assert second[1]["uploaded"] == 0 and not second[1]["metrics_rewritten"]
    assert (_counts(db), list(db["runs"].find()), list(db["metrics"].find())) == before
    assert sync_runs(str(folder), source, experiment="other") == [] == sync_runs(str(folder), source, uids=["x"])


def test_sync_repairs_a_partial_doc(local_runs, mongo):
    folder, record = local_runs
    source, db = mongo
    started = datetime.datetime(2026, 11, 25, 11, 5, 12)
    db["runs"].insert_many([
        {"_id": 3, "experiment": {"name": "other"}, "status": "COMPLETED", "meta": {"uid": "someone-else"}},
        {"_id": 7, "experiment": {"name": "trivial_exits"}, "status": "RUNNING", "start_time": started,
         "meta": {"uid": UID}, "info": {}, "artifacts": [], "heartbeat": None},
    ])
    db["metrics"].insert_one({"run_id": 7, "name": "train.loss", "steps": [0], "values": [1.0],
                              "timestamps": [started]})
    reports = sync_runs(str(folder), source)
    assert reports[1]["action"] == "updated" and reports[1]["_id"] == 7 and reports[1]["metrics_rewritten"]
    assert db["runs"].count_documents({}) == 2
    _assert_reads_like_folder(folder, source, 7, record)
    assert db["runs"].find_one({"_id": 7})["status"] == "COMPLETED"
    assert sync_runs(str(folder), source)[1]["action"] == "unchanged"


def test_run_observed_by_mongo_too_is_unchanged(mongo, tmp_path):
    """A doc MongoObserver wrote itself already equals what sync would write: nothing to do."""
    from sacred.observers import FileStorageObserver, MongoObserver

    source, db = mongo
    path = make_record(seed=3, n_exits=2, n=20).save(tmp_path / "record.npz")
    observers = [FileStorageObserver(str(tmp_path / "runs")),
                 MongoObserver(source.rsplit("/", 1)[0] + "/", db_name=db.name, serverSelectionTimeoutMS=3000)]
    run_trivial_experiment(observers, [("ce", 1, path)], [UID], uid_folders=False)
    before = _counts(db), list(db["runs"].find()), list(db["metrics"].find())
    assert [r["action"] for r in sync_runs(str(tmp_path / "runs"), source)] == ["unchanged"]
    assert (_counts(db), list(db["runs"].find()), list(db["metrics"].find())) == before


def test_unreachable_server_is_one_clear_line(local_runs, monkeypatch, capsys):
    import analysis.runs as runs_mod
    from analysis.__main__ import main

    folder, _ = local_runs
    monkeypatch.setattr(runs_mod, "MONGO_TIMEOUT_MS", 200)
    unreachable = "mongodb://127.0.0.1:9/sync_nowhere"
    assert main(["sync", str(folder), unreachable]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: could not reach MongoDB at")
    with pytest.raises(AnalysisError, match="could not reach MongoDB"):
        sync_runs(str(folder), unreachable)
