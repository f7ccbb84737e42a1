"""Exit policies at fixed budgets, across runs: EENet's ``stage=schedule`` runs record one row per policy,
budget and protocol (``info.policies``); this aggregates them over the runs of a group (the seeds) and draws
accuracy against the cost actually spent on test, one line per policy (``analysis.plots.plot_policies``).

Budgets are compared as fractions of the full network's cost (``budget_fraction``), so runs whose networks
differ slightly in cost still meet at the same operating points.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

POLICY_COLUMN = "info.policies"
KEYS = ("policy", "protocol", "budget_fraction")


def has_policies(runs: pd.DataFrame) -> pd.Series:
    """Which runs recorded policy results."""
    if POLICY_COLUMN not in runs.columns:
        return pd.Series(False, index=runs.index)
    return runs[POLICY_COLUMN].map(lambda rows: isinstance(rows, list) and len(rows) > 0)


def policy_rows(runs: pd.DataFrame, group_by: Sequence[str]) -> pd.DataFrame:
    """One row per run, policy, protocol and budget, tagged with the run's group columns."""
    frames = []
    for _, run in runs[has_policies(runs)].iterrows():
        rows = pd.DataFrame(run[POLICY_COLUMN])
        frames.append(rows.assign(run_id=run["run_id"], **{c: run[c] for c in group_by}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def aggregate_policies(rows: pd.DataFrame, group_by: Sequence[str]) -> pd.DataFrame:
    """Mean and std over runs of test accuracy and cost per group, policy, protocol and budget fraction."""
    keys = [*group_by, *KEYS]
    stats = rows.groupby(keys, sort=True, dropna=False).agg(
        accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
        cost_mean=("cost", "mean"), cost_std=("cost", "std"), n_runs=("run_id", "nunique"))
    return stats.reset_index()


def policy_summary(table: pd.DataFrame, group_by: Sequence[str]) -> pd.DataFrame:
    """Wide: one row per group, policy and protocol; test top-1 (%) mean±std per budget fraction."""
    cells = table.assign(cell=[f"{100 * m:.2f}±{100 * s:.2f}" if s == s else f"{100 * m:.2f}"
                               for m, s in zip(table["accuracy_mean"], table["accuracy_std"])],
                         budget=[f"@{f:.2f}" for f in table["budget_fraction"]])
    wide = cells.pivot_table(index=[*group_by, "policy", "protocol", "n_runs"], columns="budget", values="cell",
                             aggfunc="first")
    return wide.reset_index().rename_axis(columns=None)
