"""Where runs are recorded: a local file observer always, MongoDB when asked.

* Local: ``runs/<uid>/`` (or ``$MULTIEXIT_RUNS``, or sacred's ``-F DIR``), one folder per run named by
  its uid, so a local history and a database's ids never collide.
* MongoDB: sacred's ``-m HOST:PORT[:DB]`` or ``MULTIEXIT_MONGO=HOST:PORT[:DB]`` (or a
  ``mongodb://host:port/db`` URL); ``-m`` wins when both are given. Either way the observer is
  forgiving: a server that is down at start or dies mid-run costs a warning (a few seconds, never a
  hang), the run goes on with its local record, and when it ends the record is uploaded again
  (``python -m analysis sync``), so the database catches up as soon as the server is back.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Sequence

import sacred.experiment
from sacred import Experiment
from sacred.observers import FileStorageObserver, MongoObserver, RunObserver
from sacred.observers.mongo import force_bson_encodeable, parse_mongo_db_arg

from analysis.runs import AnalysisError, mongo_url
from experiments.engine import distributed

RUNS_ENV = "MULTIEXIT_RUNS"
MONGO_ENV = "MULTIEXIT_MONGO"
MONGO_TIMEOUT_MS = 3000
_FILE_FLAGS = ("-F", "--file_storage")
_MONGO_FLAGS = ("-m", "--mongo_db")


def runs_dir() -> str:
    return os.environ.get(RUNS_ENV, "runs")


def parse_mongo(spec: str) -> tuple[str, str]:
    """'host:port[:db]' or 'mongodb://host:port/db' -> (url, db name; 'sacred' when none, as for ``-m``)."""
    try:
        return mongo_url(spec)
    except AnalysisError as err:
        raise ValueError(f"{MONGO_ENV} must look like HOST:PORT[:DB] or mongodb://HOST:PORT/DB ({err})") from None


class RunFolderObserver(FileStorageObserver):
    """sacred's file observer, with each run's folder named by its uid rather than by its id.

    With MongoDB attached the run id is the database's, and the folder of that number may hold an older
    local run; a uid folder is always new.
    """

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        self._uid = meta_info.get("uid")
        return super().started_event(ex_info, command, host_info, start_time, config, meta_info, _id)

    def _make_run_dir(self, _id):
        super()._make_run_dir(getattr(self, "_uid", None) or _id)


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


class PromptMongoObserver(MongoObserver):
    """sacred's MongoObserver, whose final save tries once instead of ten times with pauses.

    A server that is down at the end then costs seconds, not minutes; the failure reaches
    ``ForgivingObserver``, and the run's local record is uploaded again after the run.
    """

    def final_save(self, attempts: int) -> None:
        import pymongo.errors

        try:
            self.runs.update_one({"_id": self.run_entry["_id"]}, {"$set": self.run_entry}, upsert=True)
        except pymongo.errors.InvalidDocument:
            self.run_entry = force_bson_encodeable(self.run_entry)
            self.runs.update_one({"_id": self.run_entry["_id"]}, {"$set": self.run_entry}, upsert=True)


class MongoTarget(ForgivingObserver):
    """A forgiving MongoDB observer that knows its database as a source for ``analysis`` (to catch up)."""

    def __init__(self, url: str, db_name: str, **kwargs):
        super().__init__(PromptMongoObserver(url, db_name=db_name, serverSelectionTimeoutMS=MONGO_TIMEOUT_MS,
                                             **kwargs))
        self.source = f"{url if url.startswith('mongodb') else 'mongodb://' + url}".rstrip("/") + f"/{db_name}"


def take_flag(argv: Sequence[str], flags: Sequence[str]) -> tuple[list[str], str | None]:
    """``argv`` without a sacred flag taking a value (``-m X``, ``-mX``, ``--mongo_db X``, ``--mongo_db=X``)."""
    short, long = flags
    rest, value, args = [], None, list(argv)
    while args:
        arg = args.pop(0)
        if arg in flags:
            value = args.pop(0) if args else None
        elif arg.startswith(long + "="):
            value = arg[len(long) + 1:]
        elif arg.startswith(short) and not arg.startswith("--") and len(arg) > len(short):
            value = arg[len(short):]
        else:
            rest.append(arg)
    return rest, value


def mongo_observer(spec: str, flag: bool) -> MongoTarget | None:
    """The observer of ``-m SPEC`` (sacred's syntax) or ``$MULTIEXIT_MONGO`` (host:port[:db] or a URL)."""
    if flag:
        kwargs = parse_mongo_db_arg(spec)
        url, db_name = kwargs.pop("url", "localhost:27017"), kwargs.pop("db_name", "sacred")
    else:
        url, db_name = parse_mongo(spec)
        kwargs = {}
    try:
        return MongoTarget(url, db_name, **kwargs)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"MongoDB observer for {spec!r} could not be created ({err}); recording locally only")
        return None


def default_observers(argv: Sequence[str]) -> tuple[list[str], list[RunObserver]]:
    """The observers a command line asks for, and the command line without the flags taken over.

    Always a local ``RunFolderObserver`` (``-F DIR`` or ``$MULTIEXIT_RUNS`` or ``runs``); MongoDB from
    ``-m`` or else ``$MULTIEXIT_MONGO`` (never both: two observers of one database collide on the id).
    """
    argv, folder = take_flag(argv, _FILE_FLAGS)
    argv, mongo = take_flag(argv, _MONGO_FLAGS)
    observers: list[RunObserver] = [RunFolderObserver(folder or runs_dir())]
    env = os.environ.get(MONGO_ENV)
    if mongo and env:
        print(f"note: -m {mongo} given, so {MONGO_ENV}={env} is not used", file=sys.stderr)
    if mongo or env:
        observer = mongo_observer(mongo or env, flag=bool(mongo))
        observers.extend([observer] if observer else [])
    return argv, observers


def catch_up(observers: Sequence[RunObserver], run) -> None:
    """After a MongoDB failure during the run, upload the run's local record into that database."""
    from analysis.sync import sync_runs

    folders = [o.basedir for o in observers if isinstance(o, FileStorageObserver)]
    for target in (o for o in observers if isinstance(o, MongoTarget) and not o.alive):
        try:
            sync_runs(folders[0], target.source, uids=[run.meta_info["uid"]])
            print(f"MongoDB {target.source} was missing part of this run; it has been uploaded now", file=sys.stderr)
        except Exception as err:  # noqa: BLE001 - the database is still away: say how to catch up later
            print(f"MongoDB {target.source} is incomplete for this run ({err}); when it is back, run\n"
                  f"  python -m analysis sync {folders[0]} {target.source}", file=sys.stderr)


INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, PermissionError)


def _print_error(filtered_trace=sacred.experiment.print_filtered_stacktrace) -> None:
    """Bad input (unknown name, missing file) gets one line; anything else sacred's filtered trace."""
    err = sys.exc_info()[1]
    if isinstance(err, INPUT_ERRORS):
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}\n(run with --debug for the full traceback)", file=sys.stderr)
    else:
        filtered_trace()


def run_cli(ex: Experiment, argv: Sequence[str] | None = None) -> None:
    """The ``__main__`` of every experiment script: attach the observers, then sacred's CLI (under torchrun: in
    the process group, observed by rank 0 alone)."""
    try:
        argv, observers = default_observers(list(sys.argv if argv is None else argv))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if distributed.is_main():  # under torchrun rank 0 alone records the run
        ex.observers.extend(observers)
    sacred.experiment.print_filtered_stacktrace = _print_error  # sacred's CLI reports failures through it
    try:
        with distributed.group():
            ex.run_commandline(argv)
    except KeyboardInterrupt as err:  # the run is recorded INTERRUPTED; the trainer said where last.pt is
        print(f"interrupted: {err or 'KeyboardInterrupt'}", file=sys.stderr)
        sys.exit(130)
    finally:
        if ex.current_run is not None and ex.current_run.start_time is not None:
            catch_up(ex.observers, ex.current_run)
