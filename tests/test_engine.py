"""experiments/engine/: the training loop learns, schedules by hand, snapshots (atomic, weights-only, found by
id or path), and a resumed run continues exactly where an interrupted one stopped."""
from __future__ import annotations

import json
import math
import os
import pickle
import pty
import re
import select
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.exit_record import ExitRecord
from data import TensorLoader
from experiments.engine import trainer as trainer_module
from experiments.engine.checkpoint import load_snapshot, save_atomic
from experiments.engine.console import captured_out_filter, format_duration
from experiments.engine.pipeline import run_folder
from experiments.engine.schedules import build_scheduler, lr_factor
from experiments.engine.trainer import Trainer, interruptible
from losses import ExitCrossEntropy, PhuongDistillationLoss
from models import create_model

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


class FixedBatches:
    """A loader that yields the same batches every epoch."""

    def __init__(self, *batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def make_trainer(model, loader, val=None, epochs=10, lr=0.1, schedule="constant", loss=None, **kw) -> Trainer:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = build_scheduler(optimizer, epochs, len(loader), schedule)
    kw.setdefault("select", "last" if val is None else "best_val")
    return Trainer(model, loss or ExitCrossEntropy(), optimizer, scheduler, loader, val, CPU, progress=False, **kw)


# ------------------------------------------------------------------------------------------- learning
def test_tiny_resnet_overfits_a_tiny_batch(capsys):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    y = torch.arange(16) % 4
    model = create_model("resnet8", num_classes=4, width=4)
    trainer = make_trainer(model, FixedBatches((x, y)), epochs=100, lr=0.05)
    history = trainer.fit(100)
    assert len(history) == 100 and trainer.epoch == 100
    first, last = history[0].metrics, history[-1].metrics
    assert last["train.acc.exit3"] == 1.0
    assert last["train.loss"] < 0.5 * first["train.loss"]
    assert "epoch 100/100" in capsys.readouterr().out
    # and in eval mode (running BatchNorm statistics) the last exit still fits the batch
    logits, targets = trainer.predict([(x, y)])
    assert logits.shape == (3, 16, 4)
    assert (logits[-1].argmax(-1) == targets).float().mean() >= 0.9


def test_trainer_rejects_bad_selection_settings():
    model = create_model("resnet8", num_classes=4, width=4)
    batch = (torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="select must be one of"):
        make_trainer(model, FixedBatches(batch), select="best")
    with pytest.raises(ValueError, match="needs a validation split"):
        make_trainer(model, FixedBatches(batch), select="best_val")


def test_distillation_also_logs_the_plain_exit_cross_entropy():
    """train.ce is the unscaled sum of exit cross-entropies (lr=0: the batch sees the same weights throughout)."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    model = create_model("resnet8", num_classes=3, width=4)
    expected = sum(F.cross_entropy(z, y) for z in model.train()(x)).item()
    trainer = make_trainer(model, FixedBatches((x, y)), lr=0.0, loss=PhuongDistillationLoss(n_exits=3))
    (epoch,) = trainer.fit(1)
    assert epoch.metrics["train.ce"] == pytest.approx(expected, rel=1e-5)
    assert epoch.metrics["train.loss"] != pytest.approx(expected)  # the objective itself is scaled and mixed


def test_non_finite_loss_stops_with_a_hint():
    model = create_model("resnet8", num_classes=4, width=4)
    x = torch.full((4, 3, 8, 8), float("nan"))
    trainer = make_trainer(model, FixedBatches((x, torch.tensor([0, 1, 2, 3]))))
    with pytest.raises(FloatingPointError, match="optim.lr"):
        trainer.fit(1)


# ------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    "epoch, expected",
    [(0, 1.0), (1.99, 1.0), (2, 0.1), (3.5, 0.1), (4, 0.01), (9, 0.01)],
)
def test_multistep_factor_by_hand(epoch, expected):
    assert lr_factor(epoch, 10, "multistep", milestones=[2, 4], gamma=0.1) == pytest.approx(expected)


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0, 1.0),
        (2.5, (1 + math.sqrt(0.5)) / 2),  # 0.5 (1 + cos(pi/4))
        (5, 0.5),
        (7.5, (1 - math.sqrt(0.5)) / 2),
        (10, 0.0),
        (12, 0.0),  # past the end: stays at 0
    ],
)
def test_cosine_factor_by_hand(epoch, expected):
    assert lr_factor(epoch, 10, "cosine") == pytest.approx(expected, abs=1e-12)


def test_warmup_constant_and_unknown_schedule():
    assert lr_factor(1, 10, "multistep", milestones=[5], warmup_epochs=2) == pytest.approx(0.5)
    assert lr_factor(2, 10, "multistep", milestones=[5], warmup_epochs=2) == 1.0
    assert lr_factor(0.5, 10, "cosine", warmup_epochs=1) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert lr_factor(123, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, 10, "step")
    with pytest.raises(ValueError, match="schedule must be one of"):
        build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 10, 4, "linear")


def test_scheduler_is_per_iteration_and_resumes_exactly():
    def make():
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
        return opt, build_scheduler(opt, epochs=4, iters_per_epoch=5, schedule="cosine")

    opt, sched = make()
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * (i / 5) / 4)) for i in range(12)])
    # a fresh scheduler loaded from a state dict taken after 7 steps continues identically
    opt2, sched2 = make()
    opt_ref, sched_ref = make()
    for _ in range(7):
        opt_ref.step()
        sched_ref.step()
    opt2.load_state_dict(opt_ref.state_dict())
    sched2.load_state_dict(sched_ref.state_dict())
    for _ in range(5):
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt_ref.param_groups[0]["lr"])
        for opt_, sched_ in ((opt2, sched2), (opt_ref, sched_ref)):
            opt_.step()
            sched_.step()


def test_multistep_scheduler_drops_at_the_milestone_iteration():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = build_scheduler(opt, epochs=3, iters_per_epoch=4, schedule="multistep", milestones=[1, 2], gamma=0.5)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0] * 4 + [0.5] * 4 + [0.25] * 4


# ------------------------------------------------------------------------------------------- snapshots
class NotAWeight:
    """An arbitrary Python object: a weights-only load must refuse it."""

    def __init__(self):
        self.value = 3


def test_save_atomic_load_snapshot_round_trip(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "best": 0.5, "meta": {"a": [1, "x", None]},
           "rng": torch.get_rng_state()}
    path = save_atomic(obj, tmp_path / "deep" / "folder" / "last.pt")
    assert path == tmp_path / "deep" / "folder" / "last.pt"
    back = load_snapshot(path)
    torch.testing.assert_close(back["model"]["w"], obj["model"]["w"])
    assert back["epoch"] == 3 and back["best"] == 0.5 and back["meta"] == {"a": [1, "x", None]}
    assert torch.equal(back["rng"], obj["rng"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_snapshot_with_a_python_object_does_not_load(tmp_path):
    path = save_atomic({"model": {}, "extra": NotAWeight()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_snapshot(path)
    with pytest.raises(FileNotFoundError, match="No snapshot at"):
        load_snapshot(tmp_path / "missing.pt")


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = save_atomic({"epoch": 1}, tmp_path / "last.pt")
    with pytest.raises(Exception):
        save_atomic({"epoch": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    assert load_snapshot(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_every_run_gets_a_new_snapshot_folder_named_by_its_uid(tmp_path):
    # no two runs ever share (or move) a folder: with a uid it is the uid's, without one a fresh uid's
    named = run_folder(SimpleNamespace(meta_info={"uid": "20260101-000000-abcdef"}), "exp", str(tmp_path))
    assert named == (tmp_path / "exp" / "20260101-000000-abcdef").resolve() and named.is_dir()
    with pytest.raises(FileExistsError):
        run_folder(SimpleNamespace(meta_info={"uid": "20260101-000000-abcdef"}), "exp", str(tmp_path))
    first, second = (run_folder(None, "exp", str(tmp_path)) for _ in range(2))
    assert first != second and first.is_dir() and second.is_dir() and first.is_absolute()


# ------------------------------------------------------------------------------------------- resume (Trainer)
def _tiny_classification(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return FixedBatches((x[:12], y[:12]), (x[12:], y[12:])), FixedBatches((x[:8], y[:8]))


def _scores_by_epoch(monkeypatch, scores: dict[int, float]) -> None:
    """Validation reports ``scores[epoch]`` as the mean accuracy, so the test decides which epoch is best."""
    monkeypatch.setattr(Trainer, "evaluate", lambda self, loader, prefix: {f"{prefix}.acc.mean": scores[self.epoch]})


def test_resumed_run_restores_the_best_epoch_saved_before_the_interruption(tmp_path, monkeypatch):
    """select='best_val': when no epoch after the resume beats the best epoch before it, the selected
    weights are those of the earlier epoch (kept in the interrupted run's folder), as in a straight run."""
    _scores_by_epoch(monkeypatch, {1: 0.9, 2: 0.5})  # epoch 1 is the best on validation
    train, val = _tiny_classification()

    torch.manual_seed(0)
    first = make_trainer(create_model("resnet8", num_classes=3, width=4), train, val, epochs=2,
                         snapshot_dir=tmp_path / "run1")
    first.fit(1)
    epoch1 = {k: v.clone() for k, v in first.model.state_dict().items()}

    torch.manual_seed(123)  # a different init: everything must come from the snapshot
    second = make_trainer(create_model("resnet8", num_classes=3, width=4), train, val, epochs=2,
                          snapshot_dir=tmp_path / "run2")
    second.resume(tmp_path / "run1" / "last.pt")
    assert second.epoch == 1 and second.best_epoch == 1 and second.best_score == 0.9
    with pytest.warns(UserWarning, match="planned for 1 epochs"):
        second.fit(2)
    assert second.epoch == 2
    assert second.restore_selected() == 1
    for name, value in second.model.state_dict().items():
        torch.testing.assert_close(value, epoch1[name], rtol=0, atol=0, msg=name)
    assert load_snapshot(tmp_path / "run2" / "best.pt")["epoch"] == 1


def test_trainer_resume_matches_a_straight_run(tmp_path):
    """Trainer level: 2 epochs straight == 1 epoch, snapshot, fresh objects, resume, 1 more epoch."""
    train, val = _tiny_classification(1)

    def build(seed):
        torch.manual_seed(seed)
        return make_trainer(create_model("resnet8", num_classes=3, width=4), train, val, epochs=2,
                            schedule="cosine", snapshot_dir=tmp_path / f"run{seed}")

    straight = build(0)
    straight.fit(2)
    interrupted = build(0)
    interrupted.fit(1)
    resumed = build(99)
    resumed.resume(tmp_path / "run0" / "last.pt")
    with pytest.warns(UserWarning, match="planned for 1 epochs with epochs=2"):
        resumed.fit(2)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch == 4


class SignalAtStep(ExitCrossEntropy):
    """Cross-entropy that sends this process ``signum`` after optimisation step ``step`` (a Ctrl-C mid-epoch)."""

    def __init__(self, step: int, signum: int = signal.SIGINT):
        super().__init__()
        self.step, self.signum, self.calls = step, signum, 0

    def after_batch(self, outputs):
        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), self.signum)


def test_a_signal_stops_at_a_step_boundary_and_the_run_resumes_exactly(tmp_path):
    """Ctrl-C in the middle of epoch 2 saves last.pt at that step; resuming gives the straight run's weights."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(24) % 3

    def build(seed, loss, folder):
        torch.manual_seed(seed)
        loader = TensorLoader(images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=4, shuffle=True, pad=1, flip=True,
                              seed=7)
        model = create_model("resnet8", num_classes=3, width=4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = build_scheduler(optimizer, 2, len(loader), "cosine")
        return Trainer(model, loss, optimizer, scheduler, loader, None, CPU, select="last", progress=False,
                       snapshot_dir=tmp_path / folder)

    straight = build(0, ExitCrossEntropy(), "straight")
    straight.fit(2)
    interrupted = build(0, SignalAtStep(8), "interrupted")  # 6 steps per epoch: step 8 is inside epoch 2
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a background job
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(2)
    saved = load_snapshot(tmp_path / "interrupted" / "last.pt")
    assert saved["epoch"] == 1 and saved["train_loader"]["batches_done"] == 2 and saved["scheduler"]["last_epoch"] == 8
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored after fit
    resumed = build(99, ExitCrossEntropy(), "resumed")
    resumed.resume(tmp_path / "interrupted" / "last.pt")
    resumed.fit(2)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("same_folder", [False, True])
@pytest.mark.parametrize("writes_before_kill", [0, 1])
def test_a_kill_while_checkpointing_resumes_to_the_same_selection(tmp_path, monkeypatch, writes_before_kill,
                                                                  same_folder):
    """Epoch 2 is the best and epoch 3 is not. A kill before epoch 2's snapshots, or between its best.pt and
    last.pt, must still end with epoch 2's weights selected, bit for bit as in a run never killed."""
    _scores_by_epoch(monkeypatch, {1: 0.5, 2: 0.9, 3: 0.7})
    train, val = _tiny_classification(2)

    def build(seed, folder):
        torch.manual_seed(seed)
        return make_trainer(create_model("resnet8", num_classes=3, width=4), train, val, epochs=3,
                            snapshot_dir=tmp_path / folder)

    straight = build(0, "straight")
    straight.fit(3)
    assert straight.restore_selected() == 2
    save = trainer_module.save_atomic
    writes = []

    def killed_in_epoch_two(obj, path):
        if obj["epoch"] == 2:
            if len(writes) == writes_before_kill:
                raise KeyboardInterrupt("simulated kill")
            writes.append(path)
        return save(obj, path)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "save_atomic", killed_in_epoch_two)
        with pytest.raises(KeyboardInterrupt):
            build(0, "killed").fit(3)
    resumed = build(99, "killed" if same_folder else "resumed")
    resumed.resume(tmp_path / "killed" / "last.pt")
    resumed.fit(3)
    assert resumed.restore_selected() == 2 and resumed.best_epoch == 2
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_best_val_selection_refuses_to_fall_back_to_the_last_weights(tmp_path, monkeypatch):
    _scores_by_epoch(monkeypatch, {1: 0.9, 2: 0.5})
    train, val = _tiny_classification()
    trainer = make_trainer(create_model("resnet8", num_classes=3, width=4), train, val, snapshot_dir=tmp_path / "run")
    trainer.fit(2)
    (tmp_path / "run" / "best.pt").unlink()
    with pytest.raises(RuntimeError, match="chose epoch 1, but there is no .*best.pt"):
        trainer.restore_selected()
    fresh = make_trainer(create_model("resnet8", num_classes=3, width=4), train, val, snapshot_dir=tmp_path / "new")
    with pytest.warns(UserWarning, match="should hold epoch 1 .* is missing"):
        fresh.resume(tmp_path / "run" / "last.pt")
    trainer.save_weights(tmp_path / "run" / "best.pt")  # epoch 2's weights under the best's name
    with pytest.raises(RuntimeError, match="holds epoch 2"):
        trainer.restore_selected()


# ------------------------------------------------------------------------------------------- signals and console
def test_interruptible_turns_sigterm_into_keyboard_interrupt(tmp_path):
    """Inside, SIGTERM raises KeyboardInterrupt (sacred then records INTERRUPTED), and fit still stops at a
    step boundary with a mid-epoch last.pt; outside, the previous handler is back."""
    before = signal.getsignal(signal.SIGTERM)
    train, _ = _tiny_classification()
    trainer = make_trainer(create_model("resnet8", num_classes=3, width=4), train, loss=SignalAtStep(1, signal.SIGTERM),
                           snapshot_dir=tmp_path)
    with interruptible():
        outer = signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            trainer.fit(1)
        assert load_snapshot(tmp_path / "last.pt")["epoch"] == 0  # saved by fit's own handler at step 1
        assert signal.getsignal(signal.SIGTERM) is outer
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)  # as if during the final evaluation
    assert signal.getsignal(signal.SIGTERM) is before


def test_sacred_records_a_sigterm_inside_interruptible_as_interrupted():
    from sacred import Experiment

    ex = Experiment("sigterm", interactive=True)

    @ex.main
    def main():
        with interruptible():
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        ex.run(options={"--loglevel": "ERROR"})
    assert ex.current_run.status == "INTERRUPTED"


def test_console_helpers():
    assert [format_duration(s) for s in (12.34, 333, 7500)] == ["12.3s", "5m33s", "2h05m"]
    assert captured_out_filter("epoch 1:  50%\repoch 1: 100%\ndone\n") == "epoch 1: 100%\ndone\n"


# A tiny sacred run whose trainer wants a progress bar; argv: runs folder, sacred capture mode.
PROGRESS_SCRIPT = """
import sys, time
import torch
from sacred import Experiment
from sacred.observers import FileStorageObserver
from experiments.engine.schedules import build_scheduler
from experiments.engine.trainer import Trainer
from losses import ExitCrossEntropy
from models import create_model


class SlowBatches:
    \"\"\"Three 0.3 s batches: an epoch outlasts the 0.5 s the bar waits before it draws.\"\"\"

    def __len__(self):
        return 3

    def __iter__(self):
        for _ in range(3):
            time.sleep(0.3)
            yield torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])


ex = Experiment("progress")
ex.observers.append(FileStorageObserver(sys.argv[1]))


@ex.main
def main():
    torch.set_num_threads(1)
    model = create_model("resnet8", num_classes=3, width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, 2, 3, "constant")
    trainer = Trainer(model, ExitCrossEntropy(), optimizer, scheduler, SlowBatches(), None, torch.device("cpu"),
                      select="last", progress=True)
    trainer.fit(2)


ex.run(options={"--capture": sys.argv[2], "--loglevel": "ERROR"})
"""


def _progress_run(tmp_path: Path, capture: str, terminal: bool) -> tuple[str, str]:
    """Run PROGRESS_SCRIPT with stdout and stderr on a pseudo-terminal or on a pipe; returns (what the person
    sees, what sacred captured)."""
    script = tmp_path / "progress.py"
    script.write_text(PROGRESS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(script), str(tmp_path / "runs"), capture]
    if terminal:
        shown = _on_a_terminal(cmd, env)
    else:
        done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        shown = done.stdout + done.stderr
    return shown, (tmp_path / "runs" / "1" / "cout.txt").read_text()


def _on_a_terminal(cmd: list[str], env: dict) -> str:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    try:
        while select.select([controller], [], [], 120)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    shown = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, shown
    return shown


@pytest.mark.parametrize("capture", ["fd", "sys"])
def test_progress_bar_reaches_the_terminal_but_not_the_recorded_output(tmp_path, capture):
    shown, recorded = _progress_run(tmp_path, capture, terminal=True)
    assert "it/s" in shown and "%|" in shown
    assert "epoch 1/2" in recorded  # (not 2/2: sacred's fd capture may read the file before tee writes its end)
    assert "\r" not in recorded and "it/s" not in recorded


def test_without_a_terminal_there_is_no_bar_and_the_summary_tells_the_time(tmp_path):
    shown, recorded = _progress_run(tmp_path, "fd", terminal=False)
    assert "\r" not in shown and "\r" not in recorded
    assert re.search(r"epoch 1/2 .* \d+\.\ds, ~\d+\.\ds left\n", shown)
    assert re.search(r"epoch 2/2 .* \d+\.\ds\n", shown)


# ------------------------------------------------------------------------------------------- resume (experiment)
@pytest.fixture
def experiment(tmp_path, monkeypatch):
    """The Phuong & Lampert experiment, observed into a temporary FileStorageObserver folder."""
    from sacred.observers import FileStorageObserver

    from experiments.multiexit_distillation import ex

    monkeypatch.setattr(ex, "observers", [FileStorageObserver(str(tmp_path / "runs"))])
    snapshots = tmp_path / "snapshots"

    def run(train=None, **updates):
        train = {"snapshot_root": str(snapshots), **(train or {})}
        return ex.run(named_configs=["fast"], config_updates={"train": train, "seed": 5, **updates},
                      options={"--loglevel": "ERROR"})

    run.ex = ex
    return run


def _assert_same_training(run_a, run_b) -> None:
    folder_a, folder_b = Path(run_a.info["snapshot_dir"]), Path(run_b.info["snapshot_dir"])
    last_a = load_snapshot(folder_a / "last.pt")
    last_b = load_snapshot(folder_b / "last.pt")
    assert last_a["epoch"] == last_b["epoch"] == 2
    for name, value in last_a["model"].items():
        torch.testing.assert_close(last_b["model"][name], value, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(last_b["loss"]["temperature"], last_a["loss"]["temperature"])
    assert last_b["best_epoch"] == last_a["best_epoch"]
    assert last_b["train_loader"]["batches_done"] == last_a["train_loader"]["batches_done"]
    assert torch.equal(last_b["train_loader"]["generator"], last_a["train_loader"]["generator"])
    rec_a = ExitRecord.load(folder_a / "exit_record.npz")
    rec_b = ExitRecord.load(folder_b / "exit_record.npz")
    np.testing.assert_allclose(rec_b.test_logits, rec_a.test_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rec_b.val_logits, rec_a.val_logits, rtol=1e-5, atol=1e-6)
    assert run_b.result["selected_epoch"] == run_a.result["selected_epoch"]
    assert run_b.result["test_acc"] == run_a.result["test_acc"]
    # the epoch-2 metrics logged by the resumed run equal the straight run's
    metrics_a = _metrics(run_a)
    metrics_b = _metrics(run_b)
    for name in ("train.loss", "train.temperature", "lr", "val.acc.mean", "val.acc.exit1"):
        assert metrics_b[name]["steps"] == [2]
        assert metrics_b[name]["values"][-1] == pytest.approx(metrics_a[name]["values"][-1], rel=1e-5)


def _metrics(run) -> dict:
    """metrics.json of a run observed by the ``experiment`` fixture's FileStorageObserver."""
    observer = run.observers[0]
    return json.loads((Path(observer.basedir) / str(run._id) / "metrics.json").read_text())


def test_resume_after_a_finished_shorter_run_matches_a_straight_run(experiment):
    """1 epoch, then a second run resuming it with epochs=2, against 2 epochs straight (same seed).

    The multistep schedule does not depend on the number of epochs, so the first run's epoch is the straight
    run's first epoch; max_prob=0.2 makes Phuong's adaptive temperature grow, so it must be restored too.
    """
    knobs = {"optim": {"schedule": "multistep", "milestones": [1], "lr": 0.05}, "max_prob": 0.2}
    straight = experiment({"epochs": 2}, **knobs)
    first = experiment({"epochs": 1}, **knobs)
    with pytest.warns(UserWarning, match="planned for 1 epochs"):  # harmless here: multistep ignores it
        resumed = experiment({"epochs": 2, "resume": str(Path(first.info["snapshot_dir"]) / "last.pt")}, **knobs)
    assert straight.status == first.status == resumed.status == "COMPLETED"
    assert _metrics(straight)["train.temperature"]["values"][-1] > 1.0  # the temperature did move
    _assert_same_training(straight, resumed)


def test_resume_after_an_interruption_matches_a_straight_run(experiment, monkeypatch):
    """The fast config (cosine over 2 epochs) killed after epoch 1, resumed by run id, == 2 epochs straight."""
    straight = experiment({"epochs": 2}, max_prob=0.2)
    original = Trainer.train_epoch

    def killed_in_epoch_two(self):
        if self.epoch >= 1:
            raise KeyboardInterrupt("simulated kill")
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", killed_in_epoch_two)
        with pytest.raises(KeyboardInterrupt):
            experiment({"epochs": 2}, max_prob=0.2)
    killed = experiment.ex.current_run
    assert load_snapshot(Path(killed.info["snapshot_dir"]) / "last.pt")["epoch"] == 1
    resumed = experiment({"epochs": 2, "resume": int(killed._id)}, max_prob=0.2)  # by run id, in its runs folder
    assert resumed.info["resumed_from"]["uid"] == killed.info["uid"]
    assert resumed.status == "COMPLETED"
    _assert_same_training(straight, resumed)


def test_a_non_finite_loss_between_checks_is_caught_at_the_epoch_end_naming_it(monkeypatch):
    """Finiteness is summed on the device and read every FINITE_CHECK_EVERY steps and at the epoch end: a NaN
    in the last, unchecked steps of an epoch is still reported, with its epoch."""
    from experiments.engine import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "FINITE_CHECK_EVERY", 1000)
    good = (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    bad = (torch.full((4, 3, 8, 8), float("nan")), torch.tensor([0, 1, 2, 3]))
    model = create_model("resnet8", num_classes=4, width=4)
    trainer = make_trainer(model, FixedBatches(good, good, bad))
    with pytest.raises(FloatingPointError, match="in epoch 1, by step 3"):
        trainer.fit(1)


def test_compiled_training_steps_and_reports_its_first_step_once(capsys):
    """train.compile: the model's forward is compiled in place (same state-dict keys), trains, and computes what
    the eager forward computes; the first step's time (compilation) is printed once."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    model = create_model("resnet8", num_classes=4, width=2, image_size=8)
    keys = list(model.state_dict())
    trainer = make_trainer(model, FixedBatches((x, y), (x, y)), epochs=2, lr=0.05, compile="default")
    history = trainer.fit(2)
    assert list(model.state_dict()) == keys
    assert model._compiled_call_impl is not None  # what nn.Module.compile installs: the forward really is compiled
    assert history[-1].metrics["train.loss"] < history[0].metrics["train.loss"]
    assert capsys.readouterr().out.count("torch.compile: the first training step took") == 1
    model.eval()
    with torch.no_grad():
        for compiled, eager in zip(model(x), model.forward(x)):  # forward() bypasses the compiled call
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_compile_modes_are_checked_before_training():
    model = create_model("resnet8", num_classes=4, width=2)
    batches = FixedBatches((torch.randn(2, 3, 8, 8), torch.arange(2)))
    with pytest.raises(ValueError, match="reduce-overhead.*CUDA"):
        make_trainer(model, batches, compile="reduce-overhead")
    with pytest.raises(ValueError, match="compile must be one of"):
        make_trainer(model, batches, compile="fast")
