"""Dataset names -> what each dataset is: size, classes, normalisation, default augmentation, source.

Means and standard deviations are per-channel pixel statistics of the official training set,
in [0, 1] units:

* CIFAR-10 (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616): the widely published training-set
  statistics (the std is the per-pixel std, not the 0.2023/0.1994/0.2010 that circulates from an
  early tutorial and is the std of something else).
* CIFAR-100 (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565, 0.2761): as in MSDNet-PyTorch/IMTA
  (papers/phuong-lampert-and-imta.md 2.4; Phuong's repo rounds them to 3 decimals).
* SVHN (0.4377, 0.4438, 0.4728) / (0.1980, 0.2010, 0.1970): the commonly published statistics of
  the 73,257-image 'train' split.
* Fashion-MNIST 0.2860 / 0.3530: recomputed by us from Debian's training IDX file
  (0.28604, 0.35302).
* ImageNet (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225): torchvision's reference values; also
  used for Tiny-ImageNet, which is drawn from ImageNet.
* synthetic: computed from its own training images when built.

CIFAR-100-LT ('cifar100_lt', JEI-DNN's long-tailed set, papers/dih-eenet-jei.md 3.8) is cut from the
CIFAR-100 files (same folder, same download, same statistics) by ``data.longtail``: exponential
profile, imbalance 0.01, class c keeps floor(500 * 0.01 ** (c / 99)) training images (500 ... 5,
10 847 in all). The test set is long-tailed the same way (floor(100 * 0.01 ** (c / 99)) per class,
2 131 images): most LT papers test on the balanced CIFAR-100 test set; this follows JEI, so its test
accuracy is dominated by the head classes. The validation split is drawn from the LT training set as
for every dataset; JEI holds out 1 000 images uniformly (``class_balanced=False``: a class-balanced
1 000 would take 10 images from tail classes that have 5).

AG News and SST-2 (kind 'text', ``data.text``) are token sequences: no pixel statistics, and
``in_channels``/``image_size`` are placeholders (1 and the default ``max_length`` 512).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data.arrays import RawArrays
from data.longtail import CIFAR100_LT_IMBALANCE, long_tailed
from data.sources import load_cifar, load_fashion_mnist, load_svhn
from data.synthetic import make_synthetic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one dataset."""

    name: str
    kind: str  # 'memory': uint8 tensors in RAM; 'folder': ImageFolder read from disk; 'text': data.text
    num_classes: int | None  # None: decided when built (synthetic: synthetic_classes; folders: class folders)
    in_channels: int
    image_size: int  # memory: stored size (synthetic: overridden); folder: crop size fed to the network
    mean: tuple[float, ...] | None  # None: computed from the training images
    std: tuple[float, ...] | None
    pad: int = 0  # memory, train: random translation by integers in [-pad, pad]
    flip: bool = False  # memory, train: random horizontal flip
    folders: tuple[str, ...] = ()  # folder: sub-folders of the data root that may hold train/ and val/
    how_to_get: str = ""


CATALOG: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "cifar10", "memory", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), pad=4, flip=True
        ),
        DatasetSpec(
            "cifar100", "memory", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), pad=4, flip=True
        ),
        # Digits: a mirrored 2 is not a 2, so no flip.
        DatasetSpec("svhn", "memory", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), pad=4, flip=False),
        DatasetSpec("fashion_mnist", "memory", 10, 1, 28, (0.2860,), (0.3530,), pad=2, flip=True),
        DatasetSpec(
            "tinyimagenet", "folder", None, 3, 64, IMAGENET_MEAN, IMAGENET_STD,
            folders=("tiny-imagenet-200", "tinyimagenet"),
            how_to_get="download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into the data root",
        ),
        DatasetSpec(
            "imagenet", "folder", None, 3, 224, IMAGENET_MEAN, IMAGENET_STD,
            folders=("imagenet", "ILSVRC2012"),
            how_to_get=(
                "get ILSVRC2012 from https://image-net.org and arrange it as train/<wnid>/*.JPEG and "
                "val/<wnid>/*.JPEG (the validation images sorted into class folders)"
            ),
        ),
        DatasetSpec("synthetic", "memory", None, 3, 16, None, None, pad=2, flip=True),
        DatasetSpec("ag_news", "text", 4, 1, 512, None, None),
        DatasetSpec("sst2", "text", 2, 1, 512, None, None),
        DatasetSpec(
            "cifar100_lt", "memory", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), pad=4, flip=True
        ),
    )
}

DATASETS: tuple[str, ...] = tuple(CATALOG)

_ALIASES = {name.replace("_", ""): name for name in CATALOG}


def canonical_name(name: str) -> str:
    """Canonical dataset name; case, '-' and '_' are ignored ('CIFAR-10', 'CIFAR-100-LT', 'FashionMNIST').

    Raises ValueError naming every valid choice and the closest matches.
    """
    key = str(name).lower().replace("-", "").replace("_", "").replace(" ", "")
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(str(name).lower(), DATASETS, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"Unknown dataset {name!r}.{hint} Valid choices: {', '.join(DATASETS)}")


def get_spec(name: str) -> DatasetSpec:
    """The catalog entry for ``name`` (aliases accepted, see :func:`canonical_name`)."""
    return CATALOG[canonical_name(name)]


def default_root() -> Path:
    """Data root: $MULTIEXIT_DATA if set, else ./datasets (relative to the working directory)."""
    return Path(os.environ.get("MULTIEXIT_DATA") or "datasets")


_ARRAY_LOADERS: dict[str, Callable[[Path, bool], RawArrays]] = {
    "cifar10": lambda root, download: load_cifar(root, download, classes=10),
    "cifar100": lambda root, download: load_cifar(root, download, classes=100),
    "cifar100_lt": lambda root, download: long_tailed(load_cifar(root, download, classes=100), CIFAR100_LT_IMBALANCE),
    "svhn": load_svhn,
    "fashion_mnist": load_fashion_mnist,
}


def load_arrays(
    name: str,
    root: str | Path | None = None,
    download: bool = True,
    *,
    synthetic_size: int = 256,
    synthetic_classes: int = 4,
    synthetic_image_size: int = 16,
) -> RawArrays:
    """Official train/test images of an in-memory dataset as uint8 tensors (the ``synthetic_*`` options
    only apply to 'synthetic')."""
    spec = get_spec(name)
    if spec.kind != "memory":
        where = "token sequences (data.text)" if spec.kind == "text" else "image folders"
        raise ValueError(f"{spec.name!r} is read from {where}, not held in memory")
    if spec.name == "synthetic":
        return make_synthetic(synthetic_size, synthetic_classes, synthetic_image_size)
    return _ARRAY_LOADERS[spec.name](Path(root) if root is not None else default_root(), download)
