"""Command line: rebuild curves and tables from the exit records of sacred runs.

    python -m analysis curves SOURCE [--experiment NAME] [--variants a,b] [--out DIR]
    python -m analysis table SOURCE [--experiment NAME] [--variants a,b]

SOURCE is a FileStorageObserver folder (e.g. ``runs``) or a MongoDB URL (``mongodb://host:port/db``).
``curves`` writes anytime.csv, budgeted.csv, anytime.png and budgeted.png into --out and prints the
per-group summary; ``table`` only prints the summary.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.budgeted import CONFIDENCES, DEFAULT_PS
from analysis.curves import compute_curves, summary_table
from analysis.runs import AnalysisError, load_runs


def _csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("source", metavar="SOURCE",
                        help="FileStorageObserver folder, or MongoDB URL mongodb://host:port/dbname (default db 'sacred')")
    common.add_argument("--experiment", help="only runs of this sacred experiment name")
    common.add_argument("--variants", help="comma-separated info['variant'] labels to keep (default: all)")
    common.add_argument("--status", default="COMPLETED", help="run status to keep; 'any' keeps all (default COMPLETED)")
    common.add_argument("--group-by", default="experiment,variant",
                        help="comma-separated run-table columns forming a group (default experiment,variant)")
    common.add_argument("--confidence", default="max_prob", choices=sorted(CONFIDENCES),
                        help="exit confidence for budgeted thresholds (default max_prob)")
    common.add_argument("--budgets", help="comma-separated average budgets in MMACs for the summary "
                                          "(default: 1/3 and 2/3 of the cost range all groups reach)")
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    curves = sub.add_parser("curves", parents=[common], help="write anytime/budgeted CSVs and PNGs, print the summary")
    curves.add_argument("--out", default="figures", help="output folder (default: figures)")
    sub.add_parser("table", parents=[common], help="print the per-group summary table")
    return parser


def _select(args) -> pd.DataFrame:
    status = None if args.status.lower() in ("any", "all", "") else args.status
    runs = load_runs(args.source, experiment=args.experiment, status=status)
    searched = f"{args.source} (experiment={args.experiment or 'any'}, status={status or 'any'})"
    if runs.empty:
        raise AnalysisError(f"no runs found in {searched}")
    variants = _csv_list(args.variants)
    if variants:
        runs = runs[runs["variant"].isin(variants)]
        if runs.empty:
            raise AnalysisError(f"no runs with variant in {variants} in {searched}")
    if not runs["has_exit_record"].any():
        raise AnalysisError(f"none of the {len(runs)} runs found in {searched} has an exit_record.npz artifact "
                            f"(run ids: {runs['run_id'].tolist()[:20]})")
    return runs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        runs = _select(args)
        curves = compute_curves(runs, group_by=_csv_list(args.group_by), ps=DEFAULT_PS, confidence=args.confidence)
        budgets = None if args.budgets is None else np.array([float(b) * 1e6 for b in _csv_list(args.budgets)])
        table = summary_table(curves, budgets)
    except (AnalysisError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = int((~runs["has_exit_record"]).sum())
    print(f"{len(runs) - skipped} runs with exit records from {args.source}"
          + (f" ({skipped} without one skipped)" if skipped else ""))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
