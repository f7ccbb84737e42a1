"""Datasets, splits, augmentation and loaders for the multi-exit experiments (a plain library).

Modules:
    catalog   dataset names -> sizes, classes, mean/std, default augmentation, raw-array loaders
    sources   torchvision archives and Debian's Fashion-MNIST IDX files -> uint8 tensors
    idx       the IDX file reader
    synthetic a tiny learnable dataset for tests and smoke runs
    longtail  long-tailed subsets (CIFAR-100-LT) picked as JEI-DNN picks them
    splits    seeded class-balanced train/val split; save/load as .npz
    memory    in-memory loader with batched tensor augmentation
    folders   ImageFolder-style ImageNet / Tiny-ImageNet with a DataLoader
    text      AG News / SST-2: local or hub files, EENet's splits, tokenised once, a padding loader
    ordering  a loader's generator and epoch position (exact resume)
    batch_ops normalise / translate / flip / resize whole batches
    bundle    build_data and DataBundle
"""
from data.bundle import DataBundle, build_data
from data.catalog import CATALOG, DATASETS, DatasetSpec, canonical_name, default_root, get_spec, load_arrays
from data.folders import FolderLoader
from data.memory import TensorLoader
from data.splits import load_split, make_split, save_split, validate_split
from data.text import TextLoader

__all__ = [
    "CATALOG",
    "DATASETS",
    "DataBundle",
    "DatasetSpec",
    "FolderLoader",
    "TensorLoader",
    "TextLoader",
    "build_data",
    "canonical_name",
    "default_root",
    "get_spec",
    "load_arrays",
    "load_split",
    "make_split",
    "save_split",
    "validate_split",
]
