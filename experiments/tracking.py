"""Where runs are recorded: a local file observer by default, MongoDB when asked.

* Default: ``FileStorageObserver`` under ``runs/`` (or ``$MULTIEXIT_RUNS``), so a fresh checkout
  needs no server and every run keeps a local record.
* MongoDB: sacred's own ``-m HOST:PORT:DB`` flag, or ``MULTIEXIT_MONGO=HOST:PORT:DB`` (or a
  ``mongodb://host:port/db`` URL). The environment route is forgiving: if the server is down or
  fails mid-run, a warning is printed and the run goes on with its local record.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Sequence

import sacred.experiment
from sacred import Experiment
from sacred.observers import FileStorageObserver, MongoObserver, RunObserver

from analysis.runs import AnalysisError, mongo_url

RUNS_ENV = "MULTIEXIT_RUNS"
MONGO_ENV = "MULTIEXIT_MONGO"
_FILE_FLAGS = ("-F", "--file_storage")


def runs_dir() -> str:
    return os.environ.get(RUNS_ENV, "runs")


def parse_mongo(spec: str) -> tuple[str, str]:
    """'host:port[:db]' or 'mongodb://host:port/db' -> (url, db name; 'sacred' when none, as for ``-m``)."""
    try:
        return mongo_url(spec)
    except AnalysisError as err:
        raise ValueError(f"{MONGO_ENV} must look like HOST:PORT[:DB] or mongodb://HOST:PORT/DB ({err})") from None


class ForgivingObserver(RunObserver):
    """Wraps an observer so that its failures are reported but never stop the run."""

    _EVENTS = ("started_event", "queued_event", "heartbeat_event", "completed_event", "interrupted_event",
               "failed_event", "resource_event", "artifact_event", "log_metrics", "join")

    def __init__(self, inner: RunObserver):
        self.inner = inner
        self.priority = inner.priority
        self.alive = True
        for name in self._EVENTS:
            setattr(self, name, self._guarded(name))

    def _guarded(self, name: str):
        def call(*args, **kwargs):
            if self.alive:
                try:
                    return getattr(self.inner, name)(*args, **kwargs)
                except Exception as err:  # noqa: BLE001 - any observer failure must not kill training
                    self.alive = False
                    warnings.warn(f"{type(self.inner).__name__} failed ({err}); the run continues with its local record")
            return None

        return call


def default_observers(argv: Sequence[str]) -> list[RunObserver]:
    """A file observer unless ``-F`` was given, plus MongoDB when ``$MULTIEXIT_MONGO`` is set."""
    observers: list[RunObserver] = []
    if not any(a in _FILE_FLAGS or a.startswith("--file_storage=") for a in argv):
        observers.append(FileStorageObserver(runs_dir()))
    spec = os.environ.get(MONGO_ENV)
    if spec:
        url, db = parse_mongo(spec)
        try:
            observers.append(ForgivingObserver(MongoObserver(url, db_name=db, serverSelectionTimeoutMS=3000)))
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"MongoDB observer for {spec!r} could not be created ({err}); recording locally only")
    return observers


INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError)


def _print_error(filtered_trace=sacred.experiment.print_filtered_stacktrace) -> None:
    """Bad input (unknown name, missing file) gets one line; anything else sacred's filtered trace."""
    err = sys.exc_info()[1]
    if isinstance(err, INPUT_ERRORS):
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}\n(run with --debug for the full traceback)", file=sys.stderr)
    else:
        filtered_trace()


def run_cli(ex: Experiment, argv: Sequence[str] | None = None) -> None:
    """The ``__main__`` of every experiment script: attach the default observers, then sacred's CLI."""
    argv = list(sys.argv if argv is None else argv)
    ex.observers.extend(default_observers(argv))
    sacred.experiment.print_filtered_stacktrace = _print_error  # sacred's CLI reports failures through it
    try:
        ex.run_commandline(argv)
    except KeyboardInterrupt as err:  # the run is recorded INTERRUPTED; the trainer said where last.pt is
        print(f"interrupted: {err or 'KeyboardInterrupt'}", file=sys.stderr)
        sys.exit(130)
