"""The one training loop every experiment uses.

A ``Trainer`` owns all training state (model, optimiser, scheduler, loss scaler, the objective's own
state such as Phuong's temperature, the training loader's shuffling generator, torch's RNG, the epoch
and the best validation score), so a snapshot saves and restores a run as a whole and a resumed run
continues exactly where it stopped. Checkpoints are chosen on the validation split only.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from experiments.engine import distributed
from experiments.engine.checkpoint import load_snapshot, save_atomic
from experiments.engine.console import TERMINAL, TERMINAL_STREAM, format_duration
from experiments.engine.hardware import autocast, grad_scaler, to_memory_format
from models.cost import synchronize
from losses.base import MultiExitLoss
from models.multiexit import MultiExitNetwork

SELECT_MODES = ("best_val", "last", "lowest_test_loss")
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# steps between checks that the training loss is finite: each check waits for the device
FINITE_CHECK_EVERY = 50
# under torchrun, steps between the all-reduces that agree on a stop request (each waits for the device)
STOP_SYNC_EVERY = 10

class StopRequested(Exception):
    """Raised at a step boundary after SIGINT/SIGTERM, so the state saved there resumes exactly."""


@contextlib.contextmanager
def _handling(signals: tuple[int, ...], handler: Callable) -> Iterator[None]:
    """Install ``handler`` for ``signals`` and put the previous handlers back afterwards (main thread only:
    Python delivers signals there and refuses ``signal.signal`` elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def interruptible() -> contextlib.AbstractContextManager:
    """SIGTERM raises KeyboardInterrupt while the context is open, as Ctrl-C (SIGINT) already does.

    A scheduler's SIGTERM otherwise kills Python outright (rc 143) and the sacred run stays RUNNING forever;
    as a KeyboardInterrupt it unwinds through sacred, which records the run INTERRUPTED. Wrap an experiment's
    whole run, so the final evaluation (test predictions, latency) is covered too: ``TrackedExperiment.run``
    does.

    ``Trainer.fit`` still stops at a step boundary (and saves a mid-epoch ``last.pt``) inside it.
    """
    return _handling((signal.SIGTERM,), _interrupt)


class TrainStep(nn.Module):
    """The model and its objective as one module: under ``DistributedDataParallel`` every trained parameter, an
    objective's own included (a FitNets regressor, CRD's embeddings), takes part in the forward, so DDP averages
    all their gradients across ranks."""

    def __init__(self, model: MultiExitNetwork, loss_fn: MultiExitLoss):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = self.model(x)
        return self.loss_fn(outputs, y), outputs


def compile_in_place(model: nn.Module, mode: str, device: torch.device) -> None:
    """``torch.compile`` the model's forward (``nn.Module.compile``: state-dict keys and staged execution are left as
    they are); ``reduce-overhead`` records CUDA graphs, so it needs CUDA."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError("compile='reduce-overhead' records CUDA graphs and needs a CUDA device; use 'default'")
    if mode != "off":
        model.compile(mode=mode)


def parallel(step: TrainStep, device: torch.device, sync_bn: bool) -> nn.Module:
    """``step`` under DDP when torchrun started several processes (BatchNorm per rank unless ``sync_bn``), else
    itself. Exits a step leaves out (a frozen teacher's, one phase of JEI) are allowed: find_unused_parameters."""
    if not distributed.active():
        return step
    if sync_bn:
        step.model = nn.SyncBatchNorm.convert_sync_batchnorm(step.model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)


@dataclass
class EpochResult:
    """Per-epoch metrics, keyed as they are logged (``val.acc.exit1``, ``train.loss``, ...)."""

    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Train a multi-exit model with an objective; log every exit; keep last/best snapshots.

    Args:
        model: the network; only parameters in ``optimizer`` are updated.
        loss_fn: a ``MultiExitLoss`` mapping the list of exit logits and labels to a scalar.
        optimizer, scheduler: the scheduler is stepped after every optimisation step.
        train_loader, val_loader: iterables of (x, y) already on ``device``; ``val_loader`` may be None.
        device, amp, channels_last: where and how to compute (see ``engine.hardware``).
        run: the sacred ``_run`` (or None) that receives ``log_scalar`` calls.
        snapshot_dir: folder for ``last.pt`` (every epoch) and ``best.pt`` (on improvement).
        select: 'best_val' keeps the weights with the best mean-over-exits validation top-1;
            'last' keeps the final weights; 'lowest_test_loss' keeps those with the lowest summed test CE,
            evaluated every epoch on ``test_loader`` (only to reproduce released code that did so: DIH's).
        meta: plain data stored in every snapshot (model config, split, ...) so a later stage can
            rebuild the network without the original run.
        progress: a bar per epoch, shown only when the process started on a terminal (``engine.console``).
        sync_bn: under torchrun, BatchNorm statistics over the global batch rather than each rank's shard.
        compile: ``torch.compile`` mode of the model's forward (``COMPILE_MODES``); the first step's time, mostly
            compilation, is printed once (inductor caches compiled kernels on disk for later runs).

    Under torchrun (``engine.distributed``) every rank trains its shard of each global batch through DDP, the
    epoch's metrics are summed over ranks, every rank validates the whole split (so objectives that read
    validation stay identical), and a stop request stops all ranks at the same step. Pass ``snapshot_dir``
    only on rank 0: it alone writes.
    """

    def __init__(
        self,
        model: MultiExitNetwork,
        loss_fn: MultiExitLoss,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: Iterable,
        val_loader: Iterable | None,
        device: torch.device,
        amp: str = "off",
        channels_last: bool = False,
        run: Any = None,
        snapshot_dir: str | Path | None = None,
        select: str = "best_val",
        meta: dict | None = None,
        progress: bool = True,
        test_loader: Iterable | None = None,
        sync_bn: bool = False,
        compile: str = "off",
    ):
        if select not in SELECT_MODES:
            raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
        if select == "best_val" and val_loader is None:
            raise ValueError("select='best_val' needs a validation split (data.val_size > 0); or use select='last'")
        if select == "lowest_test_loss" and test_loader is None:
            raise ValueError("select='lowest_test_loss' needs the test loader")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format)
        self.loss_fn = loss_fn.to(device)
        compile_in_place(self.model, compile, device)
        self.compile_to_time = compile != "off"  # the first step's time is reported once
        self.step = parallel(TrainStep(self.model, self.loss_fn), device, sync_bn)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.test_loader = test_loader
        self.device = device
        self.amp = amp
        self.channels_last = channels_last
        self.scaler = grad_scaler(device, amp)
        self.run = run
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.select = select
        self.meta = meta or {}
        self.progress = progress
        self.epoch = 0  # epochs completed
        self.best_score = -math.inf
        self.best_epoch = -1
        self.stop_signal: int | None = None  # set by SIGINT/SIGTERM while ``fit`` runs
        self.planned_epochs: int | None = None  # the ``epochs`` of ``fit``, kept to check a resume against

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "planned_epochs": self.planned_epochs,
            "torch_rng": torch.get_rng_state(),
            "meta": self.meta,
        }
        if hasattr(self.train_loader, "state_dict"):
            state["train_loader"] = self.train_loader.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["loss"])
        self.epoch = state["epoch"]
        self.best_score = state["best_score"]
        self.best_epoch = state["best_epoch"]
        self.planned_epochs = state.get("planned_epochs")
        torch.set_rng_state(state["torch_rng"].cpu())
        if "train_loader" in state and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["train_loader"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)

    def resume(self, path: str | Path) -> None:
        """Continue from a ``last.pt`` written by an interrupted run.

        The interrupted run's ``best.pt`` (next to ``last.pt``) comes along into this run's snapshot folder
        when it holds ``last.pt``'s best epoch, so ``select='best_val'`` still finds the best epoch reached
        before the interruption. A ``best.pt`` of a later epoch (a kill between the two writes of
        ``_checkpoint``) is left behind: that epoch is trained again and writes it again.
        """
        path = Path(path)
        self.load_state_dict(load_snapshot(path, map_location=self.device))
        if self.select != "last" and self.snapshot_dir is not None and self.best_epoch >= 1:
            self._adopt_best(path.parent / "best.pt", self.snapshot_dir / "best.pt")

    def _adopt_best(self, theirs: Path, mine: Path) -> None:
        """Copy the interrupted run's ``best.pt`` when it holds the best epoch; warn when those weights are lost."""
        best = load_snapshot(theirs) if theirs.is_file() else None
        held = best["epoch"] if best else None
        if held == self.best_epoch:
            if theirs.resolve() != mine.resolve():
                save_atomic(best, mine)
        elif held is None or held < self.best_epoch:
            found = f"holds epoch {held}" if best else "is missing"
            warnings.warn(f"{theirs} should hold epoch {self.best_epoch} (the best on validation so far) but {found}: "
                          "unless a later epoch does better, select='best_val' fails at the end; or use select='last'")

    # ------------------------------------------------------------------------------- training
    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            for name, value in metrics.items():
                self.run.log_scalar(name, value, step)

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        self.loss_fn.train()
        self.loss_fn.start_epoch(self.epoch)
        n_exits = self.model.num_exits
        correct = torch.zeros(n_exits, device=self.device)
        # summed and checked on the device: the host waits for it every FINITE_CHECK_EVERY steps, not every step
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        seen, step, start = 0, 0, time.perf_counter()
        for step, batch in enumerate(self._progress_bar(self.train_loader), 1):
            x, y = distributed.shard(batch)
            x = to_memory_format(x, self.channels_last)
            with autocast(self.device, self.amp):
                loss, outputs = self.step(x, y)
            finite &= torch.isfinite(loss.detach())
            if step % FINITE_CHECK_EVERY == 0:
                self._check_finite(finite, step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.compile_to_time:
                self._report_compile(start)
            self.loss_fn.after_batch(outputs)
            with torch.no_grad():
                correct += torch.stack([(z.argmax(1) == y).sum() for z in outputs])
            loss_sum += loss.detach().double() * len(y)
            seen += len(y)
            if self._stop_requested(step):
                self._check_finite(finite, step)  # never save a state that a non-finite loss has stepped into
                raise StopRequested
        self._check_finite(finite, step)
        elapsed = time.perf_counter() - start
        totals = distributed.all_sum(torch.cat([correct.double(), loss_sum[None], torch.tensor([float(seen)],
                                                                                             device=self.device)]))
        correct, loss_sum, seen = totals[:n_exits], totals[n_exits], int(totals[-1])
        metrics = {"train.loss": loss_sum.item() / max(seen, 1), "train.images_per_sec": seen / max(elapsed, 1e-9),
                   "train.samples": seen}
        metrics.update({f"train.acc.exit{k + 1}": (c / max(seen, 1)).item() for k, c in enumerate(correct)})
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics.update({f"train.{k}": v for k, v in self.loss_fn.extra_metrics().items()})
        return metrics

    def _report_compile(self, start: float) -> None:
        """One line with the time since ``start`` of the first compiled step, once the device has finished it (most
        of it is compilation)."""
        synchronize(self.device)
        seconds = time.perf_counter() - start
        self.compile_to_time = False
        if distributed.is_main():
            print(f"torch.compile: the first training step took {seconds:.1f} s (compilation; evaluation compiles "
                  "once more)", flush=True)

    def _stop_requested(self, step: int = 0) -> bool:
        """A signal arrived. Under torchrun the ranks agree every STOP_SYNC_EVERY steps (and at ``step`` 0, the
        epoch's end), so all stop at the same step without a host sync at every one."""
        if not distributed.active():
            return self.stop_signal is not None
        return step % STOP_SYNC_EVERY == 0 and distributed.any_rank(self.stop_signal is not None, self.device)

    def _check_finite(self, finite: torch.Tensor, step: int) -> None:
        """A clear error once a training loss has been NaN or infinite (the one host sync of this check), on every
        rank when it happened on one."""
        if distributed.any_rank(not bool(finite), self.device):
            raise FloatingPointError(f"the training loss became NaN or infinite in epoch {self.epoch + 1}, by step "
                                     f"{step}; try a lower optim.lr or amp='off'")

    def _progress_bar(self, batches: Iterable) -> Iterable:
        """A bar on the terminal the process started on (``engine.console``), never in sacred's captured output.

        ``delay`` keeps a bar from drawing before the previous epoch's summary line (which reaches the terminal
        through sacred's tee) has been written, and hides the bar of epochs shorter than half a second.
        """
        return tqdm(batches, desc=f"epoch {self.epoch + 1}", leave=False, file=TERMINAL_STREAM, delay=0.5,
                    disable=not (self.progress and TERMINAL))

    @torch.no_grad()
    def predict(self, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of every exit [K, N, C] (float32, CPU) and the targets [N]."""
        self.model.eval()
        outs, targets = [], []
        for x, y in loader:
            with autocast(self.device, self.amp):
                logits = self.model(to_memory_format(x, self.channels_last))
            outs.append(torch.stack([z.float() for z in logits]).cpu())
            targets.append(y.cpu())
        return torch.cat(outs, dim=1), torch.cat(targets)

    def evaluate(self, loader: Iterable, prefix: str) -> dict[str, float]:
        """Per-exit top-1 accuracy, their mean, and the summed per-exit cross-entropy."""
        logits, targets = self.predict(loader)
        acc = (logits.argmax(-1) == targets).float().mean(dim=1)
        loss = sum(F.cross_entropy(z, targets).item() for z in logits)
        metrics = {f"{prefix}.acc.exit{k + 1}": a.item() for k, a in enumerate(acc)}
        metrics[f"{prefix}.acc.mean"] = acc.mean().item()
        metrics[f"{prefix}.loss"] = loss
        metrics.update(self.loss_fn.evaluation_metrics(logits, targets, prefix))
        return metrics

    def _stop_at_step_boundary(self) -> contextlib.AbstractContextManager:
        """While training, SIGINT/SIGTERM only ask the loop to stop after the current step (a second
        SIGINT stops at once); the loop then saves ``last.pt`` mid-epoch and raises KeyboardInterrupt."""

        def request_stop(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum

        return _handling(STOP_SIGNALS, request_stop)

    def fit(self, epochs: int) -> list[EpochResult]:
        """Train until ``epochs`` epochs are done (continuing after ``resume``).

        An interruption (Ctrl-C, or SIGTERM from a scheduler) is honoured at the next step boundary:
        ``last.pt`` then holds the state within the epoch, and ``train.resume`` continues from the very next
        batch (that epoch's training metrics cover only the batches after the resume).
        """
        if self.planned_epochs not in (None, epochs):
            warnings.warn(f"resuming a run planned for {self.planned_epochs} epochs with epochs={epochs}: "
                          "epoch-based schedules (cosine, warmup) change from here on")
        self.planned_epochs = epochs
        history = []
        started = time.perf_counter()
        with self._stop_at_step_boundary():
            while self.epoch < epochs:
                epoch_started = time.perf_counter()
                try:
                    metrics = self.train_epoch()
                except StopRequested:
                    self._stop(save=True)
                history.append(self._end_epoch(metrics))
                now = time.perf_counter()
                if distributed.is_main():
                    print(self._summary_line(metrics, epochs, now - epoch_started, (now - started) / len(history)),
                          flush=True)
                if self._stop_requested():  # arrived during validation: last.pt already holds this epoch
                    self._stop(save=False)
        return history

    def _stop(self, save: bool) -> None:
        if save and self.snapshot_dir is not None:
            save_atomic(self.state_dict(), self.snapshot_dir / "last.pt")
        where = f"train.resume={self.snapshot_dir / 'last.pt'}" if self.snapshot_dir else "no snapshot folder"
        name = signal.Signals(self.stop_signal or signal.SIGTERM).name  # another rank's signal
        print(f"stopped by signal {name} after {self.epoch} full epochs; resume exactly with {where}", flush=True)
        raise KeyboardInterrupt(f"stopped by signal {name}") from None

    def _end_epoch(self, metrics: dict[str, float]) -> EpochResult:
        """Validate, log and checkpoint one finished epoch."""
        self.epoch += 1
        distributed.share_buffers(self.model)
        if self.val_loader is not None:
            metrics.update(self.evaluate(self.val_loader, "val"))
        if self.select == "lowest_test_loss":
            metrics.update(self.evaluate(self.test_loader, "test"))
        self.loss_fn.end_epoch(metrics)
        self._log(metrics, self.epoch)
        self._checkpoint(metrics)
        return EpochResult(self.epoch, metrics)

    def _summary_line(self, metrics: dict[str, float], epochs: int, seconds: float, mean_seconds: float) -> str:
        """One line per epoch; the time left assumes the coming epochs take as long as this call's so far."""
        accs = " ".join(f"{metrics[f'val.acc.exit{k + 1}']:.3f}" for k in range(self.model.num_exits) if f"val.acc.exit{k + 1}" in metrics)
        left = epochs - self.epoch
        return (
            f"epoch {self.epoch}/{epochs} loss {metrics['train.loss']:.4f} "
            f"{metrics['train.images_per_sec']:.0f} img/s lr {metrics['lr']:.4g}"
            + (f" val acc per exit [{accs}]" if accs else "")
            + f" {format_duration(seconds)}" + (f", ~{format_duration(left * mean_seconds)} left" if left else "")
        )

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        """``best.pt`` before ``last.pt``: a kill between the two leaves a ``best.pt`` one epoch ahead of
        ``last.pt``, which ``resume`` ignores because that epoch is trained again and rewrites it."""
        score = -metrics["test.loss"] if self.select == "lowest_test_loss" else self.loss_fn.selection_score(metrics)
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, self.epoch
        if self.snapshot_dir is None:
            return
        if improved and self.select != "last":
            self.save_weights(self.snapshot_dir / "best.pt")
        save_atomic(self.state_dict(), self.snapshot_dir / "last.pt")

    def save_weights(self, path: str | Path) -> Path:
        """A light snapshot for later stages: weights, epoch, score and ``meta``."""
        return save_atomic(
            {"model": self.model.state_dict(), "epoch": self.epoch, "val_score": self.best_score, "meta": self.meta},
            path,
        )

    def restore_selected(self) -> int:
        """Load the weights chosen by ``select``; returns their epoch.

        With ``select='best_val'`` the weights come from ``best.pt``, which must hold the best epoch: any
        other epoch, or no file, is an error rather than a quiet fall-back to the last weights.
        """
        if self.select == "last" or self.best_epoch == self.epoch:  # the weights in memory are the selected ones
            return self.epoch
        path = self.snapshot_dir / "best.pt" if self.snapshot_dir else None
        best = load_snapshot(path, self.device) if path and path.is_file() else None
        if best is None or best["epoch"] != self.best_epoch:
            found = f"{path} holds epoch {best['epoch']}" if best else f"there is no {path or 'snapshot_dir'}"
            raise RuntimeError(f"select={self.select!r} chose epoch {self.best_epoch}, but {found}; "
                               "its weights are lost: train again, or use select='last'")
        self.model.load_state_dict(best["model"])
        return self.best_epoch

