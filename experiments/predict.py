"""Classify with real early exit: a finished run's network, its exit policy, a dataset split.

    python -m experiments.predict <uid|run id|snapshot path> --budget 0.5 [--experiment imta] [--split test]
    python -m experiments.predict <run> --fixed-exit 2          # everyone leaves at exit 2 (0-based)
    python -m experiments.predict <run> --budget 0.5 --images photos/   # a folder of images, one line each
    python -m experiments.predict <uid> --experiment jei --gates        # a JEI-DNN run's own learned gates

The run's snapshot gives the network and its data split; its exit record's validation logits fit the
thresholds (``models.runtime.ThresholdPolicy.from_record``) for a budget given as a fraction of the full
network's MACs. The split is classified batch by batch twice, side by side: by the early-exit runtime
(samples that exit are not computed further) and by the full network, and the command prints accuracy, the
exit histogram, the MACs spent and the measured speed-up. A JEI-DNN ``stage=dynn`` run is rebuilt as its frozen
backbone with its new exits, and ``--gates`` exits by its gates. Other networks that a run built around a
registered architecture (a teacher for a student, IMTA's stage 2) are not rebuilt here: run their parent or student.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from analysis.exit_record import FILENAME, ExitRecord
from experiments.engine.hardware import resolve_device
from experiments.ingredients import data as data_ing
from experiments.ingredients import model as model_ing
from experiments.references import FileStore, RunReferenceError, resolve_run
from data.batch_ops import normalize_uint8
from data.batch_ops import resize_square
from models.cost import synchronize
from models.jei import GatedExits
from models.multiexit import MultiExitNetwork
from models.runtime import CONFIDENCES, FixedExitPolicy, JEIPolicy, ThresholdPolicy, run_early_exit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="uid (or unique prefix), run id, or snapshot path of a finished run")
    parser.add_argument("--experiment", default="multiexit_distillation",
                        help="experiment of the run (default multiexit_distillation; imta, eenet, dih)")
    policy = parser.add_mutually_exclusive_group(required=True)
    policy.add_argument("--budget", type=float, help="average MACs per sample as a fraction of the full network's")
    policy.add_argument("--fixed-exit", type=int, help="every sample leaves at this exit (0-based)")
    policy.add_argument("--gates", action="store_true", help="a JEI-DNN run's learned gates (experiment jei)")
    parser.add_argument("--confidence", default="max_prob", choices=sorted(CONFIDENCES))
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--images", help="a folder of images (png, jpg, ...) to classify instead of a split")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the run's eval batch size)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--snapshot-root", default="snapshots")
    parser.add_argument("--runs", default="runs", help="runs folder that resolves run ids (default runs)")
    return parser.parse_args(argv)


def network_weights(snapshot: dict) -> dict:
    """The multi-exit network's weights: a student's when the run trained one next to its teacher."""
    weights = snapshot["model"]
    student = {k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")}
    return student or weights


def load_network(snapshot: dict, num_classes: int, bundle, device: torch.device) -> MultiExitNetwork:
    """The run's network rebuilt from its recorded model config, or one clear line why it cannot be."""
    config = snapshot["meta"]["model"]  # a student run records the student's; a JEI run its backbone's
    net = model_ing.build(config, num_classes, bundle.in_channels, bundle.image_size)
    if any(k.startswith("gates.") for k in snapshot["model"]):  # JEI-DNN: the frozen backbone, new exits, gates
        net = GatedExits(net, bundle.input_shape())
    try:
        net.load_state_dict(network_weights(snapshot))
    except RuntimeError as err:
        raise RunReferenceError(f"this run's network is not a plain {config['arch']} (variant "
                                f"{snapshot['meta'].get('variant')!r}), which predict cannot rebuild: "
                                f"{str(err).splitlines()[0]}") from None
    return net.to(device).eval()


def policy_for(args: argparse.Namespace, record: ExitRecord, net: MultiExitNetwork):
    """Thresholds for the budget (fitted on the record's validation logits), a fixed exit, or a JEI run's gates."""
    if args.gates:
        if not isinstance(net, GatedExits):
            raise ValueError("--gates needs a JEI-DNN stage=dynn run (--experiment jei): this run has no gates")
        return JEIPolicy(net.gates)
    if args.fixed_exit is not None:
        if not 0 <= args.fixed_exit < record.num_exits:
            raise ValueError(f"--fixed-exit must be in 0..{record.num_exits - 1}, got {args.fixed_exit}")
        return FixedExitPolicy(args.fixed_exit)
    low = record.macs[0] / record.macs[-1]
    if not low <= args.budget <= 1:
        raise ValueError(f"--budget must lie in [{low:.3f}, 1] (exit 1's share of the full MACs, and all of it), "
                         f"got {args.budget}")
    return ThresholdPolicy.from_record(record, budget=args.budget * float(record.macs[-1]),
                                       confidence=args.confidence)


def timed(fn, device: torch.device) -> tuple[object, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def classify(net: MultiExitNetwork, loader, policy, device: torch.device) -> dict:
    """Run the split through the runtime and the full network, batch by batch, side by side."""
    exits, correct, macs, seconds = [], [], [], {"early": 0.0, "full": 0.0}
    for x, y in tqdm(loader, desc="classifying", file=sys.stderr, leave=False):
        result, t_early = timed(lambda: run_early_exit(net, x, policy, keep_logits=False), device)
        _, t_full = timed(lambda: run_early_exit(net, x, FixedExitPolicy(net.num_exits - 1), keep_logits=False),
                          device)
        seconds["early"] += t_early
        seconds["full"] += t_full
        exits.append(result.exit_index.cpu())
        correct.append((result.predictions.cpu() == y.cpu()))
        macs.append(result.macs_spent.double().cpu())
    return {"exit_index": torch.cat(exits).numpy(), "correct": torch.cat(correct).numpy(),
            "macs": torch.cat(macs).numpy(), **seconds}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_images(folder: str, loader) -> tuple[list[str], torch.Tensor]:
    """The folder's images as the run's inputs: its channels and size, normalised as its test split is."""
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    if not hasattr(loader, "images"):
        raise ValueError("--images needs a run on an in-memory image dataset (its normalisation and size are known)")
    channels, size = loader.images.shape[1], loader.images.shape[2]
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(Image.open(p).convert(mode).resize((size, size))) for p in paths]
    batch = torch.from_numpy(np.stack(arrays)).reshape(len(paths), size, size, channels).permute(0, 3, 1, 2)
    x = normalize_uint8(batch.contiguous().to(loader.device), loader.mean, loader.std)
    return [p.name for p in paths], x if loader.resize is None else resize_square(x, loader.resize)


def classify_images(net: MultiExitNetwork, names: list[str], x: torch.Tensor, policy) -> str:
    """One line per image: its class index, the exit it left at and the MACs it cost."""
    result = run_early_exit(net, x, policy, keep_logits=False)
    return "\n".join(f"{name}: class {int(c)}, exit {int(k) + 1}, {m / 1e6:.3f} MMACs"
                     for name, c, k, m in zip(names, result.predictions, result.exit_index, result.macs_spent))


def report(out: dict, record: ExitRecord) -> str:
    n, k = len(out["correct"]), record.num_exits
    histogram = np.bincount(out["exit_index"], minlength=k) / n
    lines = [f"{n} samples: top-1 {100 * out['correct'].mean():.2f} %",
             "exits: " + "  ".join(f"{j + 1}: {100 * f:.1f} %" for j, f in enumerate(histogram)),
             f"MACs per sample: {out['macs'].mean() / 1e6:.3f} M of {record.macs[-1] / 1e6:.3f} M "
             f"({100 * out['macs'].mean() / record.macs[-1]:.1f} %)",
             f"wall time: {out['early']:.2f} s early exit vs {out['full']:.2f} s full network "
             f"(speed-up x{out['full'] / max(out['early'], 1e-9):.2f})"]
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    if args.gates:
        return "JEI-DNN's gates"
    return f"fixed exit {args.fixed_exit}" if args.fixed_exit is not None else f"budget {args.budget:g}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stores = [FileStore(args.runs)] if Path(args.runs).is_dir() else []
        run = resolve_run(args.run, args.experiment, args.snapshot_root, stores)
        record = ExitRecord.load(run.snapshot.parent / FILENAME)
        device = resolve_device(args.device)
        data = {**run.contents["meta"]["data"], "split_file": str(run.snapshot.parent / "split.npz")}
        if args.batch:
            data["eval_batch_size"] = args.batch
        bundle = data_ing.build(data, device, seed=0)
        net = load_network(run.contents, bundle.num_classes, bundle, device)
        policy = policy_for(args, record, net)
        images = load_images(args.images, bundle.test) if args.images else None
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if images is not None:
        print(classify_images(net, *images, policy))
        return 0
    loader = bundle.test if args.split == "test" else bundle.val
    print(f"run {run.uid} ({run.contents['meta'].get('variant')}), {args.split} split, "
          f"{describe(args)}")
    print(report(classify(net, loader, policy, device), record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
