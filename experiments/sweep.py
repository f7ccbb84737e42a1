"""Grids of tracked runs with Ray Tune: every trial is one ordinary sacred run of an experiment.

    python -m experiments.sweep imta --grid ge_scope=off,coarsest --grid seed=1,2,3 with stage=ge quick
    python -m experiments.sweep imta --grid seed=1,2,3 --parent ge_run=stage=ge,ge_scope=coarsest with stage=imta quick
    python -m experiments.sweep multiexit_distillation --grid seed=1,2,3 --cpus-per-trial 1 with quick

Each ``--grid KEY=V1,V2`` adds a grid axis (values as JSON where they parse, like ``with``); everything after
``with`` is fixed for every trial, exactly as on an experiment's own command line. ``--parent KEY=k=v,...``
fills a stage's run reference per trial: the one finished run of the experiment (in the runs folder) with the
trial's seed and those config values; none or several is an error naming them. Trials record into ``-F`` (default
``runs``) and MongoDB (``-m`` or ``$MULTIEXIT_MONGO``) like a run started by hand, snapshots into
``--snapshot-root``, each with ``train.threads`` = its CPUs.

Ray runs trials in parallel up to the machine's cores (``ray.init()`` here; ``--address`` joins a cluster); Tune
keeps the sweep's state under ``--storage``/<name>, the name derived from the command, so running the same
command again restores the sweep (Tune's restore): finished trials are not trained again, interrupted ones are.
A failed trial is reported at the end and does not stop the others.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from sacred.utils import convert_to_nested_dict

from analysis.runs import AnalysisError, filter_where, load_runs

EXPERIMENTS = ("multiexit_distillation", "imta", "dih", "eenet", "jei")


def parse_value(text: str) -> Any:
    """A config value as sacred's command line reads it: JSON when it parses (1, true, [1, 2]), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{flag} expects KEY=VALUE, got {text!r}")
    return key, value


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``["seed=1,2,3"]`` -> ``{"seed": [1, 2, 3]}``; commas separate the values, so a value cannot hold one (lists
    cannot be grid values; fix them with ``with``)."""
    grid = {}
    for item in items:
        key, values = parse_assignment(item, "--grid")
        grid[key] = [parse_value(v) for v in values.split(",")]
    return grid


def parse_with(tokens: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Named configs and ``key=value`` updates after ``with``."""
    named = [t for t in tokens if "=" not in t]
    updates = dict(parse_assignment(t, "with") for t in tokens if "=" in t)
    return named, {k: parse_value(v) for k, v in updates.items()}


def parse_parent(text: str) -> tuple[str, dict[str, Any]]:
    """``"ge_run=stage=ge,ge_scope=coarsest"`` -> ``("ge_run", {"stage": "ge", "ge_scope": "coarsest"})``."""
    key, conditions = parse_assignment(text, "--parent")
    return key, {k: parse_value(v) for k, v in (parse_assignment(c, "--parent") for c in conditions.split(","))}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("with") if "with" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=EXPERIMENTS)
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis (repeatable)")
    parser.add_argument("--parent", action="append", default=[], metavar="KEY=k=v,...",
                        help="a run reference per trial: the finished run with the trial's seed and these values")
    parser.add_argument("--cpus-per-trial", type=float, default=1)
    parser.add_argument("--gpus-per-trial", type=float, default=0)
    parser.add_argument("--address", help="a Ray cluster to join (default: a local Ray on this machine)")
    parser.add_argument("-F", "--file-storage", default=os.environ.get("MULTIEXIT_RUNS", "runs"),
                        help="runs folder the trials record into (default runs)")
    parser.add_argument("-m", "--mongo", help="MongoDB (host:port[:db] or URL) the trials record into as well")
    parser.add_argument("--snapshot-root", default="snapshots")
    parser.add_argument("--storage", default="sweeps", help="where Tune keeps the sweep's state (default sweeps)")
    parser.add_argument("--name", help="the sweep's name (default: derived from the command, so a re-run restores)")
    args = parser.parse_args(argv[:cut])
    args.named, args.updates = parse_with(argv[cut + 1:])
    args.grid = parse_grid(args.grid)
    args.parents = dict(parse_parent(p) for p in args.parent)
    if not args.grid:
        parser.error("give at least one --grid KEY=V1,V2")
    return args


def sweep_name(args: argparse.Namespace) -> str:
    """The experiment and a hash of everything that defines the trials: one command, one name."""
    spec = {k: getattr(args, k) for k in ("experiment", "grid", "parents", "named", "updates")}
    return f"{args.experiment}-{hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]}"


def parent_uid(runs_folder: str, experiment: str, where: dict[str, Any]) -> str:
    """The uid of the one finished run of ``experiment`` in ``runs_folder`` matching ``where``."""
    try:
        runs = filter_where(load_runs(runs_folder, experiment=experiment), where)
    except AnalysisError as err:
        raise ValueError(f"--parent {where}: {err}") from None
    if len(runs) != 1:
        found = runs["uid"].tolist() if len(runs) else "none"
        raise ValueError(f"--parent needs exactly one finished {experiment} run with {where} in {runs_folder}, "
                         f"found {found}")
    return runs["uid"].iloc[0]


def trial_updates(spec: dict, values: dict[str, Any]) -> dict[str, Any]:
    """One trial's config updates: the fixed ones, the grid point, its parents, where it writes and its threads."""
    updates = {**spec["updates"], **values}
    for key, where in spec["parents"].items():
        match = {**where, **({"seed": updates["seed"]} if "seed" in updates else {})}
        updates[key] = parent_uid(spec["runs"], spec["experiment"], match)
    updates["train.snapshot_root"] = spec["snapshot_root"]
    updates["train.threads"] = max(1, int(spec["cpus"]))
    updates["train.progress"] = False
    return convert_to_nested_dict(updates)


def run_trial(values: dict[str, Any], spec: dict) -> None:
    """A Ray worker: one sacred run of the experiment, observed as a run started by hand; reports its uid and the
    last exit's test accuracy to Tune."""
    from ray import tune
    from sacred import SETTINGS

    from experiments.tracking import default_observers

    SETTINGS.CAPTURE_MODE = "sys"  # a Ray worker has no terminal to tee
    experiment = importlib.import_module(f"experiments.{spec['experiment']}")
    flags = ["-F", spec["runs"]] + (["-m", spec["mongo"]] if spec["mongo"] else [])
    experiment.ex.observers = default_observers(flags)[1]
    run = experiment.ex.run(named_configs=spec["named"], config_updates=trial_updates(spec, values),
                            options={"--loglevel": "ERROR"})
    result = {"uid": run.info["uid"], "status": run.status}
    accuracy = run.result.get("test_acc") if isinstance(run.result, dict) else None
    if isinstance(accuracy, list) and accuracy:
        result["test_acc_last"] = accuracy[-1]
    tune.report(result)


def tuner(args: argparse.Namespace):
    """A Tune grid over ``run_trial``, or the restored sweep of the same command."""
    from ray import tune

    spec = {"experiment": args.experiment, "named": args.named, "updates": args.updates, "parents": args.parents,
            "runs": str(Path(args.file_storage).resolve()), "mongo": args.mongo or os.environ.get("MULTIEXIT_MONGO"),
            "snapshot_root": str(Path(args.snapshot_root).resolve()), "cpus": args.cpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec),
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    storage = str(Path(args.storage).resolve())
    name = args.name or sweep_name(args)
    path = os.path.join(storage, name)
    if tune.Tuner.can_restore(path):
        print(f"sweep {name}: restoring from {path} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(path, trainable, restart_errored=True)
    print(f"sweep {name}: {'x'.join(str(len(v)) for v in args.grid.values())} trials, state in {path}", flush=True)
    return tune.Tuner(trainable, param_space={k: tune.grid_search(v) for k, v in args.grid.items()},
                      run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))


def report(results) -> tuple[str, int]:
    """One line per trial (grid values, status, run uid, last exit's test accuracy) and the failures' count."""
    lines, failed = [], 0
    for result in results:
        values = ", ".join(f"{k}={v}" for k, v in sorted((result.config or {}).items()))
        if result.error is not None:
            failed += 1
            lines.append(f"FAILED  {values}: {str(result.error).strip().splitlines()[-1]}")
            continue
        metrics = result.metrics or {}
        accuracy = metrics.get("test_acc_last")
        lines.append(f"done    {values}: run {metrics.get('uid')}"
                     + (f", test top-1 of the last exit {100 * accuracy:.2f} %" if accuracy is not None else ""))
    return "\n".join(lines), failed


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials write where the command says, not in Tune's folders
    import ray

    ray.init(address=args.address, include_dashboard=False, configure_logging=False)
    lines, failed = report(tuner(args).fit())
    print(lines)
    print(f"{failed} of {len(lines.splitlines())} trials failed" if failed else "every trial finished", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
