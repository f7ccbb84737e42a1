"""Where the in-memory datasets come from: torchvision archives under a root folder, or Debian's IDX files.

Every loader returns :class:`~data.arrays.RawArrays` (uint8 images, int64 labels) and turns the
usual failures (files absent with ``download=False``, a download that fails offline, a missing
optional dependency) into one short error that names the paths tried and how to get the data.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from data.arrays import RawArrays, images_from_numpy, labels_from_numpy
from data.idx import read_idx

# Debian/Ubuntu: `apt-get install dataset-fashion-mnist` puts the gzipped IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _not_found(what: str, tried: list[Path], how: str) -> FileNotFoundError:
    paths = "\n".join(f"  {p}" for p in tried)
    return FileNotFoundError(f"{what} not found. Looked for:\n{paths}\nTo get it: {how}")


def _download_failed(what: str, root: Path, err: Exception, how: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} is not under {root} and downloading it failed ({type(err).__name__}: {err}).\nTo get it: {how}"
    )


def _torchvision(cls, what: str, root: Path, download: bool, expected: list[Path], how: str, **kwargs):
    """Instantiate a torchvision dataset, with our errors instead of torchvision's."""
    if not download and not all(p.exists() for p in expected):
        raise _not_found(what, expected, how)
    try:
        return cls(str(root), download=download, **kwargs)
    except (RuntimeError, OSError) as err:  # URLError and checksum failures included
        if download:
            raise _download_failed(what, root, err, how) from None
        raise FileNotFoundError(f"{what} under {root} is incomplete or corrupted ({err}).\nTo get it: {how}") from None


def load_cifar(root: Path, download: bool, classes: int) -> RawArrays:
    """CIFAR-10 or CIFAR-100 (``classes``) through torchvision: ROOT/cifar-10-batches-py or ROOT/cifar-100-python."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if classes == 10 else CIFAR100
    folder = root / cls.base_folder
    how = (
        f"pass download=True (needs internet), or download {cls.url} and extract it into {root} "
        f"(giving {folder})"
    )
    parts = []
    for train in (True, False):
        ds = _torchvision(cls, f"CIFAR-{classes}", root, download, [folder], how, train=train)
        parts += [images_from_numpy(ds.data, "NHWC"), labels_from_numpy(ds.targets)]
    return RawArrays(*parts)


def load_svhn(root: Path, download: bool) -> RawArrays:
    """SVHN 'train' (73,257) and 'test' (26,032) through torchvision: ROOT/{train,test}_32x32.mat; 'extra' unused."""
    from torchvision.datasets import SVHN

    files = {split: root / SVHN.split_list[split][1] for split in ("train", "test")}
    urls = " and ".join(SVHN.split_list[split][0] for split in files)
    how = f"pass download=True (needs internet), or download {urls} into {root}"
    if not download and not all(p.exists() for p in files.values()):
        raise _not_found("SVHN", list(files.values()), how)
    if importlib.util.find_spec("scipy") is None:
        raise ImportError("SVHN is stored as MATLAB files and torchvision reads them with scipy: pip install scipy")
    parts = []
    for split, path in files.items():
        ds = _torchvision(SVHN, f"SVHN ({split})", root, download, [path], how, split=split)
        parts += [images_from_numpy(ds.data, "NCHW"), labels_from_numpy(ds.labels)]
    return RawArrays(*parts)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_folders(root: Path) -> list[Path]:
    """Folders searched, in order, for the four Fashion-MNIST IDX files (gzipped or not)."""
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]


def load_fashion_mnist(root: Path, download: bool) -> RawArrays:
    """Fashion-MNIST (60,000 / 10,000, 28x28, one channel) from IDX files; torchvision download as fallback."""
    folders = fashion_mnist_folders(root)
    for folder in folders:
        files = {key: _idx_file(folder, stem) for key, stem in _FASHION_FILES.items()}
        if all(files.values()):
            arrays = {key: read_idx(path) for key, path in files.items()}
            return RawArrays(
                images_from_numpy(arrays["train_images"], "NHW"),
                labels_from_numpy(arrays["train_labels"]),
                images_from_numpy(arrays["test_images"], "NHW"),
                labels_from_numpy(arrays["test_labels"]),
            )
    how = (
        "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` (files go to "
        f"{DEBIAN_FASHION_MNIST}); or copy the four *-ubyte.gz files into {folders[0]}; "
        "or pass download=True (needs internet)"
    )
    tried = [folder / f"{stem}[.gz]" for folder in folders for stem in _FASHION_FILES.values()]
    if not download:
        raise _not_found("Fashion-MNIST", tried, how)
    from torchvision.datasets import FashionMNIST

    parts = []
    for train in (True, False):
        try:
            ds = FashionMNIST(str(root), train=train, download=True)
        except (RuntimeError, OSError) as err:
            raise _download_failed("Fashion-MNIST", root, err, how) from None
        parts += [images_from_numpy(ds.data.numpy(), "NHW"), labels_from_numpy(ds.targets.numpy())]
    return RawArrays(*parts)
