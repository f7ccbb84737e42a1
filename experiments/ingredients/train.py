"""The ``train`` ingredient: how long, where, in which precision, and what to keep."""
from __future__ import annotations

from sacred import Ingredient

from experiments.engine.hardware import AMP_MODES
from experiments.engine.trainer import COMPILE_MODES, SELECT_MODES
from experiments.ingredients import ingredient
from experiments.validation import boolean, choice, either, integer, matches, optional, scoped, string


def train_config():
    epochs = 300  # training epochs
    device = "auto"  # auto (CUDA when available), cpu, cuda, cuda:1, ...
    amp = "off"  # mixed precision: off, bf16 or fp16 (fp16 on CUDA only)
    channels_last = False  # NHWC memory format (faster convolutions with bf16/fp16)
    select = "best_val"  # best mean-over-exits validation top-1 (best_val), last, or lowest_test_loss (released DIH)
    snapshot_root = "snapshots"  # snapshots go to <snapshot_root>/<experiment>/<run id>/{last,best}.pt
    resume = None  # a last.pt (or its run folder) of an interrupted run to continue from
    latency_batch = 64  # batch size of the per-exit latency measurement (0: skip)
    progress = True  # tqdm progress bar per epoch
    threads = None  # torch intra-op threads (None: what this process may use, honouring OMP_NUM_THREADS and CPU affinity)
    sync_bn = False  # under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm) instead of per rank
    compile = "off"  # torch.compile the model: off, default, max-autotune, reduce-overhead (CUDA graphs, CUDA only)
    locals()  # sacred reads these names; this line tells linters they are used


# A snapshot reference: a run id of this experiment, or the path of a snapshot file or of its run folder.
SNAPSHOT_REF = optional(either(string, integer(min=1)))

DEVICE_RULE = matches(r"auto|cpu|mps|cuda(:\d+)?", "one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
RULES = scoped("train", dict(
    epochs=integer(min=1),
    device=DEVICE_RULE,
    amp=choice(*AMP_MODES),
    channels_last=boolean,
    select=choice(*SELECT_MODES),
    snapshot_root=string,
    resume=SNAPSHOT_REF,
    latency_batch=integer(min=0),
    progress=boolean,
    threads=optional(integer(min=1)),
    sync_bn=boolean,
    compile=choice(*COMPILE_MODES),
))

FAST = dict(epochs=2, latency_batch=4, progress=False, threads=1)


def train_ingredient(**defaults) -> Ingredient:
    """A ``train`` ingredient whose defaults are the paper's; ``train.fast`` runs two epochs."""
    return ingredient("train", train_config, defaults, {"fast": FAST})
