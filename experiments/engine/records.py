"""Write the end-of-run exit record and the per-exit summary a dashboard shows as columns."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from analysis.exit_record import FILENAME, NPZ, ExitRecord
from experiments.engine.trainer import Trainer
from models.cost import count_exit_costs, measure_exit_latency


def build_exit_record(
    trainer: Trainer, val_loader: Iterable | None, test_loader: Iterable, input_shape: tuple[int, int, int],
    latency_batch: int = 64,
) -> ExitRecord:
    """Per-exit logits on validation and test, cumulative MACs/params and measured latency."""
    test_logits, test_targets = trainer.predict(test_loader)
    if val_loader is not None:
        val_logits, val_targets = trainer.predict(val_loader)
    else:  # no validation split: an empty one keeps the format (budgeted curves then need val data)
        val_logits, val_targets = test_logits[:, :0], test_targets[:0]
    cost = count_exit_costs(trainer.model, input_shape)
    latency = measure_exit_latency(trainer.model, input_shape, batch_size=latency_batch) if latency_batch else None
    k = trainer.model.num_exits
    return ExitRecord(
        val_logits=val_logits.numpy(),
        val_targets=val_targets.numpy(),
        test_logits=test_logits.numpy(),
        test_targets=test_targets.numpy(),
        macs=np.asarray(cost.macs, dtype=np.int64),
        params=np.asarray(cost.params, dtype=np.int64),
        latency_ms=np.full(k, np.nan) if latency is None else latency,
        meta={"device": str(trainer.device), "latency_batch": str(latency_batch), "amp": trainer.amp},
    )


def exit_summary(record: ExitRecord) -> dict[str, Any]:
    """Flat per-exit figures for ``_run.info`` (Omniboard shows them as columns)."""
    summary: dict[str, Any] = {}
    test_acc = record.accuracy("test")
    val_acc = record.accuracy("val") if len(record.val_targets) else np.full(record.num_exits, np.nan)
    for k in range(record.num_exits):
        summary[f"test_acc_exit{k + 1}"] = round(float(test_acc[k]), 5)
        summary[f"val_acc_exit{k + 1}"] = round(float(val_acc[k]), 5)
        summary[f"mmacs_exit{k + 1}"] = round(float(record.macs[k]) / 1e6, 3)
    summary["test_acc_mean"] = round(float(test_acc.mean()), 5)
    summary["params_total"] = int(record.params[-1])
    return summary


def attach_exit_record(run: Any, record: ExitRecord, folder) -> ExitRecord:
    """Save the record next to the snapshots and add it to the run as the artifact ``exit_record.npz``."""
    path = record.save(folder / FILENAME)
    if run is not None:
        run.add_artifact(str(path), name=FILENAME, content_type=NPZ)
        run.info["exits"] = exit_summary(record)
    return record
