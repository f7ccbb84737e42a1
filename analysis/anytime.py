"""Anytime evaluation: the accuracy of every exit against its cumulative cost, from an exit record."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.exit_record import ExitRecord


def anytime_curve(record: ExitRecord) -> pd.DataFrame:
    """One row per exit (1-based ``exit``): cumulative ``macs``, ``params``, ``latency_ms`` and top-1
    ``val_acc`` / ``test_acc`` as fractions (``val_acc`` is NaN when the record has no validation split).
    """
    val_acc = record.accuracy("val") if len(record.val_targets) else np.full(record.num_exits, np.nan)
    return pd.DataFrame(
        {
            "exit": np.arange(1, record.num_exits + 1),
            "macs": np.asarray(record.macs, dtype=np.float64),
            "params": np.asarray(record.params, dtype=np.float64),
            "latency_ms": np.asarray(record.latency_ms, dtype=np.float64),
            "val_acc": np.asarray(val_acc, dtype=np.float64),
            "test_acc": np.asarray(record.accuracy("test"), dtype=np.float64),
        }
    )
