"""experiments/engine/: the training loop learns, schedules by hand, snapshots (atomic, weights-only, found by
id or path), and a resumed run continues exactly where an interrupted one stopped."""
from __future__ import annotations

import json
import math
import os
import pickle
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.exit_record import ExitRecord
from data import TensorLoader
from experiments.engine.checkpoint import load_snapshot, resolve_snapshot, save_atomic, snapshot_dir
from experiments.engine.pipeline import run_folder
from experiments.engine.schedules import build_scheduler, lr_factor
from experiments.engine.trainer import Trainer
from losses import ExitCrossEntropy
from models import create_model

CPU = torch.device("cpu")


class FixedBatches:
    """A loader that yields the same batches every epoch."""

    def __init__(self, *batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def make_trainer(model, loader, val=None, epochs=10, lr=0.1, schedule="constant", **kw) -> Trainer:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = build_scheduler(optimizer, epochs, len(loader), schedule)
    kw.setdefault("select", "last" if val is None else "best_val")
    return Trainer(model, ExitCrossEntropy(), optimizer, scheduler, loader, val, CPU, progress=False, **kw)


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


def test_resolve_snapshot_by_path_folder_and_run_id(tmp_path):
    root = tmp_path / "snapshots"
    run7 = snapshot_dir("exp", 7, root)
    assert run7 == root / "exp" / "7"
    save_atomic({"epoch": 1}, run7 / "last.pt")
    # a file path, as given
    assert resolve_snapshot(str(run7 / "last.pt"), "exp", root) == run7 / "last.pt"
    # a run folder, or a run id: best.pt wanted, last.pt as fallback
    assert resolve_snapshot(str(run7), "exp", root) == run7 / "last.pt"
    assert resolve_snapshot(7, "exp", root) == run7 / "last.pt"
    assert resolve_snapshot("7", "exp", root) == run7 / "last.pt"
    save_atomic({"epoch": 1}, run7 / "best.pt")
    assert resolve_snapshot(7, "exp", root) == run7 / "best.pt"
    assert resolve_snapshot(7, "exp", root, name="last.pt") == run7 / "last.pt"


def test_resolve_snapshot_errors_say_what_was_tried(tmp_path):
    root = tmp_path / "snapshots"
    save_atomic({"epoch": 1}, snapshot_dir("exp", 3, root) / "last.pt")
    save_atomic({"epoch": 1}, snapshot_dir("exp", 12, root) / "last.pt")
    with pytest.raises(FileNotFoundError) as err:
        resolve_snapshot(99, "exp", root)
    message = str(err.value)
    assert "99" in message
    assert str(Path("99")) in message and str(root / "exp" / "99") in message  # both places tried
    assert ": 12, 3." in message or ": 3, 12." in message  # the runs that do have snapshots
    with pytest.raises(FileNotFoundError) as err:
        resolve_snapshot(1, "other", root)
    assert "Runs with snapshots" not in str(err.value)
    for empty in (None, ""):
        with pytest.raises(ValueError, match="run id or a snapshot path"):
            resolve_snapshot(empty, "exp", root)


def test_unobserved_runs_never_share_a_snapshot_folder(tmp_path):
    # runs without an observer have no id; two of them started within the same second must not overwrite
    # each other's snapshots
    unobserved = SimpleNamespace(_id=None)
    first = run_folder(unobserved, "exp", str(tmp_path))
    second = run_folder(unobserved, "exp", str(tmp_path))
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.startswith("local-") and second.name.startswith("local-")
    assert run_folder(SimpleNamespace(_id=4), "exp", str(tmp_path)) == tmp_path / "exp" / "4"


def test_a_reused_run_id_moves_the_older_snapshots_aside(tmp_path):
    # a new runs folder restarts ids at 1: the older run's snapshots must survive, the id names the new run
    old = run_folder(SimpleNamespace(_id=1), "exp", str(tmp_path))
    (old / "best.pt").write_bytes(b"older run")
    with pytest.warns(UserWarning, match="older run with the same id"):
        new = run_folder(SimpleNamespace(_id=1), "exp", str(tmp_path))
    assert new == old and not any(new.iterdir())
    (aside,) = [p for p in (tmp_path / "exp").iterdir() if p.name.startswith("1.replaced-")]
    assert (aside / "best.pt").read_bytes() == b"older run"


# ------------------------------------------------------------------------------------------- resume (Trainer)
def _tiny_classification(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return FixedBatches((x[:12], y[:12]), (x[12:], y[12:])), FixedBatches((x[:8], y[:8]))


def test_resumed_run_restores_the_best_epoch_saved_before_the_interruption(tmp_path, monkeypatch):
    """select='best_val': when no epoch after the resume beats the best epoch before it, the selected
    weights are those of the earlier epoch (kept in the interrupted run's folder), as in a straight run."""
    scores = {1: 0.9, 2: 0.5}  # epoch 1 is the best on validation

    def fake_evaluate(self, loader, prefix):
        return {f"{prefix}.acc.mean": scores[self.epoch], f"{prefix}.acc.exit3": scores[self.epoch]}

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
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
    """Cross-entropy that sends this process SIGINT after optimisation step ``step`` (a Ctrl-C mid-epoch)."""

    def __init__(self, step: int):
        super().__init__()
        self.step, self.calls = step, 0

    def after_batch(self, outputs):
        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), signal.SIGINT)


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
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(2)
    saved = load_snapshot(tmp_path / "interrupted" / "last.pt")
    assert saved["epoch"] == 1 and saved["train_loader"]["batches_done"] == 2 and saved["scheduler"]["last_epoch"] == 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored after fit
    resumed = build(99, ExitCrossEntropy(), "resumed")
    resumed.resume(tmp_path / "interrupted" / "last.pt")
    resumed.fit(2)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)


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

    run.snapshots = snapshots / "multiexit_distillation"
    return run


def _assert_same_training(run_a, run_b, folder: Path) -> None:
    last_a = load_snapshot(folder / str(run_a._id) / "last.pt")
    last_b = load_snapshot(folder / str(run_b._id) / "last.pt")
    assert last_a["epoch"] == last_b["epoch"] == 2
    for name, value in last_a["model"].items():
        torch.testing.assert_close(last_b["model"][name], value, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(last_b["loss"]["temperature"], last_a["loss"]["temperature"])
    assert last_b["best_epoch"] == last_a["best_epoch"]
    assert last_b["train_loader"]["batches_done"] == last_a["train_loader"]["batches_done"]
    assert torch.equal(last_b["train_loader"]["generator"], last_a["train_loader"]["generator"])
    rec_a = ExitRecord.load(folder / str(run_a._id) / "exit_record.npz")
    rec_b = ExitRecord.load(folder / str(run_b._id) / "exit_record.npz")
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
        resumed = experiment({"epochs": 2, "resume": str(experiment.snapshots / str(first._id) / "last.pt")}, **knobs)
    assert straight.status == first.status == resumed.status == "COMPLETED"
    assert _metrics(straight)["train.temperature"]["values"][-1] > 1.0  # the temperature did move
    _assert_same_training(straight, resumed, experiment.snapshots)


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
    killed_id = max(int(p.name) for p in experiment.snapshots.iterdir())
    assert load_snapshot(experiment.snapshots / str(killed_id) / "last.pt")["epoch"] == 1
    resumed = experiment({"epochs": 2, "resume": killed_id}, max_prob=0.2)  # by run id
    assert resumed.status == "COMPLETED"
    _assert_same_training(straight, resumed, experiment.snapshots)
