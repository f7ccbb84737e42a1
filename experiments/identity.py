"""Run identity: every run gets a ``uid`` that is unique across runs folders and databases.

Sacred's run ids restart in every runs folder and every database, so they cannot name a run on their
own. A uid (``20261125-110512-3fa9c1``: start time plus 24 random bits) is drawn before the run starts
and carried by every record of the run: ``meta.uid`` (written at start) and ``info.uid`` in the file
record and in MongoDB, ``meta.uid`` in its snapshots, and the snapshot folder
``<snapshot_root>/<experiment>/<uid>/``. ``TrackedExperiment`` draws it, checks the whole config and
any resume before an observer sees the run (so bad input leaves no record), and applies the config that
a later stage derives from its parent so that the recorded config is what ran.
"""
from __future__ import annotations

import copy
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sacred import Experiment
from sacred.observers import FileStorageObserver
from sacred.utils import convert_to_nested_dict, recursive_update

from experiments.engine import distributed
from experiments.engine.checkpoint import resume_conflicts
from experiments.engine.console import captured_out_filter
from experiments.engine.trainer import interruptible
from experiments.references import ResolvedRun, RunReferenceError, resolve_run, stores_of
from experiments.validation import rules_of, validate_run, validate_updates

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's code every run saves with its record (sacred keeps one copy per file content).
SOURCE_PACKAGES = ("models", "losses", "data", "experiments", "analysis")
Derivation = Callable[[dict, Sequence], dict]


def new_uid() -> str:
    """A run identity: sortable by start time, unique through its random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class _NamedConfigDocs(logging.Filter):
    """Drop sacred's warning about ``__doc__``: a named config's docstring is how sacred documents it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return '"__doc__"' not in record.getMessage()


def run_logger() -> logging.Logger:
    """sacred's console logger (its format, INFO), without the named-config docstring warning."""
    logger = logging.getLogger("multiexit")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s - %(name)s - %(message)s"))
        logger.addHandler(handler)
        logger.addFilter(_NamedConfigDocs())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def check_writable(folders: Sequence[str | Path]) -> None:
    """Refuse, before any record exists, folders the run could not create or write into."""
    for folder in folders:
        existing = Path(folder).expanduser().absolute()
        while not existing.exists():
            existing = existing.parent
        if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
            raise PermissionError(f"cannot write to {folder} ({existing} is not a writable folder); "
                                  "choose another train.snapshot_root, MULTIEXIT_RUNS or -F folder")


def check_resume(config: dict, experiment: str, stores: Sequence) -> ResolvedRun | None:
    """The run ``train.resume`` names, refused when it cannot continue exactly: weights only, changed settings."""
    ref = config["train"]["resume"]
    if ref in (None, ""):
        return None
    resolved = resolve_run(ref, experiment, config["train"]["snapshot_root"], stores, name="last.pt")
    snapshot = resolved.contents
    if "optimizer" not in snapshot:
        raise RunReferenceError(f"{resolved.snapshot} holds weights only; resume from the last.pt beside it")
    saved = (snapshot.get("meta") or {}).get("config")
    if saved is None:
        raise RunReferenceError(f"{resolved.snapshot} records no config to check a resume against "
                                "(written by an older version); start a new run")
    conflicts = resume_conflicts(saved, config)
    if conflicts:
        raise RunReferenceError(f"cannot resume {resolved.uid or resolved.snapshot} exactly, the command changes "
                                f"{'; '.join(conflicts)} (use the interrupted run's values)")
    return resolved


class TrackedExperiment(Experiment):
    """A sacred ``Experiment`` whose runs carry a uid, are checked before they start, and record what ran.

    ``derive_config`` registers functions ``(config, stores) -> updates`` (e.g. a stage-2 run taking its
    parent's data split and model); their updates are applied as config updates, so ``config.json`` and
    MongoDB hold the values the run used.
    """

    def __init__(self, name: str, ingredients: Sequence = ()):
        super().__init__(name, ingredients=ingredients, base_dir=str(REPO_ROOT))
        self.captured_out_filter = captured_out_filter
        self.logger = run_logger()
        self.derivations: list[Derivation] = []
        for package in SOURCE_PACKAGES:
            for path in sorted((REPO_ROOT / package).rglob("*.py")):
                self.add_source_file(str(path))

    def run(self, *args, **kwargs) -> Any:
        """sacred's ``run``, with SIGTERM (a scheduler's stop) recorded as INTERRUPTED, never left RUNNING."""
        with interruptible():
            return super().run(*args, **kwargs)

    def derive_config(self, func: Derivation) -> Derivation:
        self.derivations.append(func)
        return func

    def rules_for(self, command_name: str | None) -> dict:
        """The experiment's config rules, plus the options of a sacred command (``save_config``'s
        ``config_filename``) taken as they are."""
        rules = rules_of(self.path)
        if command_name in (None, self.default_command):
            return rules
        options = [a for a in self.commands[command_name].signature.arguments if not a.startswith("_")]
        return {**rules, **{name: (lambda value: None) for name in options if name not in rules}}

    def _create_run(self, command_name=None, config_updates=None, named_configs=(), info=None, meta_info=None,
                    options=None) -> Any:
        uid = distributed.same_on_all_ranks((meta_info or {}).get("uid") or new_uid())  # torchrun: one run
        info, meta_info = {**(info or {}), "uid": uid}, {**(meta_info or {}), "uid": uid}
        rules = self.rules_for(command_name)
        validate_updates(config_updates or {}, rules)
        run = super()._create_run(command_name, config_updates, named_configs, info, meta_info, options)
        validate_run(run, rules)
        derived: dict = {}
        for derive in self.derivations:
            try:
                derived = recursive_update(derived, derive(run.config, stores_of(self.observers)))
            except ValueError:
                if command_name in (None, self.default_command):
                    raise  # a command that only shows the config shows it as given

        if derived:
            updates = recursive_update(convert_to_nested_dict(copy.deepcopy(config_updates or {})), derived)
            run = super()._create_run(command_name, updates, named_configs, info, meta_info, options)
        if command_name in (None, self.default_command):
            folders = [o.basedir for o in self.observers if isinstance(o, FileStorageObserver)]
            check_writable([run.config["train"]["snapshot_root"], *folders])
        resumed = check_resume(run.config, self.path, stores_of(self.observers))
        if resumed is not None:  # resolved once, here; the run continues from this very snapshot
            run.info["resumed_from"] = resumed.record()
        return run
