"""Tests of the data package: splits, split files, in-memory loaders, datasets, errors, image folders.

No network: real datasets are only read from files already on the machine (Debian's Fashion-MNIST)
or from fakes written to tmp_path.
"""
from __future__ import annotations

import gzip
import io
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import data
from data import batch_ops, sources
from data.idx import read_idx
from data.memory import TensorLoader

# ---------------------------------------------------------------------------------------------- helpers


def balanced_labels(classes: int = 5, per_class: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


def assert_short_error(err: BaseException) -> None:
    """A user-facing error: no chained exception shown under it."""
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__


def collect(loader):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def synthetic():
    return data.build_data("synthetic", val_size=32, batch_size=32, eval_batch_size=50, loader_seed=0)


# ---------------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_for_a_seed_and_differs_for_another():
    labels = balanced_labels()
    a = data.make_split(labels, val_size=50, seed=1)
    b = data.make_split(labels, val_size=50, seed=1)
    c = data.make_split(labels, val_size=50, seed=2)
    np.testing.assert_array_equal(a["train"], b["train"])
    np.testing.assert_array_equal(a["val"], b["val"])
    assert not np.array_equal(a["val"], c["val"])


def test_split_does_not_touch_global_random_state():
    np.random.seed(123)
    torch.manual_seed(123)
    expected_np, expected_torch = np.random.rand(), torch.rand(1)
    np.random.seed(123)
    torch.manual_seed(123)
    data.make_split(balanced_labels(), val_size=50, seed=7)
    assert np.random.rand() == expected_np
    assert torch.equal(torch.rand(1), expected_torch)


def test_split_train_and_val_are_disjoint_and_cover_the_training_set():
    labels = balanced_labels()
    for balanced in (True, False):
        split = data.make_split(labels, val_size=50, class_balanced=balanced, seed=0)
        assert np.intersect1d(split["train"], split["val"]).size == 0
        np.testing.assert_array_equal(np.union1d(split["train"], split["val"]), np.arange(len(labels)))
        assert len(split["val"]) == 50
        assert split["train"].dtype == split["val"].dtype == np.int64


def test_class_balanced_validation_counts_are_exact():
    labels = balanced_labels(classes=5, per_class=40)
    split = data.make_split(labels, val_size=50, class_balanced=True, seed=3)
    np.testing.assert_array_equal(np.bincount(labels[split["val"]], minlength=5), [10] * 5)
    np.testing.assert_array_equal(np.bincount(labels[split["train"]], minlength=5), [30] * 5)


def test_n_per_class_counts_train_plus_val():
    labels = balanced_labels(classes=5, per_class=40)
    split = data.make_split(labels, val_size=25, n_per_class=15, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[split["val"]], minlength=5), [5] * 5)
    np.testing.assert_array_equal(np.bincount(labels[split["train"]], minlength=5), [10] * 5)
    assert np.intersect1d(split["train"], split["val"]).size == 0


def test_fractional_and_zero_val_size():
    labels = balanced_labels(classes=5, per_class=40)
    split = data.make_split(labels, val_size=0.25, n_per_class=20, seed=0)  # 25 % of the 100 kept
    assert len(split["val"]) == 25 and len(split["train"]) == 75
    none = data.make_split(labels, val_size=0, seed=0)
    assert len(none["val"]) == 0 and len(none["train"]) == len(labels)


def test_unbalanced_split_is_a_random_subset():
    labels = balanced_labels(classes=5, per_class=40)
    split = data.make_split(labels, val_size=37, class_balanced=False, seed=0)
    assert len(split["val"]) == 37 and len(split["train"]) == 163


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(val_size=51), "not divisible by the 5 classes"),
        (dict(val_size=200), "smallest class has only 40"),
        (dict(val_size=50, n_per_class=41), "fewer images"),
        (dict(val_size=1.5), "must lie in (0, 1)"),
        (dict(val_size=-1), ">= 0"),
        (dict(val_size=200, class_balanced=False), "leaves no training images"),
    ],
)
def test_impossible_splits_say_why(kwargs, message):
    with pytest.raises(ValueError) as info:
        data.make_split(balanced_labels(classes=5, per_class=40), **kwargs)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------- split files


def test_split_file_round_trip_reuses_the_same_indices(tmp_path):
    first = data.build_data("synthetic", val_size=40, split_seed=3, loader_seed=0)
    path = data.save_split(first.split, tmp_path / "runs" / "split")
    assert path.name == "split.npz" and path.is_file()
    loaded = data.load_split(path)
    np.testing.assert_array_equal(loaded["val"], first.split["val"])
    # Stage 2: different split arguments, but the file wins.
    second = data.build_data("synthetic", val_size=8, split_seed=99, split_file=str(path), loader_seed=0)
    np.testing.assert_array_equal(second.split["train"], first.split["train"])
    np.testing.assert_array_equal(second.split["val"], first.split["val"])
    assert second.val.dataset_size == 40


def test_split_file_with_indices_out_of_range_names_the_file(tmp_path):
    path = data.save_split({"train": np.arange(10), "val": np.array([300, 301])}, tmp_path / "other.npz")
    with pytest.raises(ValueError) as info:
        data.build_data("synthetic", split_file=str(path))
    assert str(path) in str(info.value) and "only 256 images" in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"train": np.arange(5)}, "missing ['val']"),
        ({"train": np.arange(5), "val": np.array([3, 7])}, "both 'train' and 'val'"),
        ({"train": np.array([1, 1, 2]), "val": np.array([5])}, "repeated"),
        ({"train": np.arange(5), "val": np.array([-1])}, "negative"),
        ({"train": np.arange(5.0), "val": np.array([6.0])}, "integer"),
    ],
)
def test_bad_split_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    with pytest.raises(ValueError) as info:
        data.load_split(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_unreadable_or_missing_split_file(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz split") as info:
        data.load_split(junk)
    assert str(junk) in str(info.value)
    assert_short_error(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_split(tmp_path / "absent.npz")


# ---------------------------------------------------------------------------------------------- loaders


def test_bundle_shapes_dtypes_and_lengths(synthetic):
    b = synthetic
    assert b.name == "synthetic" and b.num_classes == 4 and b.input_shape() == (3, 16, 16)
    assert (b.train.dataset_size, b.val.dataset_size, b.test.dataset_size) == (224, 32, 128)
    assert (len(b.train), len(b.val), len(b.test)) == (7, 1, 3)
    sizes = [len(y) for _, y in b.test]
    assert sizes == [50, 50, 28]  # eval loaders never drop the last batch
    x, y = next(iter(b.train))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.device.type == "cpu" and y.min() >= 0 and y.max() < 4


def test_unaugmented_data_is_normalised(synthetic):
    loader = TensorLoader(synthetic.train.images, synthetic.train.labels, *_stats(synthetic.train), 64)
    x, _ = collect(loader)
    per_channel_mean = x.mean(dim=(0, 2, 3))
    per_channel_std = x.std(dim=(0, 2, 3))
    assert per_channel_mean.abs().max() < 1e-4
    assert (per_channel_std - 1).abs().max() < 1e-3
    x_test, _ = collect(synthetic.test)
    assert x_test.mean().abs() < 0.1


def _stats(loader):
    return loader.mean.flatten().tolist(), loader.std.flatten().tolist()


def test_validation_and_test_are_plain_normalised_images_in_order(synthetic):
    b = synthetic
    assert b.train.augment and not b.val.augment and not b.test.augment
    mean, std = b.val.mean, b.val.std
    for loader, idx in ((b.val, torch.as_tensor(b.split["val"])), (b.test, torch.arange(b.test.dataset_size))):
        x, y = collect(loader)
        expected = (loader.images[idx].float() / 255 - mean) / std
        torch.testing.assert_close(x, expected)
        torch.testing.assert_close(y, loader.labels[idx])
        x2, _ = collect(loader)
        torch.testing.assert_close(x, x2)  # no shuffle, no randomness


def test_augmentation_changes_training_images_only():
    aug = data.build_data("synthetic", val_size=32, loader_seed=5, augment=True)
    plain = data.build_data("synthetic", val_size=32, loader_seed=5, augment=False)
    assert not plain.train.augment
    (xa, ya), (xp, yp) = next(iter(aug.train)), next(iter(plain.train))
    torch.testing.assert_close(ya, yp)  # same order: augmentation draws come after the permutation
    assert not torch.allclose(xa, xp)
    # Translation fills with 0 after normalisation (= mean colour): an augmented batch has exact zeros
    # in whole border rows/columns, a plain one essentially never does.
    assert (xa == 0).all(dim=1).any() and not (xp == 0).all(dim=1).any()
    torch.testing.assert_close(collect(aug.val)[0], collect(plain.val)[0])


def test_translate_and_flip_match_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 2, 5, 7, generator=g)
    offsets = torch.tensor([[0, 0], [1, -2], [-2, 2], [2, 0], [0, -1], [-1, 1]])
    out = batch_ops.translate(images, offsets, pad=2)
    for b, (dy, dx) in enumerate(offsets.tolist()):
        ref = torch.zeros_like(images[b])
        for i in range(5):
            for j in range(7):
                if 0 <= i - dy < 5 and 0 <= j - dx < 7:
                    ref[:, i, j] = images[b, :, i - dy, j - dx]
        torch.testing.assert_close(out[b], ref)
    flip = torch.tensor([True, False, True, False, False, True])
    flipped = batch_ops.hflip(images, flip)
    torch.testing.assert_close(flipped[0], images[0].flip(-1))
    torch.testing.assert_close(flipped[1], images[1])


def test_svhn_is_never_flipped_and_pads_follow_image_size():
    assert data.get_spec("svhn").flip is False and data.get_spec("cifar10").flip is True
    assert data.get_spec("cifar100").pad == 4 and data.get_spec("fashion_mnist").pad == 2


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        torch.testing.assert_close(xa, xb)
        torch.testing.assert_close(ya, yb)


def test_state_dict_round_trip_reproduces_the_next_epoch(tmp_path):
    loader = data.build_data("synthetic", val_size=0, batch_size=48, loader_seed=11).train
    first = _epoch(loader)
    path = tmp_path / "loader.pt"
    torch.save(loader.state_dict(), path)
    second = _epoch(loader)
    assert not torch.equal(first[0][1], second[0][1])  # a new order every epoch

    fresh = data.build_data("synthetic", val_size=0, batch_size=48, loader_seed=0).train
    fresh.load_state_dict(torch.load(path, weights_only=True))
    _assert_same_batches(_epoch(fresh), second)


def test_state_dict_taken_mid_epoch_resumes_at_the_next_batch():
    loader = data.build_data("synthetic", val_size=0, batch_size=48, loader_seed=11).train
    full = _epoch(loader)
    replay = data.build_data("synthetic", val_size=0, batch_size=48, loader_seed=11).train
    it = iter(replay)
    next(it), next(it)
    state = replay.state_dict()
    assert state["batches_done"] == 2
    resumed = data.build_data("synthetic", val_size=0, batch_size=48, loader_seed=99).train
    resumed.load_state_dict(state)
    assert resumed.state_dict()["batches_done"] == 2  # pending resume survives a second save
    _assert_same_batches(_epoch(resumed), full[2:])
    # ...and the epoch after the resumed one matches the uninterrupted run's next epoch.
    _assert_same_batches(_epoch(resumed), _epoch(loader))


def test_drop_last_only_on_train():
    b = data.build_data("synthetic", val_size=32, batch_size=50, drop_last=True, loader_seed=0)
    assert len(b.train) == 4 and all(len(y) == 50 for _, y in b.train)
    assert len(b.val) == 1 and len(next(iter(b.val))[1]) == 32


def test_no_validation_split_gives_val_none():
    b = data.build_data("synthetic", val_size=0, loader_seed=0)
    assert b.val is None and len(b.split["val"]) == 0 and b.train.dataset_size == 256


def test_loader_seed_defaults_to_torch_initial_seed():
    torch.manual_seed(4)
    a = next(iter(data.build_data("synthetic", val_size=0).train))[1]
    b = next(iter(data.build_data("synthetic", val_size=0, loader_seed=4).train))[1]
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic():
    a, b = data.load_arrays("synthetic"), data.load_arrays("synthetic")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.dtype == torch.uint8 and a.train_images.shape == (256, 3, 16, 16)
    assert a.test_images.shape[0] == 128
    np.testing.assert_array_equal(np.bincount(a.train_labels.numpy()), [64] * 4)
    other = data.load_arrays("synthetic", synthetic_size=40, synthetic_classes=10, synthetic_image_size=8)
    assert other.train_images.shape == (40, 3, 8, 8) and int(other.train_labels.max()) == 9


def test_synthetic_is_learnable_by_a_tiny_cnn(synthetic):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, synthetic.num_classes),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    steps = 0
    while steps < 40:
        for x, y in synthetic.train:  # augmented batches
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 40:
                break
    plain = TensorLoader(
        synthetic.train.images, synthetic.train.labels, *_stats(synthetic.train), 256, indices=synthetic.split["train"]
    )
    with torch.no_grad():
        correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in plain)
    assert correct / plain.dataset_size > 0.9


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


def test_idx_reader_round_trip_and_bad_magic(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array(array.shape, dtype=">u4").tobytes()
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + array.tobytes()))
    np.testing.assert_array_equal(read_idx(path), array)
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file") as info:
        read_idx(bad)
    assert str(bad) in str(info.value)
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(header + array.tobytes()[:-1])
    with pytest.raises(ValueError, match="bytes follow"):
        read_idx(short)


debian_fashion = pytest.mark.skipif(
    not (sources.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian's Fashion-MNIST is not installed at {sources.DEBIAN_FASHION_MNIST} "
    "(apt-get install dataset-fashion-mnist)",
)


@debian_fashion
def test_fashion_mnist_from_debian_files(tmp_path):
    b = data.build_data("fashion_mnist", root=str(tmp_path), download=False, val_size=5000, loader_seed=0)
    assert b.num_classes == 10 and b.input_shape() == (1, 28, 28)
    assert b.train.dataset_size + b.val.dataset_size == 60000 and b.test.dataset_size == 10000
    images, labels = b.train.images, b.train.labels
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert b.test.images.shape == (10000, 1, 28, 28)
    for y in (labels, b.test.labels):
        assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
    np.testing.assert_array_equal(np.bincount(labels.numpy()), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(labels.numpy()[b.split["val"]]), [500] * 10)
    x, _ = next(iter(b.val))
    assert x.shape == (250, 1, 28, 28) and abs(float(x.mean())) < 0.1  # published mean/std fit


def test_fashion_mnist_missing_everywhere_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(FileNotFoundError) as info:
        data.build_data("fashion_mnist", root=str(tmp_path), download=False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte") in message
    assert str(tmp_path / "no-debian") in message
    assert_short_error(info.value)


def test_fashion_mnist_idx_files_under_the_root_are_used(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for stem, n in (("train", 30), ("t10k", 10)):
        images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array, code in (("images-idx3", images, 3), ("labels-idx1", labels, 1)):
            header = bytes([0, 0, 0x08, code]) + np.array(array.shape, dtype=">u4").tobytes()
            (folder / f"{stem}-{kind}-ubyte").write_bytes(header + array.tobytes())  # not gzipped
    b = data.build_data("fashion_mnist", root=str(tmp_path), download=False, val_size=10, loader_seed=0)
    assert (b.train.dataset_size, b.val.dataset_size, b.test.dataset_size) == (20, 10, 10)


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_choices_and_close_matches():
    with pytest.raises(ValueError) as info:
        data.build_data("cifar1000")
    message = str(info.value)
    assert "'cifar1000'" in message and "Did you mean" in message and "'cifar100'" in message
    for name in data.DATASETS:
        assert name in message
    assert_short_error(info.value)


def test_dataset_name_aliases():
    assert data.canonical_name("CIFAR-10") == "cifar10"
    assert data.canonical_name("FashionMNIST") == "fashion_mnist"
    assert data.canonical_name("tiny-imagenet") == "tinyimagenet"
    assert data.DATASETS == ("cifar10", "cifar100", "svhn", "fashion_mnist", "tinyimagenet", "imagenet", "synthetic",
                             "ag_news", "sst2", "cifar100_lt")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat")],
)
def test_missing_torchvision_files_name_the_path_and_the_fix(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as info:
        data.build_data(name, root=str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path / expected) in message and "download=True" in message and "http" in message
    assert_short_error(info.value)


def test_failed_download_is_reported_briefly(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline(torchvision.datasets.CIFAR10):
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(FileNotFoundError) as info:
        data.build_data("cifar10", root=str(tmp_path), download=True)
    assert "downloading it failed" in str(info.value) and "no network" in str(info.value)
    assert_short_error(info.value)


def test_missing_image_folder_names_the_paths_tried(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.build_data("imagenet", root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "train") in message and str(tmp_path / "imagenet" / "train") in message
    assert "image-net.org" in message
    assert_short_error(info.value)


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTIEXIT_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    monkeypatch.delenv("MULTIEXIT_DATA")
    assert str(data.default_root()) == "datasets"


# ---------------------------------------------------------------------------------------------- image folders

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # class k is a solid colour


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def _fake_train(folder, wnids, per_class=4, sub="images"):
    for k, wnid in enumerate(wnids):
        for i in range(per_class):
            _png(folder / "train" / wnid / sub / f"{wnid}_{i}.png", COLOURS[k])
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")


def _colour_class(x, mean, std):
    """Which COLOURS entry each normalised image shows."""
    rgb = (x * std + mean).mean(dim=(2, 3)) * 255
    return torch.cdist(rgb, torch.tensor(COLOURS, dtype=torch.float32)).argmin(dim=1)


def test_tiny_imagenet_layout_loads_with_the_right_labels(tmp_path):
    wnids = ["n02", "n01", "n03"]  # class index = sorted position: n01 -> 0, n02 -> 1, n03 -> 2
    folder = tmp_path / "tiny-imagenet-200"
    _fake_train(folder, sorted(wnids))
    rows = []
    for j, wnid in enumerate(wnids * 2):
        _png(folder / "val" / "images" / f"val_{j}.png", COLOURS[sorted(wnids).index(wnid)])
        rows.append(f"val_{j}.png\t{wnid}\t0\t0\t8\t8")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")

    b = data.build_data("tinyimagenet", root=str(tmp_path), val_size=3, batch_size=4, eval_batch_size=4, loader_seed=0)
    assert b.num_classes == 3 and b.input_shape() == (3, 64, 64) and b.name == "tinyimagenet"
    assert (b.train.dataset_size, b.val.dataset_size, b.test.dataset_size) == (9, 3, 6)
    mean, std = b.test.mean, b.test.std
    for loader in (b.train, b.val, b.test):
        x, y = collect(loader)
        assert x.shape[1:] == (3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
        torch.testing.assert_close(_colour_class(x, mean, std), y)
    _, y_test = collect(b.test)
    assert y_test.tolist() == [1, 0, 2, 1, 0, 2]
    assert sorted(b.val.targets.tolist()) == [0, 1, 2]  # class-balanced: one per class

    # The folder loader's order resumes exactly too.
    state = b.train.state_dict()
    order = collect(b.train)[1]
    b.train.load_state_dict(state)
    torch.testing.assert_close(collect(b.train)[1], order)


def test_imagenet_layout_maps_val_class_folders_to_train_indices(tmp_path):
    _fake_train(tmp_path, ["n01", "n02", "n03"], per_class=2, sub="")
    _png(tmp_path / "val" / "n03" / "a.png", COLOURS[2])  # only one class present in val
    _png(tmp_path / "val" / "n03" / "b.png", COLOURS[2])
    b = data.build_data("imagenet", root=str(tmp_path), val_size=0, augment=False, batch_size=6, loader_seed=0)
    assert b.num_classes == 3 and b.input_shape() == (3, 224, 224) and b.val is None
    x, y = collect(b.test)
    assert y.tolist() == [2, 2] and x.shape == (2, 3, 224, 224)

    _png(tmp_path / "val" / "n99" / "c.png", COLOURS[0])
    with pytest.raises(ValueError, match="no counterpart under train/"):
        data.build_data("imagenet", root=str(tmp_path), val_size=0)


def test_tensor_loader_says_which_images_each_batch_holds():
    from data import TensorLoader

    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    loader = TensorLoader(images, torch.arange(10), [0.0], [1.0], 4, indices=[1, 3, 5, 7, 9], shuffle=True, seed=2)
    for x, y in loader:
        assert torch.equal(loader.batch_indices, y)  # labels are the image indices here
        assert torch.allclose(x[:, 0, 0, 0] * 255, loader.batch_indices.float())  # pixels /255
