"""Curves across runs: per-run anytime and budgeted curves, then mean/std/count over seeds per group.

A group is a tuple of run-table columns, by default ``(experiment, variant, recipe)``; the runs of one group
are the seeds of one recipe of one method. Standard deviations are sample standard deviations (ddof=1) over runs, NaN for a
single run. Accuracies are fractions; costs are MACs, as in the exit records. A run whose exit record is
missing or corrupt, or has no validation split to fit budgeted thresholds on, is left out of both curves
with a :class:`analysis.runs.SkippedRunWarning` and listed in :attr:`Curves.skipped`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from analysis.anytime import anytime_curve
from analysis.budgeted import DEFAULT_PS, Confidence, accuracy_at_budget, budgeted_curve
from analysis.exit_record import ExitRecord
from analysis.recipes import NO_DIFFERENCE
from analysis.runs import AnalysisError, load_exit_record, warn_skipped

DEFAULT_GROUP = ("experiment", "variant", "recipe")
_RUN_KEYS = ("run_id", "experiment", "variant", "seed")
SKIPPED_COLUMNS = ["run_id", "uid", "reason"]


@dataclass
class Curves:
    """Per-run curves (long tables, one block per run), their per-group aggregates, and the runs left out."""

    group_by: tuple[str, ...]
    anytime_runs: pd.DataFrame
    budgeted_runs: pd.DataFrame
    anytime: pd.DataFrame
    budgeted: pd.DataFrame
    skipped: pd.DataFrame  # SKIPPED_COLUMNS: run_id, uid, reason


def _prepare(runs: pd.DataFrame, group_by: Sequence[str]) -> pd.DataFrame:
    missing = [c for c in group_by if c not in runs.columns]
    if missing:
        raise AnalysisError(f"cannot group by {missing}: not columns of the runs table")
    runs = runs.copy()
    for c in group_by:
        # groupby would silently drop runs whose key is missing (e.g. a run without info['variant'])
        runs[c] = runs[c].astype(object).where(runs[c].notna(), "(none)")
    return runs


def _run_curves(record: ExitRecord, tag: dict, ps: np.ndarray,
                confidence: Confidence) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(anytime, budgeted) of one record; ValueError when it cannot give both (e.g. no validation split)."""
    budgeted = budgeted_curve(record, ps=ps, confidence=confidence)
    return anytime_curve(record).assign(**tag), budgeted.assign(**tag)


def _skip_reason(err: Exception) -> str:
    """Loader errors already say what is wrong; curve errors need to say it was the record's content."""
    return f"{err}" if isinstance(err, AnalysisError) else f"unusable exit record: {err}"


def per_run_curves(
    runs: pd.DataFrame,
    group_by: Sequence[str] = DEFAULT_GROUP,
    ps: np.ndarray = DEFAULT_PS,
    confidence: Confidence = "max_prob",
    loader: Callable[[str, object], ExitRecord] = load_exit_record,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(anytime, budgeted, skipped) long tables over every run of ``runs`` that has a usable exit record.

    Each curve block carries the run's ``run_id``, ``experiment``, ``variant``, ``seed`` and group columns;
    ``skipped`` names the runs left out (a warning each) and why. Raises :class:`AnalysisError` if no run
    has an exit record, or none of them is usable.
    """
    group_by = tuple(group_by)
    runs = _prepare(runs, group_by)
    if "has_exit_record" in runs.columns:
        runs = runs[runs["has_exit_record"].astype(bool)]
    if runs.empty:
        raise AnalysisError("none of the selected runs has an exit record (artifact exit_record.npz)")
    keys = list(dict.fromkeys([*_RUN_KEYS, *group_by]))
    anytime, budgeted, skipped = [], [], []
    for _, row in runs.iterrows():
        try:
            curves = _run_curves(loader(row["source"], row["run_id"]), {k: row[k] for k in keys if k in row.index},
                                 ps, confidence)
        except (AnalysisError, ValueError) as err:
            skipped.append({"run_id": row["run_id"], "uid": row.get("uid"), "reason": _skip_reason(err)})
            warn_skipped(row["run_id"], row.get("uid"), skipped[-1]["reason"])
            continue
        anytime.append(curves[0])
        budgeted.append(curves[1])
    skipped = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    if not anytime:
        reasons = "; ".join(f"run {s.run_id} (uid {s.uid or '-'}): {s.reason}" for s in skipped.itertuples())
        raise AnalysisError(f"none of the {len(runs)} runs with an exit record could be analysed: {reasons}")
    order = lambda df: df[[*[k for k in keys if k in df.columns], *[c for c in df.columns if c not in keys]]]
    return order(pd.concat(anytime, ignore_index=True)), order(pd.concat(budgeted, ignore_index=True)), skipped


def _aggregate(per_run: pd.DataFrame, group_by: Sequence[str], at: str, values: dict[str, list[str]]) -> pd.DataFrame:
    grouped = per_run.groupby([*group_by, at], sort=False, dropna=False)
    out = grouped.agg(**{
        f"{col}_{stat}": pd.NamedAgg(column=col, aggfunc=stat)
        for col, stats in values.items() for stat in stats
    })
    out.insert(0, "n_runs", grouped["run_id"].nunique() if "run_id" in per_run.columns else grouped.size())
    return out.reset_index()


def aggregate_anytime(per_run: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP) -> pd.DataFrame:
    """Per group and exit: n_runs, mean cost (macs, params, latency_ms) and mean/std of val and test accuracy."""
    return _aggregate(per_run, group_by, "exit", {
        "macs": ["mean"], "params": ["mean"], "latency_ms": ["mean"],
        "test_acc": ["mean", "std"], "val_acc": ["mean", "std"],
    })


def aggregate_budgeted(per_run: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP) -> pd.DataFrame:
    """Per group and p: n_runs, mean/std of test accuracy and of expected cost (MACs)."""
    return _aggregate(per_run, group_by, "p", {"accuracy": ["mean", "std"], "cost_macs": ["mean", "std"]})


def compute_curves(
    runs: pd.DataFrame,
    group_by: Sequence[str] = DEFAULT_GROUP,
    ps: np.ndarray = DEFAULT_PS,
    confidence: Confidence = "max_prob",
    loader: Callable[[str, object], ExitRecord] = load_exit_record,
) -> Curves:
    """Per-run and aggregated anytime and budgeted curves of the runs of a :func:`load_runs` table."""
    group_by = tuple(group_by)
    anytime_runs, budgeted_runs, skipped = per_run_curves(runs, group_by, ps, confidence, loader)
    return Curves(group_by, anytime_runs, budgeted_runs,
                  aggregate_anytime(anytime_runs, group_by), aggregate_budgeted(budgeted_runs, group_by), skipped)


def group_label(key, group_by: Sequence[str]) -> str:
    """A legend label for a group key: its values joined by '/' (a recipe that stands out by nothing is left out)."""
    key = key if isinstance(key, tuple) else (key,)
    return "/".join(str(k) for k in key if str(k) != NO_DIFFERENCE)


def default_budgets(budgeted: pd.DataFrame, group_by: Sequence[str], n: int = 2) -> np.ndarray:
    """``n`` budgets (MACs) evenly inside the cost range that every group's mean curve reaches
    (the pooled range if the groups do not overlap): 1/3 and 2/3 of the way for n = 2."""
    ranges = budgeted.groupby(list(group_by), sort=False, dropna=False)["cost_macs_mean"].agg(["min", "max"])
    lo, hi = ranges["min"].max(), ranges["max"].min()
    if not lo < hi:
        lo, hi = ranges["min"].min(), ranges["max"].max()
    return lo + (hi - lo) * np.arange(1, n + 1) / (n + 1)


def summary_table(curves: Curves, budgets: Sequence[float] | None = None) -> pd.DataFrame:
    """One row per group: n_runs, test top-1 (%) per exit as 'mean±std', and the mean budgeted test
    top-1 (%) at each budget (MACs; default :func:`default_budgets`), NaN where a group's curve does not
    reach the budget. Budgeted accuracy is read off each run's curve, then averaged over runs."""
    group_by = list(curves.group_by)
    if budgets is None:
        budgets = default_budgets(curves.budgeted, group_by)
    budgets = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    rows = []
    for key, block in curves.anytime.groupby(group_by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(group_by, key))
        row["n_runs"] = int(block["n_runs"].max())
        for _, e in block.sort_values("exit").iterrows():
            std = e["test_acc_std"]
            row[f"exit{int(e['exit'])}"] = (
                f"{100 * e['test_acc_mean']:.2f}" + ("" if np.isnan(std) else f"±{100 * std:.2f}")
            )
        mask = np.ones(len(curves.budgeted_runs), dtype=bool)
        for c, v in zip(group_by, key):
            mask &= (curves.budgeted_runs[c] == v).to_numpy()
        per_run = curves.budgeted_runs[mask]
        for b in budgets:
            accs = [accuracy_at_budget(c, b) for _, c in per_run.groupby("run_id", sort=False)]
            row[f"budget@{b / 1e6:.3g}M"] = 100 * float(np.mean(accs)) if accs else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
