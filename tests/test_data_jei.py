"""Tests of what JEI-DNN needs from the data package: CIFAR-100-LT, on-device resizing, unnormalised input.

CIFAR-100 is faked: full-size (50 000 / 10 000) pickles written to a temporary folder, whose image i
carries i in two pixels, so the images the LT selection keeps can be read back. Nothing is downloaded.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data.batch_ops import resize_square
from data.longtail import long_tail_counts, long_tail_indices
from experiments.ingredients import data as data_ing

TRAIN_PER_CLASS, TEST_PER_CLASS = 500, 100

# ---------------------------------------------------------------------------------------------- fake CIFAR-100


def _fake_cifar100_set(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows as in the CIFAR pickles (3 x 32 x 32, channel-major); labels in a random order."""
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(100), per_class))
    index = np.arange(len(labels))
    rows = np.zeros((len(labels), 3 * 32 * 32), dtype=np.uint8)
    rows[:, 0], rows[:, 1] = index % 256, index // 256  # red channel, pixels (0, 0) and (0, 1)
    return rows, labels


def _write_fake_cifar100(root: Path) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    labels = {}
    for name, per_class, seed in (("train", TRAIN_PER_CLASS, 1), ("test", TEST_PER_CLASS, 2)):
        rows, labels[name] = _fake_cifar100_set(per_class, seed)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "fine_labels": labels[name].tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c}" for c in range(100)]}, f)
    return labels


def _image_ids(images: torch.Tensor) -> np.ndarray:
    """The fake images' original indices, read back from their two marker pixels."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).numpy()


@pytest.fixture(scope="module")
def fake_cifar100(tmp_path_factory):
    """(root, official labels by set); torchvision's checksums are switched off for the fake files."""
    from torchvision.datasets import CIFAR100

    root = tmp_path_factory.mktemp("cifar")
    labels = _write_fake_cifar100(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CIFAR100, "train_list", [["train", None]])
        mp.setattr(CIFAR100, "test_list", [["test", None]])
        mp.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": None})
        yield root, labels


@pytest.fixture(scope="module")
def lt(fake_cifar100):
    root, _ = fake_cifar100
    return data.build_data("CIFAR-100-LT", root=str(root), download=False, val_size=1000, class_balanced=False,
                           batch_size=64, loader_seed=0)


def _reference_lt(labels: np.ndarray, n_max: int) -> np.ndarray:
    """JEI's selection re-done with NumPy's global generator: seed 0 once, then per class in label order
    shuffle its indices and keep the first floor(n_max * 0.01 ** (c / 99))."""
    saved = np.random.get_state()
    np.random.seed(0)
    kept = []
    for c in np.unique(labels):
        members = np.where(labels == c)[0]
        np.random.shuffle(members)
        kept.append(members[: math.floor(n_max * 0.01 ** (c / 99))])
    np.random.set_state(saved)
    return np.concatenate(kept)


# ---------------------------------------------------------------------------------------------- CIFAR-100-LT


def test_lt_names_and_spec():
    assert data.canonical_name("CIFAR-100-LT") == data.canonical_name("cifar100LT") == "cifar100_lt"
    lt_spec, full = data.get_spec("cifar100_lt"), data.get_spec("cifar100")
    assert (lt_spec.mean, lt_spec.std, lt_spec.pad, lt_spec.flip) == (full.mean, full.std, full.pad, full.flip)


def test_lt_counts_follow_the_exponential_profile(lt):
    hand = {n: [math.floor(n * 0.01 ** (c / 99)) for c in range(100)] for n in (TRAIN_PER_CLASS, TEST_PER_CLASS)}
    train = np.bincount(lt.train.labels.numpy(), minlength=100)
    test = np.bincount(lt.test.labels.numpy(), minlength=100)
    assert train.tolist() == hand[500] and test.tolist() == hand[100]
    assert (train.sum(), test.sum()) == (10847, 2131)
    assert (train[0], train[-1], test[0], test[-1]) == (500, 5, 100, 1)
    assert lt.num_classes == 100 and lt.image_size == 32
    assert long_tail_counts(50000, 100, 0.1)[::99] == [500, 50]  # any imbalance factor


def test_lt_keeps_the_images_the_reference_keeps(lt, fake_cifar100):
    _, labels = fake_cifar100
    for loader, official, n_max in ((lt.train, labels["train"], 500), (lt.test, labels["test"], 100)):
        expected = _reference_lt(official, n_max)
        np.testing.assert_array_equal(_image_ids(loader.images), expected)  # same images, same order
        np.testing.assert_array_equal(loader.labels.numpy(), official[expected])
        np.testing.assert_array_equal(long_tail_indices(official, 0.01), expected)


def test_lt_selection_leaves_numpy_global_state_alone():
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    long_tail_indices(np.repeat(np.arange(10), 20), 0.1)
    assert np.random.rand() == expected


def test_lt_validation_comes_from_the_lt_training_set(lt):
    assert (lt.train.dataset_size, lt.val.dataset_size, lt.test.dataset_size) == (9847, 1000, 2131)
    assert lt.split["train"].max() < 10847 and lt.split["val"].max() < 10847
    with pytest.raises(ValueError, match="smallest class has only 5"):  # why JEI's 1 000 is not class-balanced
        data.make_split(lt.train.labels.numpy(), val_size=1000, class_balanced=True)


def test_a_saved_lt_split_is_inherited(lt, fake_cifar100, tmp_path):
    root, _ = fake_cifar100
    path = data.save_split(lt.split, tmp_path / "split.npz")
    parent = dict(name="cifar100_lt", n_per_class=None, val_size=1000, class_balanced=False, split_seed=0)
    child = dict(name="cifar100", root=str(root), download=False, n_per_class=None, val_size=5000,
                 class_balanced=True, split_seed=9, split_file=None, batch_size=32, resize=None, normalize=True)
    config = data_ing.inherit_split(child, parent, path)
    assert (config["name"], config["val_size"], config["class_balanced"]) == ("cifar100_lt", 1000, False)
    second = data.build_data(**config, loader_seed=1)
    for key in ("train", "val"):
        np.testing.assert_array_equal(second.split[key], lt.split[key])
    torch.testing.assert_close(second.val.targets, lt.val.targets)
    assert second.test.dataset_size == 2131


# ---------------------------------------------------------------------------------------------- resize


def _synthetic(**options) -> data.DataBundle:
    return data.build_data("synthetic", val_size=32, batch_size=32, eval_batch_size=50, loader_seed=3, **options)


def test_training_batches_are_resized_after_augmentation():
    small, big = _synthetic(), _synthetic(resize=24)
    assert small.image_size == 16 and big.image_size == 24 and big.input_shape() == (3, 24, 24)
    (x16, y16), (x24, y24) = next(iter(small.train)), next(iter(big.train))
    assert x24.shape == (32, 3, 24, 24)
    torch.testing.assert_close(y24, y16)
    torch.testing.assert_close(x24, resize_square(x16, 24))  # same draws, resized afterwards


def test_eval_batches_are_resized_as_torchvision_resizes_pil_images():
    b = _synthetic(resize=24)
    mean, std = b.test.mean, b.test.std
    for loader, idx in ((b.val, b.split["val"]), (b.test, np.arange(b.test.dataset_size))):
        x = torch.cat([x for x, _ in loader])
        assert x.shape == (len(idx), 3, 24, 24)
        raw = loader.images[torch.as_tensor(idx)].permute(0, 2, 3, 1).numpy()
        pil = np.stack([np.asarray(Image.fromarray(im).resize((24, 24), Image.BILINEAR)) for im in raw])
        expected = torch.from_numpy(pil).permute(0, 3, 1, 2).float()
        torch.testing.assert_close((x * std + mean) * 255, expected, atol=1.01, rtol=0)  # PIL rounds to uint8


def test_resize_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(ValueError, match="in-memory image datasets only"):
        data.build_data("imagenet", root=str(tmp_path), resize=224)


# ---------------------------------------------------------------------------------------------- normalize


def test_unnormalised_batches_are_pixels_over_255():
    b = _synthetic(normalize=False)
    for loader, idx in ((b.val, torch.as_tensor(b.split["val"])), (b.test, torch.arange(b.test.dataset_size))):
        x = torch.cat([x for x, _ in loader])
        torch.testing.assert_close(x, loader.images[idx].float() / 255, atol=0, rtol=0)
    x, _ = next(iter(b.train))  # augmented: translation fills with black
    assert x.min() >= 0 and x.max() <= 1 and (x == 0).all(dim=1).any()


def test_the_ingredient_checks_the_new_options():
    rules = data_ing.RULES
    assert rules["data.resize"](None) is None and rules["data.resize"](224) is None
    assert rules["data.resize"](0) and rules["data.resize"](2.5)
    assert rules["data.normalize"](False) is None and rules["data.normalize"]("no")
