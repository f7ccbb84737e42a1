"""experiments/: the Phuong & Lampert experiment end to end with ``fast`` into temporary observer folders (its
record, snapshots and metrics, analysis on its runs, overrides, print_config, clear errors), the tracking
helpers, and the script run as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sacred.observers import FileStorageObserver, MongoObserver, RunObserver

from analysis.exit_record import ExitRecord
from experiments.engine.checkpoint import load_snapshot
from experiments.multiexit_distillation import ex
from experiments.tracking import (MONGO_ENV, RUNS_ENV, ForgivingObserver, MongoTarget, RunFolderObserver,
                                  default_observers, parse_mongo, run_cli)
from experiments.validation import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "multiexit_distillation.py"
QUIET = {"--loglevel": "ERROR"}


@pytest.fixture
def no_observers(monkeypatch):
    """Leave ``ex.observers`` as it was after the test (empty during it)."""
    monkeypatch.setattr(ex, "observers", [])
    return ex


def fast_run(snapshots: Path, observers=(), train=None, **updates):
    """``ex.run`` with the fast named config; snapshots under ``snapshots``; ``ex.observers`` restored after."""
    saved = ex.observers
    ex.observers = list(observers)
    try:
        return ex.run(named_configs=["fast"], config_updates={
            "train": {"snapshot_root": str(snapshots), **(train or {})}, **updates,
        }, options=QUIET)
    finally:
        ex.observers = saved


def run_dir(runs: Path, run) -> Path:
    return runs / str(run._id)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """One distillation and one CE run (seed 1) in one FileStorageObserver folder."""
    base = tmp_path_factory.mktemp("two_runs")
    runs, snapshots = base / "runs", base / "snapshots"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        observer = FileStorageObserver(str(runs))
        distil = fast_run(snapshots, [observer], seed=1)
        ce = fast_run(snapshots, [observer], seed=1, distillation=False)
    finally:
        torch.set_num_threads(threads)
    return {"runs": runs, "snapshots": snapshots, "distillation": distil, "ce": ce, "base": base}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("variant", ["distillation", "ce"])
def test_fast_run_completes_with_artifacts_info_and_metrics(two_runs, variant):
    run = two_runs[variant]
    folder = run_dir(two_runs["runs"], run)
    assert run.status == "COMPLETED"
    assert read_json(folder / "run.json")["status"] == "COMPLETED"
    assert {"exit_record.npz", "split.npz"} <= set(read_json(folder / "run.json")["artifacts"])
    assert (folder / "exit_record.npz").is_file() and (folder / "split.npz").is_file()

    info = read_json(folder / "info.json")
    assert info["variant"] == variant
    exits = info["exits"]
    for k in (1, 2, 3):
        assert 0.0 <= exits[f"test_acc_exit{k}"] <= 1.0
        assert 0.0 <= exits[f"val_acc_exit{k}"] <= 1.0
        assert exits[f"mmacs_exit{k}"] > 0
    assert "test_acc_exit4" not in exits
    assert exits["test_acc_mean"] == pytest.approx(np.mean([exits[f"test_acc_exit{k}"] for k in (1, 2, 3)]), abs=1e-5)

    metrics = read_json(folder / "metrics.json")
    for name in ("val.acc.exit1", "val.acc.exit2", "val.acc.exit3", "val.acc.mean", "val.loss", "train.loss",
                 "train.acc.exit1", "train.acc.exit3", "lr"):
        assert metrics[name]["steps"] == [1, 2], name
    assert ("train.temperature" in metrics) == (variant == "distillation")
    if variant == "distillation":
        assert metrics["train.temperature"]["values"][0] >= 1.0

    snaps = Path(info["snapshot_dir"])
    assert snaps == (two_runs["snapshots"] / "multiexit_distillation" / run.info["uid"]).resolve()
    for name in ("best.pt", "last.pt", "final.pt", "exit_record.npz", "split.npz"):
        assert (snaps / name).is_file(), name
    last = load_snapshot(snaps / "last.pt")
    assert last["epoch"] == 2 and last["meta"]["variant"] == variant
    assert ("temperature" in last["loss"]) == (variant == "distillation")


def test_exit_record_is_consistent_with_the_reported_accuracy(two_runs):
    for variant in ("distillation", "ce"):
        run = two_runs[variant]
        record = ExitRecord.load(run_dir(two_runs["runs"], run) / "exit_record.npz")
        assert record.num_exits == 3
        assert record.test_logits.shape == (3, 128, 4) and record.val_logits.shape == (3, 64, 4)
        assert np.all(np.diff(record.macs) > 0) and np.all(np.diff(record.params) > 0)
        assert np.all(np.isfinite(record.latency_ms)) and np.all(np.diff(record.latency_ms) >= 0)
        acc = record.accuracy("test")
        assert acc.round(5).tolist() == run.result["test_acc"]
        assert run.result["mmacs"] == (record.macs / 1e6).round(3).tolist()
        info = run.info["exits"]
        assert [info[f"test_acc_exit{k}"] for k in (1, 2, 3)] == pytest.approx(acc, abs=1e-5)
        assert [info[f"val_acc_exit{k}"] for k in (1, 2, 3)] == pytest.approx(record.accuracy("val"), abs=1e-5)
        assert info["params_total"] == record.params[-1]
    # the two variants share data, split and architecture: same targets and costs
    rec_d, rec_c = (ExitRecord.load(run_dir(two_runs["runs"], two_runs[v]) / "exit_record.npz") for v in ("distillation", "ce"))
    np.testing.assert_array_equal(rec_d.test_targets, rec_c.test_targets)
    np.testing.assert_array_equal(rec_d.macs, rec_c.macs)


def test_final_snapshot_rebuilds_the_network_and_reproduces_the_recorded_logits(two_runs):
    """A later stage only needs the snapshot: its meta rebuilds model and data, its weights give the record."""
    from data import build_data, load_split
    from experiments.ingredients import model as model_ing

    run = two_runs["distillation"]
    snaps = Path(run.info["snapshot_dir"])
    snapshot = load_snapshot(snaps / "final.pt")
    meta = snapshot["meta"]
    assert meta["num_classes"] == 4 and meta["in_channels"] == 3 and meta["image_size"] == 16
    net = model_ing.build(meta["model"], meta["num_classes"], meta["in_channels"], meta["image_size"])
    net.load_state_dict(snapshot["model"])
    net.eval()
    bundle = build_data(**{**meta["data"], "split_file": meta["split_file"]}, loader_seed=0)
    np.testing.assert_array_equal(bundle.split["val"], load_split(snaps / "split.npz")["val"])
    with torch.no_grad():
        logits = torch.cat([torch.stack(net(x), 0) for x, _ in bundle.test], dim=1)
    record = ExitRecord.load(snaps / "exit_record.npz")
    np.testing.assert_allclose(logits.numpy(), record.test_logits, rtol=1e-5, atol=1e-5)


def test_analysis_cli_draws_curves_from_both_variants(two_runs, tmp_path, capsys):
    from analysis.__main__ import main

    out = tmp_path / "figures"
    assert main(["curves", str(two_runs["runs"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs with exit records" in printed
    for name in ("anytime.csv", "budgeted.csv", "anytime.png", "budgeted.png", "final.png"):
        assert (out / name).stat().st_size > 0, name
    anytime = pd.read_csv(out / "anytime.csv")
    assert set(anytime["variant"]) == {"distillation", "ce"}
    for variant in ("distillation", "ce"):
        rows = anytime[anytime["variant"] == variant].sort_values("exit")
        record = ExitRecord.load(run_dir(two_runs["runs"], two_runs[variant]) / "exit_record.npz")
        np.testing.assert_allclose(rows["test_acc_mean"], record.accuracy("test"))
        np.testing.assert_allclose(rows["macs_mean"], record.macs)
    assert set(pd.read_csv(out / "budgeted.csv")["variant"]) == {"distillation", "ce"}


# ------------------------------------------------------------------------------------------- command line
def test_command_line_overrides_are_recorded_and_used(tmp_path, no_observers):
    runs = tmp_path / "runs"
    run = ex.run_commandline([
        "multiexit_distillation.py", "with", "fast", "optim.lr=0.03", "seed=3",
        f"train.snapshot_root={tmp_path / 'snapshots'}", "-F", str(runs), "--loglevel=ERROR",
    ])
    assert run.status == "COMPLETED"
    config = read_json(run_dir(runs, run) / "config.json")
    assert config["optim"]["lr"] == 0.03 and config["seed"] == 3
    assert config["data"]["name"] == "synthetic" and config["train"]["epochs"] == 2
    # the lr reached the optimiser: after epoch 1 of 2 the cosine schedule is at half the base lr
    lrs = read_json(run_dir(runs, run) / "metrics.json")["lr"]["values"]
    assert lrs == pytest.approx([0.015, 0.0], abs=1e-12)


def test_same_seed_same_result_other_seed_other_result(tmp_path):
    a = fast_run(tmp_path / "s", seed=7, train={"latency_batch": 0})
    b = fast_run(tmp_path / "s", seed=7, train={"latency_batch": 0})
    c = fast_run(tmp_path / "s", seed=8, train={"latency_batch": 0})
    assert a.result["test_acc"] == b.result["test_acc"]
    assert a.result["test_acc"] != c.result["test_acc"]
    # unobserved runs keep separate snapshot folders
    assert len(list((tmp_path / "s" / "multiexit_distillation").iterdir())) == 3


def test_print_config_shows_the_paper_defaults(no_observers, capsys):
    ex.run_commandline(["multiexit_distillation.py", "print_config", "--loglevel=ERROR"])
    out = capsys.readouterr().out
    for line in ("name = 'cifar100'", "n_per_class = 150", "n_blocks = 11", "epochs = 300", "lr = 0.1",
                 "milestones = [150, 225]", "distillation = True", "arch = 'msdnet'", "snapshot_root = 'snapshots'"):
        assert line in out, line
    ex.run_commandline(["multiexit_distillation.py", "print_config", "with", "fast", "--loglevel=ERROR"])
    out = capsys.readouterr().out
    assert "name = 'synthetic'" in out and "epochs = 2" in out and "n_blocks = 3" in out


@pytest.mark.parametrize(
    "updates, error, words",
    [
        ({"data": {"name": "cifar1000"}}, ConfigError, ["invalid data.name='cifar1000'", "did you mean 'cifar100'",
                                                        "'cifar10', 'cifar100', 'svhn'"]),
        ({"model": {"arch": "resnet21"}}, ConfigError, ["invalid model.arch='resnet21'", "resnet20",
                                                        "'msdnet_phuong_cifar'"]),
        ({"train": {"device": "cuda"}}, ValueError, ["device='cuda'", "no GPU", "device='auto' or 'cpu'"]),
        ({"optim": {"schedule": "cosin"}}, ConfigError, ["invalid optim.schedule='cosin'", "did you mean 'cosine'"]),
        ({"temperature": "adaptiv"}, ConfigError, ["invalid temperature='adaptiv'", "'adaptive', 'const'"]),
    ],
    ids=["dataset", "arch", "device", "schedule", "temperature"],
)
def test_bad_input_is_a_clear_error(tmp_path, updates, error, words):
    if "cuda" in str(updates) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(error) as err:
        fast_run(tmp_path / "snapshots", **updates)
    message = str(err.value)
    for word in words:
        assert word in message, word


def test_bad_input_on_the_command_line_is_one_line_and_leaves_no_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ex, "observers", [])
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.delenv(MONGO_ENV, raising=False)
    with pytest.raises(SystemExit) as stop:
        run_cli(ex, ["multiexit_distillation.py", "with", "fast", "data.name=cifar1000",
                     f"train.snapshot_root={tmp_path}", "--loglevel=ERROR"])
    assert stop.value.code == 1
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert lines[0].startswith("error: invalid data.name='cifar1000': expected one of")
    assert lines[1:] == ["(run with --debug for the full traceback)"]
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------- tracking
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("localhost:27017:mydb", ("mongodb://localhost:27017/", "mydb")),
        ("db.example.org:27018", ("mongodb://db.example.org:27018/", "sacred")),
        ("mongodb://h:1/runsdb", ("mongodb://h:1/runsdb", "runsdb")),
        ("mongodb://h:1/runsdb?authSource=admin", ("mongodb://h:1/runsdb?authSource=admin", "runsdb")),
        ("mongodb://h:1", ("mongodb://h:1", "sacred")),
        ("mongodb://h:1/", ("mongodb://h:1/", "sacred")),
        ("mongodb+srv://cluster.example.net/exp", ("mongodb+srv://cluster.example.net/exp", "exp")),
    ],
)
def test_parse_mongo_forms(spec, expected):
    assert parse_mongo(spec) == expected


@pytest.mark.parametrize("spec", ["localhost", "localhost:port", "a:1:b:c", ""])
def test_parse_mongo_rejects_other_forms(spec):
    with pytest.raises(ValueError, match=MONGO_ENV):
        parse_mongo(spec)


def test_default_observers_file_storage_and_flags(tmp_path, monkeypatch):
    monkeypatch.delenv(MONGO_ENV, raising=False)
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "my_runs"))
    argv, (observer,) = default_observers(["script.py", "with", "fast"])
    assert argv == ["script.py", "with", "fast"] and isinstance(observer, RunFolderObserver)
    assert Path(observer.basedir) == tmp_path / "my_runs"
    # sacred's own -F / --file_storage moves the folder; the flag is taken over (and removed)
    for flags in (["-F", "other"], ["--file_storage=other"], ["--file_storage", "other"]):
        argv, (observer,) = default_observers(["script.py", *flags, "with", "fast"])
        assert argv == ["script.py", "with", "fast"] and observer.basedir == "other"
    monkeypatch.delenv(RUNS_ENV)
    _, (observer,) = default_observers(["script.py"])
    assert Path(observer.basedir) == Path("runs")


def test_default_observers_add_one_forgiving_mongo_observer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(MONGO_ENV, "127.0.0.1:9:tracked")  # nothing listens there; creating the client is lazy
    _, observers = default_observers(["script.py"])
    assert [type(o) for o in observers] == [RunFolderObserver, MongoTarget]
    inner = observers[1].inner
    assert isinstance(inner, MongoObserver) and inner.runs.database.name == "tracked"
    assert observers[1].priority == inner.priority and observers[1].source == "mongodb://127.0.0.1:9/tracked"
    # -m wins over the environment: two observers of one database would collide on the run id
    argv, observers = default_observers(["script.py", "-m", "127.0.0.1:9:other", "with", "fast"])
    assert argv == ["script.py", "with", "fast"]
    assert [o.inner.runs.database.name for o in observers[1:]] == ["other"]
    assert "MULTIEXIT_MONGO=127.0.0.1:9:tracked is not used" in capsys.readouterr().err
    monkeypatch.setenv(MONGO_ENV, "not-a-spec")
    with pytest.raises(ValueError, match=MONGO_ENV):
        default_observers(["script.py"])


class ExplodingObserver(RunObserver):
    """Raises in the events named in ``fail``; records every call it gets."""

    priority = 50

    def __init__(self, fail=()):
        self.fail = set(fail)
        self.calls = []

    def _event(self, name):
        self.calls.append(name)
        if name in self.fail:
            raise ConnectionError(f"{name} exploded")

    def started_event(self, *args, **kwargs):
        self._event("started_event")

    def log_metrics(self, metrics_by_name, info):
        self._event("log_metrics")

    def artifact_event(self, *args, **kwargs):
        self._event("artifact_event")

    def completed_event(self, *args, **kwargs):
        self._event("completed_event")


def test_a_failing_observer_alone_kills_the_run(tmp_path):
    # sacred deliberately lets a failure in started_event stop the run: why the wrapper exists
    with pytest.raises(ConnectionError, match="started_event exploded"):
        fast_run(tmp_path / "snapshots", [ExplodingObserver(fail={"started_event"})])


@pytest.mark.parametrize("fail", ["started_event", "log_metrics"])
def test_forgiving_observer_lets_the_run_complete_with_a_warning(tmp_path, fail):
    runs = tmp_path / "runs"
    exploding = ExplodingObserver(fail={fail})
    with pytest.warns(UserWarning, match=f"ExplodingObserver failed \\({fail} exploded\\); the run continues"):
        run = fast_run(tmp_path / "snapshots", [ForgivingObserver(exploding), FileStorageObserver(str(runs))])
    assert run.status == "COMPLETED"
    assert read_json(run_dir(runs, run) / "run.json")["status"] == "COMPLETED"
    assert (run_dir(runs, run) / "exit_record.npz").is_file()
    # after its first failure the observer is left alone
    assert exploding.calls[-1] == fail and exploding.calls.count(fail) == 1
    assert "completed_event" not in exploding.calls


def test_forgiving_observer_passes_events_through_while_healthy(tmp_path):
    healthy = ExplodingObserver()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        run = fast_run(tmp_path / "snapshots", [ForgivingObserver(healthy)])
    assert run.status == "COMPLETED"
    assert healthy.calls[0] == "started_event" and healthy.calls[-1] == "completed_event"
    assert {"log_metrics", "artifact_event"} <= set(healthy.calls)


# ------------------------------------------------------------------------------------------- the script
def test_script_runs_from_anywhere_with_the_default_file_observer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != MONGO_ENV}
    env.update({RUNS_ENV: str(tmp_path / "runs"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "with", "fast", "optim.lr=0.02", f"train.snapshot_root={tmp_path / 'snapshots'}",
         "--loglevel=ERROR"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multiexit_distillation [distillation] epoch" in proc.stdout
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "_sources"]
    assert read_json(run / "run.json")["status"] == "COMPLETED"
    assert (run / "exit_record.npz").is_file() and (run / "split.npz").is_file()
    assert read_json(run / "config.json")["optim"]["lr"] == 0.02
    assert (tmp_path / "snapshots" / "multiexit_distillation" / run.name / "best.pt").is_file()
    assert list(work.iterdir()) == []  # nothing written into the working directory


# ------------------------------------------------------------------------------------------- model families
def test_every_registered_architecture_has_its_family_knobs_in_the_model_ingredient():
    from experiments.ingredients.model import FAMILIES
    from models import list_models
    from models.registry import family_of

    assert {arch: family_of(arch) for arch in list_models() if family_of(arch) not in FAMILIES} == {}


def test_an_architecture_reads_its_family_knobs_only():
    from experiments.ingredients import model as model_ing

    config = {"arch": "resnet20", "resnet": {"width": 8}, "msdnet": {"n_blocks": 99}}
    net = model_ing.build(config, num_classes=4, in_channels=3, image_size=16)
    assert net.stem[0].out_channels == 8 and net.num_exits == 3
