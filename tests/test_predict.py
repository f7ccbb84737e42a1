"""``python -m experiments.predict``: a finished run classified with real early exit gives the simulated
policy's accuracy and exit histogram, and bad input is one line."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.exit_record import ExitRecord
from experiments import eenet, predict
from experiments.tracking import RunFolderObserver
from models.runtime import ThresholdPolicy


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    saved, threads = eenet.ex.observers, torch.get_num_threads()
    eenet.ex.observers = [RunFolderObserver(str(root / "runs"))]
    torch.set_num_threads(1)
    try:
        run = eenet.ex.run(named_configs=["fast"], options={"--loglevel": "ERROR"},
                           config_updates={"stage": "train", "seed": 1,
                                           "train": {"snapshot_root": str(root / "snapshots"), "epochs": 3}})
    finally:
        eenet.ex.observers = saved
        torch.set_num_threads(threads)
    return root, run


def test_early_exit_prediction_matches_the_simulated_policy(trained, capsys):
    root, run = trained
    args = [run.info["uid"], "--experiment", "eenet", "--snapshot-root", str(root / "snapshots"),
            "--runs", str(root / "runs"), "--budget", "0.7", "--device", "cpu"]
    assert predict.main(args) == 0
    out = capsys.readouterr().out
    record = ExitRecord.load(Path(run.info["snapshot_dir"]) / "exit_record.npz")
    policy = ThresholdPolicy.from_record(record, budget=0.7 * float(record.macs[-1]))
    exits = policy.simulate(record.test_logits)
    correct = record.test_logits.argmax(-1)[exits, np.arange(len(exits))] == record.test_targets
    accuracy = float(re.search(r"top-1 ([\d.]+) %", out).group(1))
    assert accuracy == pytest.approx(100 * correct.mean(), abs=0.01)
    shares = [float(v) for v in re.findall(r"\d: ([\d.]+) %", out.split("exits: ")[1].splitlines()[0])]
    assert shares == pytest.approx(100 * np.bincount(exits, minlength=3) / len(exits), abs=0.06)
    assert "speed-up x" in out


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0.01"], r"--budget must lie in \[0\.\d+, 1\]"),
    (["--fixed-exit", "7"], r"--fixed-exit must be in 0\.\.2"),
])
def test_bad_input_is_one_line(trained, capsys, extra, message):
    root, run = trained
    assert predict.main([run.info["uid"], "--experiment", "eenet", "--snapshot-root", str(root / "snapshots"),
                         *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "\n" not in err


def test_an_unknown_run_is_one_line(trained, capsys):
    root, _ = trained
    assert predict.main(["nope", "--experiment", "eenet", "--snapshot-root", str(root / "snapshots"),
                         "--budget", "0.5"]) == 2
    assert "no eenet run 'nope'" in capsys.readouterr().err


def test_a_folder_of_images_is_classified_one_line_each(trained, tmp_path, capsys):
    from PIL import Image

    root, run = trained
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert predict.main([run.info["uid"], "--experiment", "eenet", "--snapshot-root", str(root / "snapshots"),
                         "--fixed-exit", "1", "--images", str(folder)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("img")]
    assert len(lines) == 3 and all(", exit 2, " in line for line in lines)
