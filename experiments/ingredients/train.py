"""The ``train`` ingredient: how long, where, in which precision, and what to keep."""
from __future__ import annotations

from sacred import Ingredient

from experiments.ingredients import ingredient


def train_config():
    epochs = 300  # training epochs
    device = "auto"  # auto (CUDA when available), cpu, cuda, cuda:1, ...
    amp = "off"  # mixed precision: off, bf16 or fp16 (fp16 on CUDA only)
    channels_last = False  # NHWC memory format (faster convolutions with bf16/fp16)
    select = "best_val"  # keep the best mean-over-exits validation top-1 (best_val) or the last weights
    snapshot_root = "snapshots"  # snapshots go to <snapshot_root>/<experiment>/<run id>/{last,best}.pt
    resume = None  # a last.pt (or its run folder) of an interrupted run to continue from
    latency_batch = 64  # batch size of the per-exit latency measurement (0: skip)
    progress = True  # tqdm progress bar per epoch
    locals()  # sacred reads these names; this line tells linters they are used


FAST = dict(epochs=2, latency_batch=4, progress=False)


def train_ingredient(**defaults) -> Ingredient:
    """A ``train`` ingredient whose defaults are the paper's; ``train.fast`` runs two epochs."""
    return ingredient("train", train_config, defaults, {"fast": FAST})
