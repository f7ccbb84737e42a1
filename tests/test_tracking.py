"""Tracking through the command line: a local history and MongoDB together, ``-m`` with ``MULTIEXIT_MONGO``,
and a MongoDB outage mid-run that ends, after the repair path, with a complete database record."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pymongo
import pytest

from analysis.__main__ import main as analysis_main
from analysis.runs import load_exit_record, load_metrics, load_runs
from experiments import multiexit_distillation as phuong
from experiments.engine import pipeline
from experiments.engine.trainer import Trainer
from experiments.tracking import MONGO_ENV, RUNS_ENV, run_cli


def cli(tmp_path: Path, monkeypatch, *flags: str):
    """The script's ``__main__`` with the fast config and ``flags``; returns the run."""
    monkeypatch.setattr(phuong.ex, "observers", [])
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "runs"))
    run_cli(phuong.ex, ["multiexit_distillation.py", *flags, "with", "fast", "train.latency_batch=0",
                        f"train.snapshot_root={tmp_path / 'snapshots'}", "--loglevel=ERROR"])
    return phuong.ex.current_run


def local_record(tmp_path: Path, run) -> dict:
    return json.loads((tmp_path / "runs" / run.meta_info["uid"] / "run.json").read_text())


@pytest.fixture
def database(mongo_url):
    """A fresh database name on the session's server, and its pymongo handle."""
    name = f"t{uuid.uuid4().hex[:8]}"
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    yield name, client[name]
    client.close()


def test_a_local_run_then_mongodb_runs_both_complete(tmp_path, monkeypatch, mongo_url, database):
    name, db = database
    monkeypatch.delenv(MONGO_ENV, raising=False)
    host = mongo_url.removeprefix("mongodb://").rstrip("/")
    local = cli(tmp_path, monkeypatch)
    tracked = cli(tmp_path, monkeypatch, "-m", f"{host}:{name}")  # the database numbers its runs from 1
    monkeypatch.setenv(MONGO_ENV, f"{host}:{name}")
    both = cli(tmp_path, monkeypatch, "-m", f"{host}:{name}")  # -m and the variable: one observer, no clash
    assert local.status == tracked.status == both.status == "COMPLETED"
    assert [tracked._id, both._id] == [1, 2]
    docs = {d["_id"]: d for d in db.runs.find()}
    assert sorted(docs) == [1, 2] and all(d["status"] == "COMPLETED" for d in docs.values())
    assert [docs[1]["meta"]["uid"], docs[2]["meta"]["uid"]] == [tracked.meta_info["uid"], both.meta_info["uid"]]
    for r in (local, tracked, both):
        assert local_record(tmp_path, r)["status"] == "COMPLETED"
    assert len({r.meta_info["uid"] for r in (local, tracked, both)}) == 3


def test_a_dead_server_at_start_costs_a_warning_and_the_local_record_is_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(MONGO_ENV, raising=False)
    with pytest.warns(UserWarning, match="the run continues with its local record"):
        run = cli(tmp_path, monkeypatch, "-m", "127.0.0.1:9:nobody")  # nothing listens on port 9
    assert run.status == "COMPLETED" and local_record(tmp_path, run)["status"] == "COMPLETED"
    err = capsys.readouterr().err
    assert f"python -m analysis sync {tmp_path / 'runs'} mongodb://127.0.0.1:9/nobody" in err


def test_an_outage_mid_run_is_repaired_by_sync(tmp_path, monkeypatch, mongo_proxy, database, capsys):
    """The server goes away after epoch 1: the database holds a RUNNING record without the exit record;
    the run completes locally and says how to catch up; once the server is back, sync completes it."""
    name, db = database
    monkeypatch.delenv(MONGO_ENV, raising=False)
    original = Trainer.train_epoch

    def outage_after_epoch_one(self):
        if self.epoch == 1:
            mongo_proxy.stop()
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", outage_after_epoch_one)
    with pytest.warns(UserWarning, match="MongoObserver failed"):
        run = cli(tmp_path, monkeypatch, "-m", f"127.0.0.1:{mongo_proxy.port}:{name}")
    assert run.status == "COMPLETED" and local_record(tmp_path, run)["status"] == "COMPLETED"
    source = f"mongodb://127.0.0.1:{mongo_proxy.port}/{name}"
    assert f"python -m analysis sync {tmp_path / 'runs'} {source}" in capsys.readouterr().err

    doc = db.runs.find_one({"meta.uid": run.meta_info["uid"]})
    assert doc["status"] == "RUNNING"  # what the outage left behind: no exit record, no end
    assert [a["name"] for a in doc["artifacts"]] == ["split.npz"]

    mongo_proxy.start()  # the server is back
    assert analysis_main(["sync", str(tmp_path / "runs"), source]) == 0
    doc = db.runs.find_one({"meta.uid": run.meta_info["uid"]})
    assert doc["status"] == "COMPLETED" and db.runs.count_documents({}) == 1
    local, remote = (load_metrics(s, r) for s, r in ((str(tmp_path / "runs"), run.meta_info["uid"]),
                                                        (source, doc["_id"])))
    assert remote.equals(local) and sorted(set(remote["step"])) == [1, 2]
    record, synced = (load_exit_record(s, r) for s, r in ((str(tmp_path / "runs"), run.meta_info["uid"]),
                                                           (source, doc["_id"])))
    assert (record.test_logits == synced.test_logits).all()
    assert load_runs(source).loc[0, "uid"] == run.meta_info["uid"]


def test_a_server_back_before_the_run_ends_is_caught_up_automatically(tmp_path, monkeypatch, mongo_proxy, database,
                                                                       capsys):
    name, db = database
    monkeypatch.delenv(MONGO_ENV, raising=False)
    train_epoch, attach = Trainer.train_epoch, pipeline.attach_exit_record

    def outage_after_epoch_one(self):
        if self.epoch == 1:
            mongo_proxy.stop()
        return train_epoch(self)

    def back_after_the_exit_record(*args):  # its upload fails: the observer gives up, the server returns
        result = attach(*args)
        mongo_proxy.start()
        return result

    monkeypatch.setattr(Trainer, "train_epoch", outage_after_epoch_one)
    monkeypatch.setattr(pipeline, "attach_exit_record", back_after_the_exit_record)
    with pytest.warns(UserWarning, match="MongoObserver failed"):
        run = cli(tmp_path, monkeypatch, "-m", f"127.0.0.1:{mongo_proxy.port}:{name}")
    assert "it has been uploaded now" in capsys.readouterr().err
    doc = db.runs.find_one({"meta.uid": run.meta_info["uid"]})
    assert doc["status"] == "COMPLETED" and "exit_record.npz" in [a["name"] for a in doc["artifacts"]]
    assert db.metrics.find_one({"run_id": doc["_id"], "name": "val.acc.mean"})["steps"] == [1, 2]
