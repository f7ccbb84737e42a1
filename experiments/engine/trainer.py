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
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from experiments.engine.checkpoint import load_snapshot, save_atomic
from experiments.engine.hardware import autocast, grad_scaler, to_memory_format
from losses.base import MultiExitLoss
from models.multiexit import MultiExitNetwork

SELECT_MODES = ("best_val", "last")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(Exception):
    """Raised at a step boundary after SIGINT/SIGTERM, so the state saved there resumes exactly."""


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
            'last' keeps the final weights.
        meta: plain data stored in every snapshot (model config, split, ...) so a later stage can
            rebuild the network without the original run.
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
    ):
        if select not in SELECT_MODES:
            raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
        if select == "best_val" and val_loader is None:
            raise ValueError("select='best_val' needs a validation split (data.val_size > 0); or use select='last'")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format)
        self.loss_fn = loss_fn.to(device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
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

        The interrupted run's ``best.pt`` (next to ``last.pt``) comes along into this run's snapshot folder,
        so ``select='best_val'`` still finds the best epoch reached before the interruption.
        """
        path = Path(path)
        self.load_state_dict(load_snapshot(path, map_location=self.device))
        best, mine = path.parent / "best.pt", (self.snapshot_dir / "best.pt" if self.snapshot_dir else None)
        if self.select == "best_val" and mine is not None and best.is_file() and best.resolve() != mine.resolve():
            snapshot = load_snapshot(best, map_location="cpu")
            if snapshot.get("epoch") == self.best_epoch:
                save_atomic(snapshot, mine)

    # ------------------------------------------------------------------------------- training
    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            for name, value in metrics.items():
                self.run.log_scalar(name, value, step)

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        self.loss_fn.train()
        n_exits = self.model.num_exits
        correct = torch.zeros(n_exits, device=self.device)
        loss_sum, seen, start = 0.0, 0, time.perf_counter()
        # disable=None: bars only on an interactive terminal, never in log files.
        batches = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}", leave=False,
                       disable=None if self.progress else True)
        for x, y in batches:
            x = to_memory_format(x, self.channels_last)
            with autocast(self.device, self.amp):
                outputs = self.model(x)
                loss = self.loss_fn(outputs, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at epoch {self.epoch + 1}; try a lower optim.lr or amp='off'"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.loss_fn.after_batch(outputs)
            with torch.no_grad():
                correct += torch.stack([(z.argmax(1) == y).sum() for z in outputs])
            loss_sum += loss.item() * len(y)
            seen += len(y)
            if self.stop_signal is not None:
                raise StopRequested
        elapsed = time.perf_counter() - start
        metrics = {"train.loss": loss_sum / max(seen, 1), "train.images_per_sec": seen / max(elapsed, 1e-9)}
        metrics.update({f"train.acc.exit{k + 1}": (c / max(seen, 1)).item() for k, c in enumerate(correct)})
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics.update({f"train.{k}": v for k, v in self.loss_fn.extra_metrics().items()})
        return metrics

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
        return metrics

    @contextlib.contextmanager
    def _stop_at_step_boundary(self):
        """While training, SIGINT/SIGTERM only ask the loop to stop after the current step (a second
        SIGINT stops at once); the loop then saves ``last.pt`` mid-epoch and raises KeyboardInterrupt."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

        def request_stop(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
        with self._stop_at_step_boundary():
            while self.epoch < epochs:
                try:
                    metrics = self.train_epoch()
                except StopRequested:
                    self._stop(save=True)
                history.append(self._end_epoch(metrics, epochs))
                if self.stop_signal is not None:  # arrived during validation: last.pt already holds this epoch
                    self._stop(save=False)
        return history

    def _stop(self, save: bool) -> None:
        if save and self.snapshot_dir is not None:
            save_atomic(self.state_dict(), self.snapshot_dir / "last.pt")
        where = f"train.resume={self.snapshot_dir / 'last.pt'}" if self.snapshot_dir else "no snapshot folder"
        print(f"stopped by signal {self.stop_signal} after {self.epoch} full epochs; resume exactly with {where}",
              flush=True)
        raise KeyboardInterrupt(f"stopped by signal {self.stop_signal}") from None

    def _end_epoch(self, metrics: dict[str, float], epochs: int) -> EpochResult:
        """Validate, log, checkpoint and report one finished epoch."""
        self.epoch += 1
        if self.val_loader is not None:
            metrics.update(self.evaluate(self.val_loader, "val"))
        self._log(metrics, self.epoch)
        self._checkpoint(metrics)
        print(self._summary_line(metrics, epochs), flush=True)
        return EpochResult(self.epoch, metrics)

    def _summary_line(self, metrics: dict[str, float], epochs: int) -> str:
        accs = " ".join(f"{metrics[f'val.acc.exit{k + 1}']:.3f}" for k in range(self.model.num_exits) if f"val.acc.exit{k + 1}" in metrics)
        return (
            f"epoch {self.epoch}/{epochs} loss {metrics['train.loss']:.4f} "
            f"{metrics['train.images_per_sec']:.0f} img/s lr {metrics['lr']:.4g}"
            + (f" val acc per exit [{accs}]" if accs else "")
        )

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        score = metrics.get("val.acc.mean", -math.inf)
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, self.epoch
        if self.snapshot_dir is None:
            return
        save_atomic(self.state_dict(), self.snapshot_dir / "last.pt")
        if improved and self.select == "best_val":
            self.save_weights(self.snapshot_dir / "best.pt")

    def save_weights(self, path: str | Path) -> Path:
        """A light snapshot for later stages: weights, epoch, score and ``meta``."""
        return save_atomic(
            {"model": self.model.state_dict(), "epoch": self.epoch, "val_score": self.best_score, "meta": self.meta},
            path,
        )

    def restore_selected(self) -> int:
        """Load the weights chosen by ``select``; returns their epoch."""
        if self.select == "best_val" and self.snapshot_dir and (self.snapshot_dir / "best.pt").is_file():
            self.model.load_state_dict(load_snapshot(self.snapshot_dir / "best.pt", self.device)["model"])
            return self.best_epoch
        return self.epoch

