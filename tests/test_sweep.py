"""Ray Tune sweeps of tracked runs (a local Ray on this machine's 2 CPUs): every trial one ordinary sacred run,
a re-run of the same command restores the sweep instead of training again, a failed trial does not stop it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.sweep import parent_uid, parse_args, sweep_name

REPO = Path(__file__).resolve().parents[1]


def sweep(root: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "experiments.sweep", "multiexit_distillation", *args, "-F", str(root / "runs"),
               "--snapshot-root", str(root / "snapshots"), "--storage", str(root / "sweeps"),
               "with", "fast", "train.latency_batch=0"]
    return subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)


def records(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runs").iterdir() if p.name != "_sources")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    first = sweep(root, "--grid", "seed=1,2", "--grid", "distillation=true,false")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return root, first


def test_a_four_trial_sweep_leaves_four_runs_with_exit_records(grid):
    root, first = grid
    runs = records(root)
    assert len(runs) == 4 and "every trial finished" in first.stdout
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    assert sorted((c["seed"], c["distillation"]) for c in configs) == [(1, False), (1, True), (2, False), (2, True)]
    assert all(c["train"]["threads"] == 1 for c in configs)  # each trial's threads are its CPUs
    for run in runs:
        info = json.loads((run / "info.json").read_text())
        assert (Path(info["snapshot_dir"]) / "exit_record.npz").is_file()
        assert json.loads((run / "run.json").read_text())["status"] == "COMPLETED"


def test_the_same_command_again_restores_the_sweep_without_training(grid):
    root, _ = grid
    before = records(root)
    again = sweep(root, "--grid", "seed=1,2", "--grid", "distillation=true,false")
    assert again.returncode == 0 and "restoring" in again.stdout
    assert records(root) == before  # not one run trained again
    assert again.stdout.count("done    ") == 4


def test_parents_resolve_to_the_one_run_with_the_trials_seed(grid):
    root, _ = grid
    runs = records(root)
    uid = parent_uid(str(root / "runs"), "multiexit_distillation", {"seed": 2, "distillation": False})
    assert uid in [r.name for r in runs]
    with pytest.raises(ValueError, match="exactly one"):
        parent_uid(str(root / "runs"), "multiexit_distillation", {"seed": 2})  # two runs: never a guess


def test_a_failed_trial_is_reported_and_the_others_finish(tmp_path):
    done = sweep(tmp_path, "--grid", "optim.lr=0.05,-1")  # lr=-1 is refused by the config rules
    assert done.returncode == 1
    assert "FAILED  optim.lr=-1" in done.stdout and "1 of 2 trials failed" in done.stdout
    assert len(records(tmp_path)) == 1


def test_one_command_one_name_and_grid_parsing():
    args = parse_args(["imta", "--grid", "seed=1,2,3", "--parent", "ge_run=stage=ge,ge_scope=coarsest",
                       "with", "quick", "stage=imta"])
    assert args.grid == {"seed": [1, 2, 3]} and args.named == ["quick"] and args.updates == {"stage": "imta"}
    assert args.parents == {"ge_run": {"stage": "ge", "ge_scope": "coarsest"}}
    other = parse_args(["imta", "--grid", "seed=1,2", "with", "quick", "stage=imta"])
    assert sweep_name(args) == sweep_name(parse_args(["imta", "--grid", "seed=1,2,3", "--parent",
                                                      "ge_run=stage=ge,ge_scope=coarsest", "with", "quick",
                                                      "stage=imta"]))
    assert sweep_name(args) != sweep_name(other)
