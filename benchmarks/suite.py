"""Every benchmark in one run, side by side: does early exit save time, and how fast does each backbone train?

    python benchmarks/suite.py                       # every default backbone; about 9 minutes on 2 CPU cores
    python benchmarks/suite.py --archs msdnet resnet56 --out figures/benchmarks

1. Executed early exit against the full network at three budgets, batch 128 and batch 1, next to the MACs ratio
   (``benchmarks/early_exit.py``).
2. Training and evaluation images/s of each backbone in fp32, bf16, channels_last and compiled, with peak memory
   (``benchmarks/throughput.py``: CUDA's peak allocation, or on CPU the process's peak RSS so far).
3. The quick recipes' training loader against the model steps (its images/s in the throughput table).

Both tables are printed and written as CSV files into ``--out``; nothing is asserted. Measure on a quiet machine:
under parallel load the numbers say little.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    early_exit = benchmark("early_exit")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(early_exit.DEFAULT_ARCHS))
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    parser.add_argument("--batch", type=int, default=128, help="the early-exit batch (training uses 64)")
    parser.add_argument("--samples", type=int, default=32, help="samples timed one by one at batch 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed training / evaluation steps per setting")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled settings")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks_out", help="folder of early_exit.csv and throughput.csv")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shape = [str(s) for s in args.shape]
    started = time.perf_counter()
    print("== 1. executed early exit against the full network ==", flush=True)
    early_exit.main(["--archs", *args.archs, "--shape", *shape, "--batch", str(args.batch), "--samples",
                     str(args.samples), "--repeats", str(args.repeats), "--device", args.device,
                     "--csv", str(out / "early_exit.csv")])
    print("\n== 2-3. training and evaluation images/s, peak memory, the quick recipes' loader ==", flush=True)
    benchmark("throughput").main(["--arch", *args.archs, "--shape", *shape, "--steps", str(args.steps),
                                  "--device", args.device, "--loader", "--csv", str(out / "throughput.csv"),
                                  *([] if args.no_compile else ["--compile"])])
    print(f"\nall benchmarks in {time.perf_counter() - started:.0f} s; tables in {out}", flush=True)


if __name__ == "__main__":
    main()
