"""The shared body of every experiment: train a multi-exit model, keep snapshots, write the record."""
from __future__ import annotations

import itertools
import json
import time
import warnings
from pathlib import Path
from typing import Any

from data import DataBundle, save_split
from experiments.engine.checkpoint import resolve_snapshot, snapshot_dir
from experiments.engine.records import attach_exit_record, build_exit_record
from experiments.engine.trainer import Trainer
from experiments.ingredients.optim import build_lr_scheduler, build_optimizer
from losses.base import MultiExitLoss
from models.multiexit import MultiExitNetwork


def plain(config: Any) -> Any:
    """Sacred's read-only config containers as plain JSON data (safe for ``weights_only`` loading)."""
    return json.loads(json.dumps(config))


def run_folder(run: Any, experiment: str, root: str) -> Path:
    """``<root>/<experiment>/<run id>/``; runs without an observer get a new timestamped folder instead.

    Run ids restart when a runs folder (or database) is new, so an existing folder of the same id
    belongs to an older run: it is renamed aside, never overwritten, and the id keeps naming this run.
    """
    run_id = getattr(run, "_id", None)
    if run_id not in (None, ""):
        folder = snapshot_dir(experiment, run_id, root)
        if folder.is_dir() and any(folder.iterdir()):
            aside = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            warnings.warn(f"{folder} held snapshots of an older run with the same id; moved them to {aside}")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    # Unobserved runs started within the same second must not share (and overwrite) one folder.
    stamp = time.strftime("local-%Y%m%d-%H%M%S")
    for n in itertools.count():
        folder = snapshot_dir(experiment, stamp if n == 0 else f"{stamp}-{n}", root)
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:
            continue


def fit_and_record(
    run: Any,
    experiment: str,
    model: MultiExitNetwork,
    loss_fn: MultiExitLoss,
    data: DataBundle,
    optim: dict,
    train: dict,
    device,
    variant: str,
    meta: dict,
) -> dict[str, Any]:
    """Train, select on validation, evaluate once on test, and leave the exit record as an artifact.

    ``meta`` (plain data: model config, data config, parent run, ...) goes into every snapshot so a
    later stage can rebuild the network. Returns the per-exit summary also put in ``run.info``.
    """
    folder = run_folder(run, experiment, train["snapshot_root"])
    split_path = save_split(data.split, folder / "split.npz")
    meta = plain({**meta, "split_file": str(split_path), "variant": variant})
    if run is not None:
        run.info["variant"] = variant
        run.info["snapshot_dir"] = str(folder)
        run.add_artifact(str(split_path), name="split.npz")
    optimizer = build_optimizer(optim, model.parameters())
    scheduler = build_lr_scheduler(optim, optimizer, train["epochs"], len(data.train))
    trainer = Trainer(
        model, loss_fn, optimizer, scheduler, data.train, data.val, device, amp=train["amp"],
        channels_last=train["channels_last"], run=run, snapshot_dir=folder,
        select=train["select"] if data.val is not None else "last", meta=meta, progress=train["progress"],
    )
    if train["resume"]:
        trainer.resume(resolve_snapshot(train["resume"], experiment, train["snapshot_root"], name="last.pt"))
        print(f"resumed from epoch {trainer.epoch}", flush=True)
    trainer.fit(train["epochs"])
    chosen = trainer.restore_selected()
    trainer.save_weights(folder / "final.pt")
    record = build_exit_record(trainer, data.val, data.test, data.input_shape(), train["latency_batch"])
    attach_exit_record(run, record, folder)
    summary = {"selected_epoch": chosen, "test_acc": record.accuracy("test").round(5).tolist(),
               "mmacs": (record.macs / 1e6).round(3).tolist()}
    print(f"{experiment} [{variant}] epoch {chosen}: test acc per exit {summary['test_acc']}", flush=True)
    return summary
