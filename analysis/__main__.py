"""Command line: list sacred runs, rebuild curves and tables from their exit records, sync runs into MongoDB.

    python -m analysis curves SOURCE [--experiment NAME] [--variants a,b] [--where KEY=VALUE ...] [--out DIR]
    python -m analysis table SOURCE [--experiment NAME] [--variants a,b] [--where KEY=VALUE ...]
    python -m analysis runs SOURCE [--experiment NAME] [--status any|COMPLETED|...] [--where KEY=VALUE ...]
    python -m analysis sync RUNS_FOLDER MONGO [--experiment NAME]

SOURCE is a FileStorageObserver folder (e.g. ``runs``) or a MongoDB URL (``mongodb://host:port/db``).
``curves`` writes anytime.csv, budgeted.csv, anytime.png and budgeted.png into --out and prints the
per-group summary; ``table`` only prints the summary; a run whose exit record is unusable is skipped with a
warning naming it. ``runs`` prints one row per run (id, uid, status, key config, headline test accuracy).
``--where data.name=cifar100 --where seed=1`` keeps the runs whose config has those values (JSON values:
``seed=1`` is the number, ``distillation=false`` the boolean). ``sync`` uploads the local records of
RUNS_FOLDER into MONGO after an outage, matching runs by uid; running it again changes nothing.
"""
from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.budgeted import CONFIDENCES, DEFAULT_PS
from analysis.curves import DEFAULT_GROUP, compute_curves, summary_table
from analysis.jei import GROUP as TRADE_OFF_GROUP
from analysis.jei import has_jei, trade_off_points
from analysis.policies import aggregate_policies, has_policies, policy_rows, policy_summary
from analysis.runs import AnalysisError, SkippedRunWarning, filter_where, load_runs, parse_where, run_listing


def _csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _selection_args() -> argparse.ArgumentParser:
    """Options choosing runs, shared by curves, table and runs."""
    select = argparse.ArgumentParser(add_help=False)
    select.add_argument("source", metavar="SOURCE",
                        help="FileStorageObserver folder, or MongoDB URL mongodb://host:port/dbname (default db 'sacred')")
    select.add_argument("--experiment", help="only runs of this sacred experiment name")
    select.add_argument("--variants", help="comma-separated info['variant'] labels to keep (default: all)")
    select.add_argument("--status", default="COMPLETED", help="run status to keep; 'any' keeps all (default COMPLETED)")
    select.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs whose config KEY (e.g. data.name) equals VALUE (JSON if it parses); repeatable")
    return select


def _analysis_args() -> argparse.ArgumentParser:
    """Options of the curve computation, shared by curves and table."""
    analyse = argparse.ArgumentParser(add_help=False)
    analyse.add_argument("--group-by", default=",".join(DEFAULT_GROUP),
                         help="comma-separated run-table columns forming a group (default experiment,variant,recipe: "
                              "the seeds of one recipe)")
    analyse.add_argument("--confidence", default="max_prob", choices=sorted(CONFIDENCES),
                         help="exit confidence for budgeted thresholds (default max_prob)")
    analyse.add_argument("--budgets", help="comma-separated average budgets in MMACs for the summary "
                                           "(default: 1/3 and 2/3 of the cost range all groups reach)")
    return analyse


def _parser() -> argparse.ArgumentParser:
    select, analyse = _selection_args(), _analysis_args()
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    curves = sub.add_parser("curves", parents=[select, analyse],
                            help="write anytime/budgeted CSVs and PNGs, print the summary")
    curves.add_argument("--out", default="figures", help="output folder (default: figures)")
    sub.add_parser("table", parents=[select, analyse], help="print the per-group summary table")
    runs = sub.add_parser("runs", parents=[select], help="list the runs, one row each (default: any status)")
    runs.set_defaults(status="any")
    sync = sub.add_parser("sync", help="upload the records of a FileStorageObserver folder into MongoDB")
    sync.add_argument("folder", metavar="RUNS_FOLDER", help="FileStorageObserver folder (e.g. runs)")
    sync.add_argument("mongo", metavar="MONGO", help="mongodb://host:port/dbname or host:port:dbname")
    sync.add_argument("--experiment", help="only runs of this sacred experiment name")
    return parser


def _select(args) -> pd.DataFrame:
    """The runs of SOURCE that pass --experiment, --status, --where and --variants (at least one)."""
    status = None if args.status.lower() in ("any", "all", "") else args.status
    where = parse_where(args.where)
    runs = load_runs(args.source, experiment=args.experiment, status=status)
    searched = f"{args.source} (experiment={args.experiment or 'any'}, status={status or 'any'})"
    if runs.empty:
        raise AnalysisError(f"no runs found in {searched}")
    if where:
        runs = filter_where(runs, where)
        searched += " where " + " and ".join(args.where)
        if runs.empty:
            raise AnalysisError(f"no runs found in {searched}")
    variants = _csv_list(args.variants)
    if variants:
        runs = runs[runs["variant"].isin(variants)]
        if runs.empty:
            raise AnalysisError(f"no runs with variant in {variants} in {searched}")
    if args.command != "runs" and not (runs["has_exit_record"] | has_policies(runs) | has_jei(runs)).any():
        raise AnalysisError(f"none of the {len(runs)} runs found in {searched} has an exit_record.npz artifact "
                            f"or policy results (run ids: {runs['run_id'].tolist()[:20]})")
    return runs


def _analyse(args) -> int:
    """curves and table: the exit records' curves and the policy runs' results, each where runs have them."""
    runs = _select(args)
    group_by = _csv_list(args.group_by)
    if runs["has_exit_record"].any():
        _analyse_records(args, runs)
    if has_policies(runs).any():
        _analyse_policies(args, runs, group_by)
    if has_jei(runs).any():
        _analyse_trade_off(args, runs)
    return 0


def _analyse_trade_off(args, runs: pd.DataFrame) -> None:
    """JEI-DNN's runs: one point per trade-off (mean±std over seeds) against thresholds at the same cost."""
    group = list(TRADE_OFF_GROUP)
    table = trade_off_points(runs, group)
    print(f"{int(has_jei(runs).sum())} JEI-DNN runs from {args.source}")
    if args.command == "curves":
        from analysis.plots import plot_trade_off

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "trade_off.csv", index=False)
        plot_trade_off(table, out / "trade_off.png", [c.removeprefix("info.jei.") for c in group])
        print(f"wrote {out / 'trade_off.csv'}, {out / 'trade_off.png'}")
    print("JEI-DNN test top-1 (%) and MACs ratio per trade-off, mean±std over runs; thresholds: max-prob at the "
          "same cost")
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _analyse_policies(args, runs: pd.DataFrame, group_by: list[str]) -> None:
    """Exit policies at fixed budgets (EENet's schedule runs): mean±std over runs, and a figure for curves."""
    table = aggregate_policies(policy_rows(runs, group_by), group_by)
    print(f"{int(has_policies(runs).sum())} runs with exit-policy results from {args.source}")
    if args.command == "curves":
        from analysis.plots import plot_policies

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "policies.csv", index=False)
        units = runs.get("info.cost_unit", pd.Series(dtype=object)).dropna().unique()
        plot_policies(table, out / "policies.png", group_by, units[0] if len(units) == 1 else "cost")
        print(f"wrote {out / 'policies.csv'}, {out / 'policies.png'}")
    print("test top-1 (%) per policy at each budget (fraction of the full network's cost), mean±std over runs")
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(policy_summary(table, group_by).to_string(index=False))


def _analyse_records(args, runs: pd.DataFrame) -> None:
    """Anytime and budgeted curves from the exit records, the summary printed (and files written for curves)."""
    curves = compute_curves(runs, group_by=_csv_list(args.group_by), ps=DEFAULT_PS, confidence=args.confidence)
    budgets = None if args.budgets is None else np.array([float(b) * 1e6 for b in _csv_list(args.budgets)])
    table = summary_table(curves, budgets)
    without = int((~runs["has_exit_record"]).sum())
    skipped = [f"{without} without one skipped"] if without else []
    skipped += [f"{len(curves.skipped)} unusable skipped"] if len(curves.skipped) else []
    print(f"{len(runs) - without - len(curves.skipped)} runs with exit records from {args.source}"
          + (f" ({', '.join(skipped)})" if skipped else ""))
    if args.command == "curves":
        from analysis.plots import plot_curves

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        curves.anytime.to_csv(out / "anytime.csv", index=False)
        curves.budgeted.to_csv(out / "budgeted.csv", index=False)
        written = [out / "anytime.csv", out / "budgeted.csv", *plot_curves(curves, out)]
        print("wrote " + ", ".join(str(p) for p in written))
    print("test top-1 (%) per exit, mean±std over runs; budget@<MMACs>: budgeted test top-1 (%)")
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))


def _cell(value) -> str:
    """A listing cell as text: blank when missing, whole floats without decimals, times to the second."""
    if value is None or value is pd.NaT:
        return ""
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:g}"
    return str(value)


def _list(args) -> int:
    """runs: one row per selected run."""
    listing = run_listing(_select(args))
    accuracy = [c for c in listing.columns if c.endswith("%")]
    text = listing.astype(object).apply(lambda col: col.map(_cell))
    text[accuracy] = listing[accuracy].apply(lambda col: col.map(lambda v: "" if np.isnan(v) else f"{v:.2f}"))
    print(f"{len(listing)} runs in {args.source}")
    widths = {c: max([len(c), *text[c].str.len()]) for c in text.columns}
    for row in [list(text.columns), *text.itertuples(index=False)]:
        print("  ".join(str(v).ljust(widths[c]) for c, v in zip(text.columns, row)).rstrip())
    return 0


def _sync(args) -> int:
    """sync: upload a runs folder into MongoDB, one line per run and a total."""
    from analysis.sync import report_line, sync_runs, total_line

    reports = sync_runs(args.folder, args.mongo, experiment=args.experiment)
    for report in reports:
        print(report_line(report))
    print(total_line(reports, args.mongo))
    return 0


_COMMANDS = {"curves": _analyse, "table": _analyse, "runs": _list, "sync": _sync}


def _show_warning(default, message, category, filename, lineno, file=None, line=None) -> None:
    """Skipped runs as a plain 'warning: ...' line on stderr; other warnings as Python shows them."""
    if issubclass(category, SkippedRunWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", SkippedRunWarning)
        warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
        try:
            return _COMMANDS[args.command](args)
        except (AnalysisError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
