"""The ``data`` ingredient: dataset name, split and loader settings, built by ``data.build_data``."""
from __future__ import annotations

import torch
from sacred import Ingredient

from data import DATASETS, DataBundle, build_data, canonical_name
from experiments.ingredients import ingredient
from experiments.validation import boolean, choice, either, integer, number, optional, scoped, string


def data_config():
    name = "fashion_mnist"  # cifar10, cifar100, cifar100_lt, svhn, fashion_mnist, tinyimagenet, imagenet, synthetic,
    # ag_news, sst2
    root = None  # folder holding the datasets (None: $MULTIEXIT_DATA or ./datasets)
    download = True  # let torchvision download CIFAR/SVHN/Fashion-MNIST (the HF hub: AG News, SST-2) when missing
    batch_size = 64  # training batch size
    eval_batch_size = 250  # validation/test batch size
    workers = 0  # DataLoader workers (folder datasets only; in-memory sets need none)
    val_size = 5000  # held-out validation images from the training set (int, or a fraction)
    class_balanced = True  # draw val_size / num_classes validation images from every class
    n_per_class = None  # keep only this many training images per class (train + val), e.g. Phuong's 150
    augment = True  # random translation (+ flip where sensible) on training images only
    drop_last = False  # drop the last incomplete training batch every epoch
    split_seed = 0  # seed of the train/validation split (independent of the run's seed)
    split_file = None  # reuse a saved split (.npz) instead of drawing one
    tokenizer = "bert-base-uncased"  # text datasets: fast tokenizer, hub name or local folder (save_pretrained)
    max_length = 512  # text datasets: truncate token sequences ([CLS] ... [SEP] included) to this length
    resize = None  # in-memory images: resize batches to this square size after augmentation (JEI: 224), None: keep
    normalize = True  # images: subtract the mean, divide by the std; False feeds pixels / 255 (JEI's SVHN)
    locals()  # sacred reads these names; this line tells linters they are used


def _canonical_or_same(name: object) -> object:
    """Aliases ('CIFAR-10', 'FashionMNIST') that ``build_data`` accepts count as their canonical name."""
    try:
        return canonical_name(name)
    except ValueError:
        return name


RULES = scoped("data", dict(
    name=choice(*DATASETS, normalize=_canonical_or_same),
    root=optional(string),
    download=boolean,
    batch_size=integer(min=1),
    eval_batch_size=integer(min=1),
    workers=integer(min=0),
    val_size=either(integer(min=0), number(min=0, max=1, max_open=True)),
    class_balanced=boolean,
    drop_last=boolean,
    n_per_class=optional(integer(min=1)),
    augment=boolean,
    split_seed=integer(min=0),
    split_file=optional(string),
    tokenizer=string,
    max_length=integer(min=2),
    resize=optional(integer(min=1)),
    normalize=boolean,
))

FAST = dict(name="synthetic", batch_size=32, eval_batch_size=64, val_size=64, n_per_class=None, augment=True)


def data_ingredient(**defaults) -> Ingredient:
    """A ``data`` ingredient whose defaults are the paper's; ``data.fast`` is tiny synthetic data."""
    return ingredient("data", data_config, defaults, {
        "fast": FAST, "fashion_mnist": dict(name="fashion_mnist", val_size=5000, n_per_class=None),
    })


def build(config: dict, device: torch.device, seed: int) -> DataBundle:
    """Loaders for a ``data`` config; ``seed`` drives the training loader's shuffling."""
    return build_data(**config, device=device, loader_seed=seed)


# What fixes a run's dataset, its train/validation split and what its network sees (size, scaling); a later
# stage takes these from its parent.
SPLIT_KEYS = ("name", "n_per_class", "val_size", "class_balanced", "split_seed", "resize", "normalize")


def inherit_split(config: dict, parent: dict, split_file) -> dict:
    """``config`` with the parent run's dataset, its saved split and its input size and scaling (loader settings
    stay this run's)."""
    return {**config, **{k: parent[k] for k in SPLIT_KEYS if k in parent}, "split_file": str(split_file)}
