"""Training and inference throughput of a multi-exit model, fp32 vs bf16 vs channels_last, side by side.

    python benchmarks/throughput.py                              # the Phuong quick-recipe MSDNet, Fashion-MNIST shape
    python benchmarks/throughput.py --preset phuong_cifar --shape 3 32 32 --classes 100 --batch 64
    python benchmarks/throughput.py --arch resnet20 --shape 3 32 32 --device auto

Prints images/s for every setting and the ratio to fp32; never asserts anything.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from experiments.engine.hardware import autocast, resolve_device, to_memory_format
from experiments.ingredients.model import msdnet_knobs
from experiments.ingredients.train import DEVICE_RULE
from experiments.multiexit_distillation import QUICK_MSDNET
from losses import ExitCrossEntropy
from models import create_model, list_models
from models.msdnet import MSDNET_PRESETS
from models.cost import synchronize

def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, or a one-line usage error."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build(args: argparse.Namespace) -> torch.nn.Module:
    kwargs = {}
    if args.arch == "msdnet":
        kwargs = msdnet_knobs(args.preset)
        if args.preset == "phuong_cifar" and args.shape == [1, 28, 28]:
            kwargs.update(QUICK_MSDNET)
    torch.manual_seed(0)
    return create_model(args.arch, num_classes=args.classes, in_channels=args.shape[0], image_size=args.shape[1],
                        **kwargs)


def images_per_second(model, device, amp: str, channels_last: bool, batch: int, shape, steps: int, train: bool) -> float:
    model = model.to(device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x = to_memory_format(torch.randn(batch, *shape, device=device), channels_last)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = ExitCrossEntropy()
    model.train(train)
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            synchronize(device)
            start = time.perf_counter()
        with torch.set_grad_enabled(train), autocast(device, amp):
            outputs = model(x)
            if train:
                loss = loss_fn(outputs, y)
        if train:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="msdnet", choices=list_models(), metavar="ARCH",
                        help="a registered architecture (%(choices)s)")
    parser.add_argument("--preset", default="phuong_cifar", choices=sorted(MSDNET_PRESETS),
                        help="MSDNet preset (arch msdnet)")
    parser.add_argument("--shape", type=positive_int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--classes", type=positive_int, default=10)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    problem = DEVICE_RULE(args.device)
    if problem:
        parser.error(f"argument --device: expected {problem}, got {args.device!r}")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    model = build(args)
    print(f"{args.arch} ({args.preset if args.arch == 'msdnet' else ''}) input {args.shape} batch {args.batch} "
          f"on {device}, {torch.get_num_threads()} threads")
    for mode in ("train", "eval"):
        base = None
        for amp, channels_last in itertools.product(("off", "bf16"), (False, True)):
            ips = images_per_second(model, device, amp, channels_last, args.batch, args.shape, args.steps, mode == "train")
            base = base or ips
            print(f"{mode:5s} amp={amp:4s} channels_last={channels_last!s:5s} {ips:8.1f} images/s  x{ips / base:.2f}")


if __name__ == "__main__":
    main()
