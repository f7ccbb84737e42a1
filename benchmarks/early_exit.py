"""Does early exit save wall-clock time? The runtime against the full network, next to the MACs it spends.

    python benchmarks/early_exit.py                               # every default backbone, 3 budgets, batch 1 and 128
    python benchmarks/early_exit.py --archs msdnet resnet56 --budgets 0.5 --csv figures/early_exit.csv

For each backbone (random weights, BatchNorm statistics of the calibration batch, so confidences vary) and
each budget (a fraction of the full network's MACs), max-probability thresholds are fitted on a calibration
batch for the last geometric prior within the budget (``models.runtime.ThresholdPolicy.from_record``) and the
same batch is classified by the early-exit runtime and by the full network, interleaved, ``--repeats`` times;
medians are compared. The MACs ratio is the physical limit: a perfect runtime has time ratio = MACs ratio.
Batch 1 times one sample at a time over the first ``--samples`` of the batch. Prints a table and writes a
CSV; never asserts anything. Training throughput per precision is ``benchmarks/throughput.py``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.exit_record import ExitRecord
from experiments.engine.hardware import resolve_device
from experiments.ingredients.model import msdnet_knobs
from models import count_exit_costs, create_model
from models.cost import synchronize
from models.runtime import ThresholdPolicy, run_early_exit

HEADER = f"{'arch':>20} {'budget':>6} {'batch':>5} {'macs_ratio':>10} {'time_ratio':>10} {'early ms':>9} {'full ms':>9}"
ROW = ("{arch:>20} {budget:>6.2f} {batch:>5d} {macs_ratio:>10.3f} {time_ratio:>10.3f} {early_ms_per_sample:>9.3f} "
       "{full_ms_per_sample:>9.3f}")
DEFAULT_ARCHS = ("resnet20", "resnet56", "msdnet", "resnet56_bottleneck", "densenet121_cifar", "wrn28_2",
                 "vgg11_bn", "resnet18")


def build(arch: str, shape: tuple[int, ...], classes: int) -> torch.nn.Module:
    """A registered backbone with random weights (MSDNet: the CIFAR budgeted preset of the papers)."""
    knobs = msdnet_knobs("cifar_budgeted") if arch == "msdnet" else {}
    torch.manual_seed(0)
    return create_model(arch, num_classes=classes, in_channels=shape[0], image_size=shape[1], **knobs)


@torch.no_grad()
def calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """BatchNorm statistics of ``x``: random weights with running statistics of 0/1 saturate the softmax."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()(x)
    return model.eval()


@torch.no_grad()
def record_of(model: torch.nn.Module, x: torch.Tensor) -> ExitRecord:
    """An exit record of ``x`` for both splits (labels: the last exit's predictions), to fit thresholds on."""
    logits = torch.stack(model(x)).float().cpu().numpy()
    targets = logits[-1].argmax(-1)
    macs = np.asarray(count_exit_costs(model, tuple(x.shape[1:])).macs)
    return ExitRecord(logits, targets, logits, targets, macs, macs, np.full(len(macs), np.nan))


def seconds(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def compare(model, x: torch.Tensor, policy, device: torch.device, repeats: int, per_sample: bool) -> tuple:
    """Median wall time of the runtime and of the full network on ``x`` (one sample at a time if asked)."""
    chunks = list(x.split(1)) if per_sample else [x]

    def early():
        for chunk in chunks:
            run_early_exit(model, chunk, policy, keep_logits=False)

    def full():
        with torch.inference_mode():
            for chunk in chunks:
                model(chunk)

    early(), full()  # warm-up (and the runtime's one-off MAC count)
    times = [(seconds(early, device), seconds(full, device)) for _ in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def measure(arch: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    model = build(arch, tuple(args.shape), args.classes).to(device)
    x = torch.randn(args.batch, *args.shape, device=device) * 2
    model = calibrated(model, x)
    record = record_of(model, x)
    rows = []
    for budget in args.budgets:
        policy = ThresholdPolicy.from_record(record, budget=budget * float(record.macs[-1]))
        spent = run_early_exit(model, x, policy, keep_logits=False).macs_spent.double().mean().item()
        for batch, per_sample in ((args.batch, False), (1, True)):
            inputs = x[:args.samples] if per_sample else x
            early, full = compare(model, inputs, policy, device, args.repeats, per_sample)
            rows.append({"arch": arch, "budget": budget, "batch": batch, "macs_ratio": spent / record.macs[-1],
                         "time_ratio": early / full, "early_ms_per_sample": 1e3 * early / len(inputs),
                         "full_ms_per_sample": 1e3 * full / len(inputs)})
        for row in rows[-2:]:
            print(ROW.format(**row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7, 0.9],
                        help="fractions of the full network's MACs")
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=32, help="samples timed one by one at batch 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--csv", default="early_exit.csv")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads; time_ratio = runtime / full network "
          f"(median of {args.repeats}), macs_ratio = MACs spent / full MACs; ms per sample")
    print(HEADER)
    rows = [row for arch in args.archs for row in measure(arch, args, device)]
    table = pd.DataFrame(rows)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.csv, index=False)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
