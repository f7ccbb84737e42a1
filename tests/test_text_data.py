"""Tests of the text datasets (AG News, SST-2): files, EENet's splits, SST-2 test labels, padding, resume, errors.

No network: a tiny WordPiece tokenizer and tiny parquet/csv files are written to tmp dirs, and every
error case runs with download=False.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import data
from data.text import TextLoader, encode, load_tokenizer, read_text_sets
from experiments import multiexit_distillation
from experiments.validation import ConfigError, rules_of, validate_run, validate_updates
from conftest import AG_TEST, AG_TRAIN, SST_TRAIN  # the sizes of the text files conftest writes

def assert_one_line(err: BaseException) -> None:
    """A user-facing error: one line, no chained exception shown under it."""
    assert "\n" not in str(err)
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__


@pytest.fixture(scope="module")
def root(text_root):
    return text_root


def build(name, root, tokenizer_dir, **kwargs):
    options = dict(root=root, tokenizer=tokenizer_dir, download=False, batch_size=8, eval_batch_size=5,
                   val_size=12, loader_seed=0)
    return data.build_data(name, **{**options, **kwargs})


@pytest.fixture(scope="module")
def ag(root, tokenizer_dir):
    return build("AG-News", root, tokenizer_dir)


# ---------------------------------------------------------------------------------------------- splits


def test_ag_news_val_is_the_last_val_size_of_the_seeded_permutation(ag, root, tokenizer_dir):
    perm = np.random.default_rng(0).permutation(AG_TRAIN)
    np.testing.assert_array_equal(ag.split["val"], np.sort(perm[-12:]))
    np.testing.assert_array_equal(ag.split["train"], np.sort(perm[:-12]))
    assert (ag.train.dataset_size, ag.val.dataset_size, ag.test.dataset_size) == (48, 12, AG_TEST)
    assert ag.val.targets.tolist() == (ag.split["val"] % 4).tolist()
    again = build("ag_news", root, tokenizer_dir)
    other = build("ag_news", root, tokenizer_dir, split_seed=1)
    np.testing.assert_array_equal(again.split["val"], ag.split["val"])
    assert not np.array_equal(other.split["val"], ag.split["val"])
    assert build("ag_news", root, tokenizer_dir, val_size=0).val is None


def test_a_saved_split_file_reproduces_the_split(ag, root, tokenizer_dir, tmp_path):
    path = data.save_split(ag.split, tmp_path / "ag_split")
    reused = build("ag_news", root, tokenizer_dir, split_file=str(path), split_seed=7)
    for key in ("train", "val"):
        np.testing.assert_array_equal(reused.split[key], ag.split[key])
    assert reused.val.targets.tolist() == ag.val.targets.tolist()


def test_bundle_facts(ag, root, tokenizer_dir):
    assert (ag.name, ag.num_classes, ag.max_length, ag.input_shape()) == ("ag_news", 4, 512, (512,))
    sst = build("SST-2", root, tokenizer_dir, max_length=6)
    assert (sst.name, sst.num_classes, sst.input_shape()) == ("sst2", 2, (6,))


def test_sst2_uses_glue_validation_and_restores_test_labels(root, tokenizer_dir):
    sst = build("sst2", root, tokenizer_dir, val_size=5000)  # val_size does not apply to SST-2
    assert (sst.train.dataset_size, sst.val.dataset_size, len(sst.split["val"])) == (SST_TRAIN, 3, 0)
    assert sst.val.targets.tolist() == [1, 0, 0]
    assert sst.test.targets.tolist() == [1, 0, 1]


def test_n_per_class_keeps_that_many_per_class_before_splitting(root, tokenizer_dir):
    ag = build("ag_news", root, tokenizer_dir, n_per_class=5, val_size=8)
    kept = np.concatenate([ag.split["train"], ag.split["val"]])
    assert np.bincount(kept % 4).tolist() == [5, 5, 5, 5] and len(ag.split["val"]) == 8
    sst = build("sst2", root, tokenizer_dir, n_per_class=4)
    assert np.bincount(sst.split["train"] % 2).tolist() == [4, 4]
    assert sst.train.targets.bincount().tolist() == [4, 4]


# ---------------------------------------------------------------------------------------------- batches


def test_batches_are_int64_padded_with_zero_at_the_end(ag, root, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir, download=False)
    texts = pd.read_parquet(f"{root}/ag_news/train.parquet")["text"].tolist()
    expected = tok(texts)["input_ids"]
    for x, y in ag.train:
        assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.dim() == 2 and len(x) == len(y)
        rows = ag.train.batch_indices.tolist()
        lengths = [len(expected[i]) for i in rows]
        assert x.shape[1] == max(lengths)
        for row, i, n in zip(x.tolist(), rows, lengths):
            assert row[:n] == expected[i] and row[n:] == [0] * (x.shape[1] - n)
            assert 0 not in row[:n]


def test_truncation_at_max_length(root, tokenizer_dir):
    sst = build("sst2", root, tokenizer_dir, max_length=4)
    widths = [x.shape[1] for x, _ in sst.train]
    assert max(widths) == 4 and all(w <= 4 for w in widths)
    x, _ = next(iter(sst.test))
    assert x[:, -1].tolist() == [3, 3, 3]  # truncated rows still end in [SEP]


def test_rows_left_out_are_never_tokenised(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir, download=False)
    tokens = encode(tok, ["good fun", "bad", "the plot"], max_length=512, rows=[0, 2])
    assert tokens.lengths.tolist() == [4, 0, 4]
    loader = TextLoader(tokens, torch.tensor([1, 0, 1]), batch_size=2, indices=[0, 2])
    x, y = next(iter(loader))
    assert x.tolist() == [[2, 13, 23, 3], [2, 5, 22, 3]] and y.tolist() == [1, 1]


def test_csv_text_na_stays_text(root):
    assert read_text_sets("ag_news", Path(root), download=False)["test"].texts[0] == "NA"


def test_exact_resume_mid_epoch(ag):
    loader = ag.train
    for _ in loader:  # a whole epoch first, so the resumed one is not the first
        pass
    state, seen = None, []
    for b, (x, y) in enumerate(loader):
        seen.append((x.clone(), y.clone()))
        if b == 2:
            state = loader.state_dict()
    restored = TextLoader(loader.tokens, loader.labels, loader.batch_size, indices=loader.indices, shuffle=True,
                          seed=123)
    restored.load_state_dict(state)
    rest = [(x.clone(), y.clone()) for x, y in restored]
    assert len(rest) == len(seen) - 3
    for (xa, ya), (xb, yb) in zip(seen[3:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(loader) == 6 and loader.dataset_size == 48


# ---------------------------------------------------------------------------------------------- errors


def test_missing_folder_is_one_line_naming_the_files(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError) as info:
        build("ag_news", str(tmp_path), tokenizer_dir)
    assert "train.parquet, test.parquet" in str(info.value) and str(tmp_path / "ag_news") in str(info.value)
    assert_one_line(info.value)
    with pytest.raises(FileNotFoundError) as info:
        build("sst2", str(tmp_path), tokenizer_dir)
    assert "validation.parquet" in str(info.value) and "test.tsv" in str(info.value)
    assert_one_line(info.value)


def test_missing_tokenizer_is_one_line(root, tmp_path):
    with pytest.raises(OSError) as info:
        build("ag_news", root, str(tmp_path / "no_tokenizer"))
    assert "no_tokenizer" in str(info.value) and "save_pretrained" in str(info.value)
    assert_one_line(info.value)


def test_missing_sst2_test_labels_is_one_line(root, tokenizer_dir, tmp_path):
    (tmp_path / "sst2").mkdir()
    for split in ("train", "validation", "test"):
        (tmp_path / "sst2" / f"{split}.parquet").write_bytes((Path(root) / "sst2" / f"{split}.parquet").read_bytes())
    with pytest.raises(FileNotFoundError) as info:
        build("sst2", str(tmp_path), tokenizer_dir)
    assert str(tmp_path / "sst2" / "test.tsv") in str(info.value) and "sentence<TAB>label" in str(info.value)
    assert_one_line(info.value)


# ---------------------------------------------------------------------------------------------- config


def check(updates: dict) -> None:
    """Validate as tests/test_validation.py does: the updates, then the run sacred creates from them."""
    rules = rules_of(multiexit_distillation.NAME)
    validate_updates(updates, rules)
    ex = multiexit_distillation.ex
    validate_run(type(ex)._create_run(ex, named_configs=["fast"], config_updates=updates), rules)


@pytest.mark.parametrize("name", ["ag_news", "AG-News", "sst2", "SST-2"])
def test_data_ingredient_accepts_text_datasets(name):
    check({"data.name": name, "data.tokenizer": "/models/bert", "data.max_length": 128})


def test_data_ingredient_rejects_a_bad_max_length():
    with pytest.raises(ConfigError, match="invalid data.max_length=1"):
        check({"data.max_length": 1})


# ---------------------------------------------------------------------------------------------- download


def test_download_saves_the_hub_splits_for_next_time(tmp_path, tokenizer_dir, monkeypatch):
    import datasets

    asked = []

    def fake_hub(*args):
        asked.append(args)
        rows = {"text": ["good news", "bad film", "tech world", "sport fun"] * 3, "label": [0, 1, 2, 3] * 3}
        return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows) for split in ("train", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    ag = build("ag_news", str(tmp_path), tokenizer_dir, download=True, val_size=4)
    assert asked == [("fancyzhx/ag_news",)] and ag.train.dataset_size == 8 and ag.test.dataset_size == 12
    assert sorted(p.name for p in (tmp_path / "ag_news").iterdir()) == ["test.parquet", "train.parquet"]
    build("ag_news", str(tmp_path), tokenizer_dir, download=True, val_size=4)
    assert len(asked) == 1  # read from the saved files


def test_failed_download_is_one_line_naming_the_files(tmp_path, tokenizer_dir, monkeypatch):
    import datasets

    def offline(*args):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError) as info:
        build("sst2", str(tmp_path), tokenizer_dir, download=True)
    message = str(info.value)
    assert "nyu-mll/glue/sst2" in message and "ConnectionError: no network" in message and "test.tsv" in message
    assert_one_line(info.value)
