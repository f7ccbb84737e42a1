"""Snapshots: atomic writes, safe (``weights_only``) loading, and finding a run's snapshot by id."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

SNAPSHOT_ROOT = Path("snapshots")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` with torch.save to a temporary file, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_snapshot(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a snapshot with ``weights_only=True``: tensors and plain containers only, no code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No snapshot at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def snapshot_dir(experiment: str, run_id: Any, root: str | Path = SNAPSHOT_ROOT) -> Path:
    """Where a run keeps its snapshots: ``<root>/<experiment>/<run id>/``."""
    return Path(root) / experiment / str(run_id)


def resolve_snapshot(ref: str | int, experiment: str, root: str | Path = SNAPSHOT_ROOT, name: str = "best.pt") -> Path:
    """Turn a run id or a path into a snapshot file.

    ``ref`` may be a snapshot file, a run's snapshot folder (then ``name`` inside it, falling back
    to ``last.pt``), or the id of an earlier run of ``experiment`` (looked up under ``root``).
    """
    if ref in (None, ""):
        raise ValueError("no snapshot given: pass a run id or a snapshot path")
    candidates = [Path(str(ref)), snapshot_dir(experiment, ref, root)]
    for cand in candidates:
        if cand.is_file():
            return cand
        for fname in (name, "last.pt"):
            if (cand / fname).is_file():
                return cand / fname
    tried = ", ".join(str(c) for c in candidates)
    runs = sorted((p.name for p in (Path(root) / experiment).glob("*") if p.is_dir()),
                  key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    known = f" Runs with snapshots under {Path(root) / experiment}: {', '.join(runs)}." if runs else ""
    raise FileNotFoundError(f"Cannot find a snapshot for {ref!r} (tried {tried}).{known}")
