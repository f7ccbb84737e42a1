"""One run on two processes (torchrun, gloo on CPU) against the same run in one process, and a DDP run stopped by
SIGTERM and resumed. Each run is a real ``torchrun`` / ``python`` subprocess of an experiment script."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.engine.checkpoint import load_snapshot

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "experiments/multiexit_distillation.py"
# BatchNorm- and dropout-free, so the two processes' shards make exactly the global batch's gradient: a 2-block ViT
VIT = ["model.arch=timm/vit_tiny_patch16_224",
       'model.timm={"kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}}']
# drop_last: equal shards of every global batch of 32; max_prob=0.2 makes Phuong's temperature grow every step
COMMON = ["with", "fast", "seed=5", "data.drop_last=True", "max_prob=0.2", "train.latency_batch=0", *VIT]


def command(root: Path, processes: int, *updates: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return [*launcher, SCRIPT, "-F", str(root / "runs"), *COMMON, f"train.snapshot_root={root / 'snapshots'}",
            *updates]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(root: Path, processes: int, *updates: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(root, processes, *updates), cwd=REPO, env=environment(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def only_run(root: Path) -> tuple[dict, dict, Path]:
    """The one run record under root/runs (run.json, info.json) and the one snapshot folder: only rank 0 wrote."""
    records = [p for p in (root / "runs").iterdir() if p.name != "_sources"]
    folders = list((root / "snapshots" / "multiexit_distillation").iterdir())
    assert len(records) == 1 and len(folders) == 1, (records, folders)
    read = lambda name: json.loads((records[0] / name).read_text())  # noqa: E731
    return read("run.json"), read("info.json"), folders[0]


def assert_same_weights(a: dict, b: dict) -> None:
    # rtol 1e-5: all-reduce adds two shards' gradient sums where one process sums the batch in another order;
    # float32 rounding of that order, carried through the steps, is all that may differ
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(b["loss"]["temperature"], a["loss"]["temperature"])


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory):
    single, ddp = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
    run(single, 1)
    run(ddp, 2)
    return single, ddp


def metrics_of(root: Path) -> dict:
    record = next(p for p in (root / "runs").iterdir() if p.name != "_sources")
    return json.loads((record / "metrics.json").read_text())


def test_two_processes_train_the_weights_of_one_process_with_the_same_global_batch(single_and_ddp):
    single, ddp = single_and_ddp
    one, two = only_run(single)[-1], only_run(ddp)[-1]
    # each rank trained its shard: together the epoch's samples, not twice them
    assert metrics_of(ddp)["train.samples"]["values"] == metrics_of(single)["train.samples"]["values"]
    assert metrics_of(ddp)["train.loss"]["values"] == pytest.approx(metrics_of(single)["train.loss"]["values"])
    a, b = load_snapshot(one / "last.pt"), load_snapshot(two / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["loss"]["temperature"] > 1.0  # the state that must stay identical on every rank did move
    assert_same_weights(a, b)


def test_rank_zero_alone_records_the_run(single_and_ddp):
    _, ddp = single_and_ddp
    record, info, folder = only_run(ddp)
    assert record["status"] == "COMPLETED"
    assert info["environment"]["processes"] == 2
    assert {p.name for p in folder.iterdir()} >= {"last.pt", "final.pt", "exit_record.npz", "split.npz"}


def test_a_ddp_run_stopped_by_sigterm_resumes_to_the_same_weights(tmp_path):
    epochs = "train.epochs=30"
    straight = tmp_path / "straight"
    run(straight, 2, epochs)
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(command(stopped, 2, epochs), cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    folder = stopped / "snapshots" / "multiexit_distillation"
    deadline = time.time() + 240
    while time.time() < deadline and not list(folder.glob("*/last.pt")):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)  # what a cluster scheduler does to the whole job
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0 and "stopped by signal SIGTERM" in output, output[-3000:]
    uid = next(folder.iterdir()).name
    assert load_snapshot(folder / uid / "last.pt")["epoch"] < 30  # stopped before the end
    run(stopped, 2, epochs, f"train.resume={uid}")
    resumed = [p for p in folder.iterdir() if p.name != uid]
    assert len(resumed) == 1
    a = load_snapshot(next((straight / "snapshots" / "multiexit_distillation").iterdir()) / "last.pt")
    b = load_snapshot(resumed[0] / "last.pt")
    assert a["epoch"] == b["epoch"] == 30
    assert_same_weights(a, b)


def _temperature_after_one_batch(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: its shard's teacher is sure (max-prob 0.9) on rank 0, unsure (0.4) on rank 1."""
    import torch.distributed as dist

    from losses.phuong import PhuongDistillationLoss

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    try:
        probs = [0.9, 0.05, 0.05] if rank == 0 else [0.4, 0.3, 0.3]
        teacher = torch.tensor([probs]).log().repeat(4, 1)
        loss = PhuongDistillationLoss(2, max_prob=0.5)
        loss.after_batch([teacher, teacher])
        torch.save(loss.temperature, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_phuongs_temperature_follows_the_global_batch_on_every_rank(tmp_path):
    """Mean max-probability over the global batch is 0.65 > 0.5: both ranks raise T, though rank 1's shard alone
    (0.4) would not."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "temperature")
    mp.spawn(_temperature_after_one_batch, args=(port, out), nprocs=2)
    assert [float(torch.load(f"{out}.{r}")) for r in (0, 1)] == [1.05, 1.05]


def launch(root: Path, processes: int, script: str, *args: str) -> str:
    """Run ``script with fast <args>`` (under torchrun for 2 processes); the uid of the run it recorded."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, script, "-F", str(root / "runs"), "with", "fast", "train.latency_batch=0",
                           f"train.snapshot_root={root / 'snapshots'}", *args], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(line.split(" run ")[1].split()[0] for line in done.stdout.splitlines() if " run " in line
                and "snapshots in" in line)


@pytest.mark.parametrize("script, first, second", [
    ("experiments/imta.py", ("stage=ge",), ("stage=imta",)),
    ("experiments/jei.py", ("stage=transfer",), ("stage=dynn", "ce_ic_tradeoff=0.5")),
])
def test_two_stage_chains_with_a_ddp_stage(tmp_path, script, first, second):
    """IMTA's stage 1 under torchrun, stage 2 in one process; JEI the other way round (its phases leave exits
    out of some steps, which DDP must allow)."""
    key = "ge_run" if "imta" in script else "backbone_run"
    ddp_first = "imta" in script
    parent = launch(tmp_path, 2 if ddp_first else 1, script, *first)
    child = launch(tmp_path, 1 if ddp_first else 2, script, *second, f"{key}={parent}")
    info = json.loads(next(p / "info.json" for p in (tmp_path / "runs").iterdir()
                           if (p / "info.json").is_file() and child in (p / "info.json").read_text()).read_text())
    assert info["parent"]["uid"] == parent and (Path(info["snapshot_dir"]) / "exit_record.npz").is_file()
