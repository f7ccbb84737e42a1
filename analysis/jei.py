"""JEI-DNN's evaluation of a trained run, and its trade-off curve across runs.

A ``stage=dynn`` run's gates are a function of its exits' logits, so everything here is computed from its exit
record and its gates: the exit each sample takes, gated accuracy, expected MACs, per-exit exit rates and
accuracies, calibration, conformal sets, and the max-probability threshold baseline of the same exits at the
same cost (``analysis.budgeted``: thresholds fitted on validation). Each ``ce_ic_tradeoff`` is one run; the
runs' ``info.jei`` summaries make the trade-off curve (``trade_off_points``, ``plots.plot_trade_off``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from analysis.budgeted import accuracy_at_budget, budgeted_curve
from analysis.calibration import ece, ece_per_batch
from analysis.chunked import running_chunk_mean
from analysis.conformal import conformal_table
from analysis.exit_record import ExitRecord
from models.jei import GatedExits

JEI_FILE = "jei.json"
PREFIX = "info.jei."  # the runs table's flattened columns of each run's ``info.jei`` summary
GROUP = ("experiment", "info.jei.backbone", "config.data.name")  # one trade-off line: seeds and lambdas pooled


def exits_taken(net: GatedExits, logits: np.ndarray) -> np.ndarray:
    """The exit each sample takes [N] under the gates, from exit logits [K, N, C]."""
    device = next(net.gates.parameters()).device
    exits = [torch.from_numpy(z).to(device) for z in logits[:-1]]
    return net.exits_taken(exits).cpu().numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(logits).double().softmax(-1).numpy()


def per_exit(taken: np.ndarray, correct: np.ndarray) -> tuple[list[float], list[float | None]]:
    """Fraction of samples leaving at each exit, and the accuracy of those samples (None where none leave)."""
    k, n = correct.shape
    rates = np.bincount(taken, minlength=k) / n
    accs = [float(correct[j, taken == j].mean()) if (taken == j).any() else None for j in range(k)]
    return rates.round(5).tolist(), [None if a is None else round(a, 5) for a in accs]


def threshold_curve(record: ExitRecord, exit_correct: np.ndarray) -> pd.DataFrame:
    """Max-probability thresholds fitted on validation (``analysis.budgeted``), with the two thresholds that need
    no fit at its ends: everyone at the first exit, everyone at the last (the p grid reaches neither)."""
    ends = pd.DataFrame({"cost_macs": record.macs[[0, -1]].astype(np.float64),
                         "accuracy": exit_correct[[0, -1]].mean(axis=1)})
    return pd.concat([budgeted_curve(record)[["cost_macs", "accuracy"]], ends], ignore_index=True)


def jei_report(net: GatedExits, record: ExitRecord, costs: np.ndarray, tradeoff: float, backbone: str,
               alphas: Sequence[float], ece_bins: int = 15, chunks: int = 10, ece_batch: int = 100) -> dict:
    """Every figure of one run: ``summary`` (flat, for ``run.info``), the per-exit lists and the conformal table.

    ``costs`` are the normalised exit costs the gate targets used (C_final = 1); MACs are the record's;
    ``backbone`` names the trade-off line the run belongs to (its backbone run's variant).
    """
    val_taken, taken = exits_taken(net, record.val_logits), exits_taken(net, record.test_logits)
    test_probs, val_probs = _softmax(record.test_logits), _softmax(record.val_logits)
    n = len(taken)
    gated = test_probs[taken, np.arange(n)]
    correct = gated.argmax(1) == record.test_targets
    macs = float(record.macs[taken].mean())
    exit_correct = record.test_logits.argmax(-1) == record.test_targets[None]
    baseline = accuracy_at_budget(threshold_curve(record, exit_correct), macs)
    rates, accs = per_exit(taken, exit_correct)
    confidence = gated.max(1)
    summary = {
        "tradeoff": tradeoff,
        "backbone": backbone,
        "accuracy": round(float(correct.mean()), 5),
        "accuracy_released": round(running_chunk_mean(correct.astype(np.float64), chunks), 5),
        "mmacs": round(macs / 1e6, 4),
        "macs_ratio": round(macs / float(record.macs[-1]), 5),
        "cost_normalised": round(float(costs[taken].mean()), 5),
        "threshold_accuracy": None if np.isnan(baseline) else round(float(baseline), 5),
        "ece": round(ece(confidence, correct, ece_bins), 5),
        "ece_per_batch": round(ece_per_batch(confidence, correct, ece_batch, ece_bins), 5),
        "val_accuracy": round(float((val_probs[val_taken, np.arange(len(val_taken))].argmax(1)
                                     == record.val_targets).mean()), 5),
    }
    table = conformal_table(val_probs, val_taken, record.val_targets, test_probs, taken, record.test_targets,
                            alphas=alphas)
    return {"summary": summary, "exit_rates": rates, "exit_accuracy": accs,
            "exit_accuracy_all": exit_correct.mean(1).round(5).tolist(),
            "normalised_costs": np.asarray(costs).round(5).tolist(), "mmacs_per_exit": (record.macs / 1e6).tolist(),
            "conformal": table.round(5).to_dict(orient="records")}


def has_jei(runs: pd.DataFrame) -> pd.Series:
    """Which runs recorded JEI's summary."""
    column = PREFIX + "accuracy"
    return runs[column].notna() if column in runs.columns else pd.Series(False, index=runs.index)


def trade_off_points(runs: pd.DataFrame, group_by: Sequence[str] = GROUP) -> pd.DataFrame:
    """Mean and std over runs (the seeds) of JEI's and the threshold baseline's test accuracy and cost, per line
    (``group_by``: not the variant, which names the trade-off) and trade-off, sorted by cost."""
    frame = runs[has_jei(runs)].rename(columns=lambda c: c[len(PREFIX):] if c.startswith(PREFIX) else c)
    group = [c[len(PREFIX):] if c.startswith(PREFIX) else c for c in group_by]
    stats = frame.groupby([*group, "tradeoff"], dropna=False).agg(
        accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
        threshold_mean=("threshold_accuracy", "mean"), threshold_std=("threshold_accuracy", "std"),
        macs_ratio_mean=("macs_ratio", "mean"), macs_ratio_std=("macs_ratio", "std"),
        mmacs_mean=("mmacs", "mean"), n_runs=("run_id", "nunique"))
    return stats.reset_index().sort_values([*group, "macs_ratio_mean"]).reset_index(drop=True)
