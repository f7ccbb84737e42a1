"""The exit record: the one artifact every run writes and every curve is rebuilt from.

It holds per-exit logits and targets for the validation and test splits plus per-exit cumulative
cost (multiply-adds, parameters) and measured latency. Stored as ``exit_record.npz`` (plain numpy,
readable without torch or the model code) next to the run's other sacred artifacts.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FILENAME = "exit_record.npz"
NPZ = "application/octet-stream"  # content type of .npz artifacts (sacred cannot guess it)
_ARRAYS = ("val_logits", "val_targets", "test_logits", "test_targets", "macs", "params", "latency_ms")


@dataclass
class ExitRecord:
    """Per-exit outputs and costs of one trained network.

    Attributes:
        val_logits: [K, N_val, C] float32 logits of every exit on the validation split.
        val_targets: [N_val] int64 labels.
        test_logits: [K, N_test, C] float32 logits on the test split.
        test_targets: [N_test] int64 labels.
        macs: [K] cumulative multiply-adds up to and including exit k (earlier heads included).
        params: [K] cumulative parameter count of every module executed up to exit k.
        latency_ms: [K] measured cumulative milliseconds per sample up to exit k (NaN if unknown).
        meta: free-form strings (device, batch size of the latency measurement, ...).
    """

    val_logits: np.ndarray
    val_targets: np.ndarray
    test_logits: np.ndarray
    test_targets: np.ndarray
    macs: np.ndarray
    params: np.ndarray
    latency_ms: np.ndarray
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = len(self.macs)
        for name in ("val_logits", "test_logits"):
            arr = getattr(self, name)
            if arr.ndim != 3 or arr.shape[0] != k:
                raise ValueError(f"{name} must be [K={k}, N, C], got shape {arr.shape}")
        if self.val_logits.shape[1] != len(self.val_targets) or self.test_logits.shape[1] != len(self.test_targets):
            raise ValueError("logits and targets disagree on the number of samples")

    @property
    def num_exits(self) -> int:
        return len(self.macs)

    def accuracy(self, split: str = "test") -> np.ndarray:
        """Top-1 accuracy of every exit on ``split`` ('val' or 'test'), as fractions."""
        logits, targets = self.split(split)
        return (logits.argmax(-1) == targets[None]).mean(axis=1)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(logits [K,N,C], targets [N]) of 'val' or 'test'."""
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        return getattr(self, f"{split}_logits"), getattr(self, f"{split}_targets")

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta_keys = np.array(list(self.meta.keys()), dtype=str)
        meta_vals = np.array([str(v) for v in self.meta.values()], dtype=str)
        np.savez_compressed(buf, **{n: getattr(self, n) for n in _ARRAYS}, meta_keys=meta_keys, meta_vals=meta_vals)
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ExitRecord":
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {n: z[n] for n in _ARRAYS}
            meta = dict(zip(z["meta_keys"].tolist(), z["meta_vals"].tolist()))
        return cls(**arrays, meta=meta)

    @classmethod
    def load(cls, path: str | Path) -> "ExitRecord":
        return cls.from_bytes(Path(path).read_bytes())
