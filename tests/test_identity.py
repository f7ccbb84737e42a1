"""Run identity: uids that never collide across stores, references that resolve to exactly one run (or are
refused with the candidates), resumes checked against the snapshot, and a stage-2 record that says what ran."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sacred.observers import FileStorageObserver

from experiments import imta
from experiments import multiexit_distillation as phuong
from experiments.engine.checkpoint import load_snapshot, resume_conflicts
from experiments.references import RunReferenceError, resolve_run
from experiments.tracking import RunFolderObserver

QUIET = {"--loglevel": "ERROR"}


def run(ex, root: Path, stores=("runs",), named=("fast",), observer=RunFolderObserver, **updates):
    """``ex.run`` observed by an ``observer`` per store folder under ``root``; observers restored after."""
    saved = ex.observers
    ex.observers = [observer(str(root / s)) for s in stores]
    try:
        train = {"snapshot_root": str(root / "snapshots"), "latency_batch": 0, **updates.pop("train", {})}
        return ex.run(named_configs=list(named), config_updates={"train": train, "seed": 4, **updates}, options=QUIET)
    finally:
        ex.observers = saved


def record(root: Path, store: str, r) -> Path:
    return root / store / str(r._id)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- identity
def test_runs_with_equal_ids_in_different_stores_keep_their_own_snapshots(tmp_path):
    """sacred gives both runs id 1 in their own store; each run's uid names its folders, nothing is moved."""
    a, b = (run(phuong.ex, tmp_path, stores=(s,), observer=FileStorageObserver) for s in ("a", "b"))
    assert str(a._id) == str(b._id) == "1"
    assert a.info["uid"] != b.info["uid"]
    folders = sorted(p.name for p in (tmp_path / "snapshots" / "multiexit_distillation").iterdir())
    assert folders == sorted([a.info["uid"], b.info["uid"]])  # no '.replaced-' folder, nothing renamed
    for r, store in ((a, "a"), (b, "b")):
        snaps = Path(r.info["snapshot_dir"])
        assert snaps.name == r.info["uid"] == read(record(tmp_path, store, r) / "run.json")["meta"]["uid"]
        assert load_snapshot(snaps / "final.pt")["meta"]["uid"] == r.info["uid"]
        assert read(record(tmp_path, store, r) / "info.json")["uid"] == r.info["uid"]


def test_the_run_folder_is_named_by_the_uid_and_records_the_environment(tmp_path):
    r = run(phuong.ex, tmp_path)
    uid = r.meta_info["uid"]
    assert r._id == uid and (tmp_path / "runs" / uid / "run.json").is_file()
    env = read(tmp_path / "runs" / uid / "info.json")["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["device"]
    sources = read(tmp_path / "runs" / uid / "run.json")["experiment"]["sources"]
    saved = {Path(name).parts[0] for name, _ in sources}
    assert {"models", "losses", "data", "experiments"} <= saved


# ------------------------------------------------------------------------------------------- references
@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    """A finished stage=ge run in store 'a' and another in store 'b', both id 1 there (sacred's numbering, as
    in two MongoDBs or two plain FileStorageObserver folders)."""
    root = tmp_path_factory.mktemp("stores")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = run(imta.ex, root, stores=("a",), observer=FileStorageObserver, stage="ge")
        b = run(imta.ex, root, stores=("b",), observer=FileStorageObserver, stage="ge", data={"split_seed": 1})
    finally:
        torch.set_num_threads(threads)
    return root, a, b


def test_an_id_naming_different_runs_in_two_stores_is_refused_with_the_candidates(two_stores):
    root, a, b = two_stores
    before = {s: sorted((root / s).iterdir()) for s in ("a", "b")}
    with pytest.raises(RunReferenceError) as err:
        run(imta.ex, root, stores=("a", "b"), stage="imta", ge_run=1)
    message = str(err.value)
    assert "ambiguous" in message and a.info["uid"] in message and b.info["uid"] in message
    assert {s: sorted((root / s).iterdir()) for s in ("a", "b")} == before  # refused before any record


@pytest.mark.parametrize("store", ["a", "b"])
def test_an_id_resolves_through_the_store_the_run_is_observed_by(two_stores, store):
    root, a, b = two_stores
    parent = {"a": a, "b": b}[store]
    child = run(imta.ex, root, stores=(store,), stage="imta", ge_run=1)
    assert child.info["parent"]["uid"] == parent.info["uid"]
    assert Path(child.info["parent"]["snapshot"]) == Path(parent.info["snapshot_dir"]) / "final.pt"
    # stage 2 trained on its parent's split (b drew another one: split_seed=1), recorded in its config
    config = read(record(root, store, child) / "config.json")
    assert config["data"]["split_file"] == str(Path(parent.info["snapshot_dir"]) / "split.npz")
    assert config["data"]["split_seed"] == (1 if store == "b" else 0)
    child_split = dict(load_split_npz(Path(child.info["snapshot_dir"]) / "split.npz"))
    parent_split = dict(load_split_npz(Path(parent.info["snapshot_dir"]) / "split.npz"))
    assert all((child_split[k] == parent_split[k]).all() for k in ("train", "val"))
    assert load_snapshot(Path(child.info["snapshot_dir"]) / "final.pt")["meta"]["parent"]["uid"] == parent.info["uid"]


def load_split_npz(path: Path):
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_uid_and_unique_prefix_resolve_and_a_shared_prefix_is_refused(two_stores, tmp_path):
    root, a, b = two_stores
    uid = a.info["uid"]
    for ref in (uid, uid[:-2]):
        assert resolve_run(ref, "imta", root / "snapshots").uid == uid
    for name in ("20260101-000000-aaaaaa", "20260101-000000-aaaaab"):
        (tmp_path / "imta" / name).mkdir(parents=True)
    with pytest.raises(RunReferenceError, match="matches several .*aaaaaa, 20260101-000000-aaaaab"):
        resolve_run("20260101-000000-aaaa", "imta", tmp_path)
    with pytest.raises(RunReferenceError, match="not a uid under"):
        resolve_run("nonsense", "imta", root / "snapshots")
    with pytest.raises(RunReferenceError, match="no imta run with id 7"):
        resolve_run(7, "imta", root / "snapshots")


def test_a_snapshot_holding_another_run_is_refused(two_stores, tmp_path):
    root, a, b = two_stores
    fake = tmp_path / "snapshots" / "imta" / a.info["uid"]
    fake.mkdir(parents=True)
    shutil.copy(Path(b.info["snapshot_dir"]) / "final.pt", fake / "final.pt")
    with pytest.raises(RunReferenceError, match=f"holds run {b.info['uid']}, not {a.info['uid']}"):
        resolve_run(a.info["uid"], "imta", tmp_path / "snapshots")


def test_an_unfinished_parent_is_refused(two_stores, tmp_path):
    root, a, _ = two_stores
    partial = tmp_path / "imta" / "x"
    partial.mkdir(parents=True)
    shutil.copy(Path(a.info["snapshot_dir"]) / "last.pt", partial / "last.pt")
    with pytest.raises(RunReferenceError, match="holds no final.pt .*is it finished"):
        resolve_run(str(partial), "imta", tmp_path)


# ------------------------------------------------------------------------------------------- resume
def test_resume_conflicts_name_the_keys_that_change_the_numbers():
    saved = {"seed": 1, "optim": {"lr": 0.1}, "train": {"epochs": 2, "device": "cpu", "resume": None},
             "data": {"batch_size": 64, "root": "a"}}
    current = {"seed": 9, "optim": {"lr": 0.05}, "train": {"epochs": 4, "device": "cuda", "resume": "x"},
               "data": {"batch_size": 32, "root": "b"}}
    assert resume_conflicts(saved, current) == ["data.batch_size: 64 -> 32", "optim.lr: 0.1 -> 0.05"]
    assert resume_conflicts(saved, saved) == []


def test_a_resume_with_a_changed_lr_is_refused_before_any_record(tmp_path):
    first = run(phuong.ex, tmp_path)
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    with pytest.raises(RunReferenceError, match=r"cannot resume .* optim.lr: 0.05 -> 0.02"):
        run(phuong.ex, tmp_path, optim={"lr": 0.02}, train={"resume": first.info["uid"]})
    with pytest.raises(RunReferenceError, match="weights only"):
        run(phuong.ex, tmp_path, train={"resume": str(Path(first.info["snapshot_dir"]) / "best.pt")})
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before  # no record of the refused runs
    again = run(phuong.ex, tmp_path, train={"resume": first.info["uid"]})
    assert again.status == "COMPLETED" and again.info["resumed_from"]["uid"] == first.info["uid"]
    assert again.result["test_acc"] == first.result["test_acc"]  # a finished run resumes to the same selection


# ------------------------------------------------------------------------------------------- commands, threads
def test_save_config_writes_yaml_and_its_option_is_not_an_unknown_key(tmp_path):
    import yaml

    target = tmp_path / "config.yaml"
    imta.ex.run("save_config", named_configs=["fast"], options=QUIET,
                config_updates={"stage": "ge", "config_filename": str(target)})
    assert yaml.safe_load(target.read_text())["stage"] == "ge"
    with pytest.raises(Exception, match="unknown config key 'config_filename'"):  # only save_config takes it
        run(imta.ex, tmp_path, stage="ge", config_filename=str(target))


def test_train_threads_sets_torch_threads_and_is_recorded(tmp_path):
    before = torch.get_num_threads()
    r = run(phuong.ex, tmp_path, train={"threads": 2})
    try:
        assert torch.get_num_threads() == 2 and r.info["environment"]["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_default_threads_honour_omp_num_threads(monkeypatch):
    from experiments.engine.pipeline import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(None) == 1 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        import os

        assert set_threads(None) == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_a_snapshot_root_that_cannot_be_written_is_refused_before_any_record(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="is not a writable folder"):
        run(phuong.ex, tmp_path, train={"snapshot_root": str(blocker / "snapshots")})
    assert not (tmp_path / "runs").exists()
