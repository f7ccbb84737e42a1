"""Training and inference throughput of multi-exit models, fp32 vs bf16 vs channels_last (vs compiled), side by side.

    python benchmarks/throughput.py                              # the Phuong quick-recipe MSDNet, Fashion-MNIST shape
    python benchmarks/throughput.py --preset phuong_cifar --shape 3 32 32 --classes 100 --batch 64
    python benchmarks/throughput.py --arch resnet20 resnet56_bottleneck timm/resnet18 --shape 3 32 32 --compile
    python benchmarks/throughput.py --loader --csv figures/throughput.csv

Prints images/s for every setting, the ratio to fp32 and the peak memory (CUDA: peak allocated by the setting;
CPU: the process's peak resident set so far, which only grows), and with ``--loader`` the images/s of the quick
recipes' training loader (Fashion-MNIST, augmented, batch 64) next to the model's training step. Never asserts
anything.
"""
from __future__ import annotations

import argparse
import itertools
import resource
import time
from pathlib import Path

import pandas as pd

import torch

from experiments.engine.hardware import autocast, resolve_device, to_memory_format
from experiments.ingredients.model import msdnet_knobs
from experiments.ingredients.train import DEVICE_RULE
from experiments.multiexit_distillation import QUICK_MSDNET
from losses import ExitCrossEntropy
from data import build_data
from models import create_model
from models.registry import is_known
from models.msdnet import MSDNET_PRESETS
from models.cost import synchronize

def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, or a one-line usage error."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def architecture(text: str) -> str:
    """argparse type: a registered architecture or ``timm/<name>``."""
    if not is_known(text):
        raise argparse.ArgumentTypeError(f"unknown architecture {text!r} (see models.list_models(), or timm/<name>)")
    return text


def build(args: argparse.Namespace, arch: str) -> torch.nn.Module:
    kwargs = {}
    if arch == "msdnet":
        kwargs = msdnet_knobs(args.preset)
        if args.preset == "phuong_cifar" and args.shape == [1, 28, 28]:
            kwargs.update(QUICK_MSDNET)
    torch.manual_seed(0)
    return create_model(arch, num_classes=args.classes, in_channels=args.shape[0], image_size=args.shape[1],
                        **kwargs)


def images_per_second(model, device, amp: str, channels_last: bool, batch: int, shape, steps: int, train: bool,
                      compiled: bool = False) -> float:
    model = model.to(device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x = to_memory_format(torch.randn(batch, *shape, device=device), channels_last)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = ExitCrossEntropy()
    model.train(train)
    forward = torch.compile(model, dynamic=False) if compiled else model
    for step in range(steps + 2):  # two warm-up steps (compiling happens in the first)
        if step == 2:
            synchronize(device)
            start = time.perf_counter()
        with torch.set_grad_enabled(train), autocast(device, amp):
            outputs = forward(x)
            if train:
                loss = loss_fn(outputs, y)
        if train:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set so far (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def settings(compile_too: bool) -> list[tuple[str, bool, bool]]:
    """(amp, channels_last, compiled) side by side: fp32 first, the baseline of the ratios."""
    plain = [(amp, cl, False) for amp, cl in itertools.product(("off", "bf16"), (False, True))]
    return plain + ([("off", False, True), ("bf16", False, True)] if compile_too else [])


def measure_arch(args: argparse.Namespace, arch: str, device: torch.device) -> list[dict]:
    model = build(args, arch)
    print(f"{arch} ({args.preset if arch == 'msdnet' else ''}) input {args.shape} batch {args.batch} "
          f"on {device}, {torch.get_num_threads()} threads")
    rows = []
    for mode in ("train", "eval"):
        base = None
        for amp, channels_last, compiled in settings(args.compile):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ips = images_per_second(model, device, amp, channels_last, args.batch, args.shape, args.steps,
                                    mode == "train", compiled)
            base = base or ips
            rows.append(dict(arch=arch, mode=mode, amp=amp, channels_last=channels_last, compiled=compiled,
                             images_per_sec=ips, ratio=ips / base, peak_mb=peak_memory_mb(device)))
            print(f"{mode:5s} amp={amp:4s} channels_last={channels_last!s:5s} compiled={compiled!s:5s} "
                  f"{ips:8.1f} images/s  x{ips / base:.2f}  peak {rows[-1]['peak_mb']:.0f} MB")
    return rows


def loader_images_per_second(device: torch.device) -> float:
    """One epoch of the quick recipes' training loader (Fashion-MNIST, 4 500 images, augmented, batch 64)."""
    bundle = build_data("fashion_mnist", n_per_class=500, val_size=500, batch_size=64, device=device, loader_seed=0)
    synchronize(device)
    start = time.perf_counter()
    seen = sum(len(y) for _, y in bundle.train)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", type=architecture, default=["msdnet"], metavar="ARCH",
                        help="registered architectures (models.list_models()) or timm/<name>")
    parser.add_argument("--preset", default="phuong_cifar", choices=sorted(MSDNET_PRESETS),
                        help="MSDNet preset (arch msdnet)")
    parser.add_argument("--shape", type=positive_int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--classes", type=positive_int, default=10)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (fp32 and bf16)")
    parser.add_argument("--loader", action="store_true", help="also the quick recipes' training loader")
    parser.add_argument("--csv", help="write the table here too")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    problem = DEVICE_RULE(args.device)
    if problem:
        parser.error(f"argument --device: expected {problem}, got {args.device!r}")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    rows = [row for arch in args.arch for row in measure_arch(args, arch, device)]
    if args.loader:
        ips = loader_images_per_second(device)
        print(f"quick recipes' training loader: {ips:.0f} images/s")
        rows.append(dict(arch="loader: fashion_mnist quick", mode="load", images_per_sec=ips))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
