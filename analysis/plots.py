"""Figures of aggregated curves: one line per group, a shaded ±std band over seeds, x in MMACs, y in top-1 %.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, without pyplot, so they work
headless and never change the global backend of a notebook that imports this module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.curves import DEFAULT_GROUP, group_label


def _figure(size: tuple[float, float] = (6.4, 4.6)) -> tuple[Figure, object]:
    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _draw(ax, table: pd.DataFrame, group_by: Sequence[str], x: str, y: str, y_std: str, order: str, marker: str):
    for key, g in table.groupby(list(group_by), sort=True, dropna=False):
        g = g.sort_values(order)
        xs = g[x].to_numpy(float) / 1e6
        ys = 100 * g[y].to_numpy(float)
        std = 100 * g[y_std].fillna(0.0).to_numpy(float)
        n = int(g["n_runs"].max())
        (line,) = ax.plot(xs, ys, marker=marker, markersize=4, label=f"{group_label(key, group_by)} (n={n})")
        ax.fill_between(xs, ys - std, ys + std, color=line.get_color(), alpha=0.2, linewidth=0)


def _finish(fig: Figure, ax, title: str, path: str | Path | None,
            xlabel: str = "average multiply-adds per test sample (MMACs)", legend_size: str = "small") -> Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return fig


def plot_anytime(anytime: pd.DataFrame, path: str | Path | None = None, group_by: Sequence[str] = DEFAULT_GROUP,
                 title: str = "Anytime prediction (test)") -> Figure:
    """Test top-1 of every exit vs its cumulative MMACs, from :func:`analysis.curves.aggregate_anytime`."""
    fig, ax = _figure()
    _draw(ax, anytime, group_by, "macs_mean", "test_acc_mean", "test_acc_std", "exit", "o")
    return _finish(fig, ax, title, path, "cumulative multiply-adds up to the exit (MMACs)")


def plot_budgeted(budgeted: pd.DataFrame, path: str | Path | None = None, group_by: Sequence[str] = DEFAULT_GROUP,
                  title: str = "Budgeted batch classification (test)") -> Figure:
    """Mean test top-1 vs mean expected MMACs over the p grid, from :func:`analysis.curves.aggregate_budgeted`."""
    fig, ax = _figure()
    _draw(ax, budgeted, group_by, "cost_macs_mean", "accuracy_mean", "accuracy_std", "cost_macs_mean", ".")
    return _finish(fig, ax, title, path)


def plot_final_exit(anytime: pd.DataFrame, path: str | Path | None = None, group_by: Sequence[str] = DEFAULT_GROUP,
                    title: str = "Final exit (test)") -> Figure:
    """Test top-1 of each group's last exit as a bar with a ±std error bar: methods that train one network
    (a distilled student, a teacher) compare here."""
    last = anytime.loc[anytime.groupby(list(group_by), sort=True, dropna=False)["exit"].idxmax()]
    fig = Figure(figsize=(6.4, 1.2 + 0.45 * len(last)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{group_label(tuple(row[list(group_by)]), group_by)} (n={int(row['n_runs'])})" for _, row in last.iterrows()]
    ax.barh(labels, 100 * last["test_acc_mean"], xerr=100 * last["test_acc_std"].fillna(0.0), color="tab:blue",
            alpha=0.7, capsize=3)
    low = 100 * (last["test_acc_mean"] - last["test_acc_std"].fillna(0.0)).min()
    ax.set_xlim(max(0.0, low - 2), 100 * (last["test_acc_mean"] + last["test_acc_std"].fillna(0.0)).max() + 1)
    ax.set_xlabel("top-1 accuracy of the last exit (%)")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return fig


def plot_curves(curves, out_dir: str | Path) -> list[Path]:
    """Write ``anytime.png``, ``budgeted.png`` and ``final.png`` of a :class:`analysis.curves.Curves` into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [out_dir / "anytime.png", out_dir / "budgeted.png", out_dir / "final.png"]
    plot_anytime(curves.anytime, paths[0], curves.group_by)
    plot_budgeted(curves.budgeted, paths[1], curves.group_by)
    plot_final_exit(curves.anytime, paths[2], curves.group_by)
    return paths


def plot_policies(table: pd.DataFrame, path: str | Path | None, group_by: Sequence[str],
                  unit: str = "cost") -> Figure:
    """Test top-1 vs the cost spent per test sample, one line per group, policy and protocol, ±std bands."""
    fig, ax = _figure((6.8, 4.8))
    for key, g in table.groupby([*group_by, "policy", "protocol"], sort=True, dropna=False):
        g = g.sort_values("budget_fraction")
        ys, std = 100 * g["accuracy_mean"], 100 * g["accuracy_std"].fillna(0.0)
        label = f"{key[-2]} ({key[-1]}), {group_label(key[:-2], group_by)} (n={int(g['n_runs'].max())})"
        (line,) = ax.plot(g["cost_mean"], ys, marker="o", markersize=4, label=label)
        ax.fill_between(g["cost_mean"], ys - std, ys + std, color=line.get_color(), alpha=0.15, linewidth=0)
    return _finish(fig, ax, "Exit policies at fixed budgets (test)", path, f"average cost per test sample ({unit})",
                   legend_size="x-small")


def plot_trade_off(table: pd.DataFrame, path: str | Path | None, group_by: Sequence[str]) -> Figure:
    """JEI-DNN's accuracy/cost trade-off (one point per ``ce_ic_tradeoff``, labelled) next to max-probability
    thresholds of the same runs at the same cost, per group, ±std bars over runs; x: fraction of the full
    network's MACs (``analysis.jei.trade_off_points``)."""
    fig, ax = _figure((6.8, 4.8))
    for key, g in table.groupby(list(group_by), sort=True, dropna=False):
        g = g.sort_values("macs_ratio_mean")
        label = f"{group_label(key, group_by)} (n={int(g['n_runs'].max())})"
        xs = g["macs_ratio_mean"]
        (line,) = ax.plot(xs, 100 * g["accuracy_mean"], marker="o", markersize=5, label=f"JEI gates, {label}")
        ax.errorbar(xs, 100 * g["accuracy_mean"], yerr=100 * g["accuracy_std"].fillna(0.0),
                    xerr=g["macs_ratio_std"].fillna(0.0), fmt="none", ecolor=line.get_color(), alpha=0.5)
        ax.plot(xs, 100 * g["threshold_mean"], marker="s", markersize=4, linestyle="--", color=line.get_color(),
                alpha=0.7, label=f"max-prob thresholds at the same cost, {label}")
        for x, y, lam in zip(xs, 100 * g["accuracy_mean"], g["tradeoff"]):
            ax.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    return _finish(fig, ax, "JEI-DNN: accuracy against cost (test)", path,
                   "average MACs per test sample / full network's", legend_size="x-small")
