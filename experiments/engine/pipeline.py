"""The shared body of every experiment: train a multi-exit model, keep snapshots, write the record."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

from analysis.exit_record import NPZ
from analysis.recipes import recipe_key
from data import DataBundle, save_split
from experiments.engine import distributed
from experiments.engine.checkpoint import snapshot_dir
from experiments.engine.records import attach_exit_record, build_exit_record
from experiments.engine.trainer import Trainer
from experiments.identity import new_uid
from experiments.ingredients.optim import build_lr_scheduler, build_optimizer
from losses.base import MultiExitLoss
from models.multiexit import MultiExitNetwork


def plain(config: Any) -> Any:
    """Sacred's read-only config containers as plain JSON data (safe for ``weights_only`` loading)."""
    return json.loads(json.dumps(config))


def run_folder(run: Any, experiment: str, root: str) -> Path:
    """``<root>/<experiment>/<uid>/``, new for every run (a run without a uid gets a fresh one); made by rank 0
    alone under torchrun, the other ranks only name it."""
    uid = (getattr(run, "meta_info", None) or {}).get("uid") or new_uid()
    folder = snapshot_dir(experiment, uid, root)
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=False)
    return folder


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """What a number depends on beyond the config: library versions, the device, the threads."""
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.machine()}, {os.cpu_count()} cores)")
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "cuda": torch.version.cuda, "device": name, "threads": threads}


def set_threads(threads: int | None) -> int:
    """torch's intra-op threads: ``threads``, or what this process may use (CPU affinity, ``OMP_NUM_THREADS``)."""
    if threads is None:
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = min(allowed, int(os.environ.get("OMP_NUM_THREADS") or allowed))
    torch.set_num_threads(threads)
    return threads


def selection(select: str, data: DataBundle) -> str:
    """``best_val`` falls back to the last weights without a validation split; selecting on test says so."""
    if select == "lowest_test_loss":
        print("selecting checkpoints on the TEST set (lowest test loss), as the released code did: "
              "the test accuracies of this run are optimistic", flush=True)
    return "last" if select == "best_val" and data.val is None else select


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
    lr_multiplier: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Train, select on validation, evaluate once on test, and leave the exit record as an artifact.

    ``meta`` (plain data: model config, data config, parent run, ...) goes into every snapshot so a
    later stage can rebuild the network. ``lr_multiplier``, if given, replaces ``optim``'s schedule: the base lr
    times what it returns at every step (a schedule that follows the objective's state, as JEI's does).
    Returns the per-exit summary also put in ``run.info``.
    """
    threads = set_threads(train["threads"])
    resumed = run.info.get("resumed_from") if run is not None else None  # resolved and checked before the run
    folder = run_folder(run, experiment, train["snapshot_root"])
    main = distributed.is_main()  # under torchrun only rank 0 writes; the others train their shards
    split_path = save_split(data.split, folder / "split.npz") if main else folder / "split.npz"
    uid = folder.name
    config = plain(run.config) if run is not None else {}
    recipe = recipe_key(config, (meta.get("parent") or {}).get("recipe"))
    meta = plain({**meta, "uid": uid, "config": config, "recipe": recipe, "split_file": str(split_path),
                  "variant": variant})
    if main:
        print(f"{experiment} run {uid} [{variant}, recipe {recipe}]: snapshots in {folder}", flush=True)
    if run is not None:
        run.info.update(variant=variant, recipe=recipe, snapshot_dir=str(folder),
                        environment={**environment(device, threads), "processes": distributed.world_size()})
        if main:
            run.add_artifact(str(split_path), name="split.npz", content_type=NPZ)
    # an objective's own trainable parts (a FitNets regressor, CRD's embeddings) train with the model
    optimizer = build_optimizer(optim, [*model.parameters(), *loss_fn.parameters()])
    scheduler = (build_lr_scheduler(optim, optimizer, train["epochs"], len(data.train)) if lr_multiplier is None
                 else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier()))
    trainer = Trainer(
        model, loss_fn, optimizer, scheduler, data.train, data.val, device, amp=train["amp"],
        channels_last=train["channels_last"], run=run, snapshot_dir=folder if main else None,
        select=selection(train["select"], data), meta=meta, progress=train["progress"] and main,
        test_loader=data.test, sync_bn=train["sync_bn"], compile=train["compile"],
    )
    if resumed is not None:
        trainer.resume(resumed["snapshot"])
        print(f"resumed {resumed['uid'] or resumed['snapshot']} from epoch {trainer.epoch}", flush=True)
    trainer.fit(train["epochs"])
    if not main:
        return {"rank": distributed.rank()}
    chosen = trainer.restore_selected()
    trainer.save_weights(folder / "final.pt")
    record = build_exit_record(trainer, data.val, data.test, data.input_shape(), train["latency_batch"])
    attach_exit_record(run, record, folder)
    summary = {"selected_epoch": chosen, "test_acc": record.accuracy("test").round(5).tolist(),
               "mmacs": (record.macs / 1e6).round(3).tolist()}
    print(f"{experiment} [{variant}] epoch {chosen}: test acc per exit {summary['test_acc']}", flush=True)
    return summary
