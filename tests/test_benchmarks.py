"""The benchmark commands still run (tiny settings); what they print is measured, never asserted."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_early_exit_benchmark_writes_a_row_per_backbone_budget_and_batch(tmp_path):
    torch.set_num_threads(1)
    csv = tmp_path / "early_exit.csv"
    script("early_exit").main(["--archs", "resnet8", "resnet56_bottleneck", "--budgets", "0.6", "0.8",
                               "--batch", "16", "--samples", "2", "--repeats", "1", "--shape", "3", "16", "16",
                               "--csv", str(csv)])
    table = pd.read_csv(csv)
    assert len(table) == 2 * 2 * 2 and set(table["batch"]) == {1, 16}
    assert (table["macs_ratio"] <= table["budget"] + 1e-9).all()  # the last prior within each budget


def test_throughput_benchmark_covers_every_setting(tmp_path):
    csv = tmp_path / "throughput.csv"
    script("throughput").main(["--arch", "resnet8", "--steps", "1", "--batch", "4", "--csv", str(csv)])
    table = pd.read_csv(csv)
    assert len(table) == 2 * 4 and set(table["mode"]) == {"train", "eval"}


def test_the_suite_writes_both_tables_in_one_run(tmp_path):
    torch.set_num_threads(1)
    script("suite").main(["--archs", "resnet8", "--shape", "3", "16", "16", "--batch", "8", "--samples", "2",
                          "--repeats", "1", "--steps", "1", "--no-compile", "--out", str(tmp_path)])
    early, throughput = pd.read_csv(tmp_path / "early_exit.csv"), pd.read_csv(tmp_path / "throughput.csv")
    assert len(early) == 3 * 2  # three budgets, batch 8 and batch 1
    assert set(throughput["arch"]) == {"resnet8", "loader: fashion_mnist quick"}
    assert {"images_per_sec", "peak_mb"} <= set(throughput.columns)
