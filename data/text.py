"""AG News and SST-2 as EENet uses them (papers/dih-eenet-jei.md 2.7-2.8): files, splits, tokens, a loader.

On-disk layout (under the data root; ``<split>.parquet`` or ``<split>.csv``, a text column named ``text``
or ``sentence`` and an integer ``label`` column):

* ``ag_news/train.*`` (120 000 rows), ``ag_news/test.*`` (7 600 rows, the test set). Validation is held
  out of train: the last ``val_size`` entries of a permutation drawn with ``split_seed`` (the reference
  uses 10 000).
* ``sst2/train.*`` (67 349), ``sst2/validation.*`` (872, the validation set), ``sst2/test.*`` (GLUE's
  1 821 test sentences; their labels on the hub are -1 and are ignored) and ``sst2/test.tsv``: the
  labelled binary SST test set, one ``sentence<TAB>label`` per line (a header line is skipped). A GLUE
  test sentence takes the label of the tsv sentence equal to it after lower-casing and turning
  -LRB-/-RRB- into parentheses, as the reference does.

With ``download=True`` a missing folder is filled from the Hugging Face hub (``fancyzhx/ag_news``,
``nyu-mll/glue`` config ``sst2``: the current names of ``ag_news`` and ``glue``) and saved as parquet
for next time; ``sst2/test.tsv`` is never downloaded (it is not on the hub).

Texts are tokenised once, up front, with a fast tokenizer (``[CLS] ... [SEP]``, truncated to
``max_length``) and kept in memory packed in one tensor; batches are padded with id 0 to their longest
row (no attention mask, as in the reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.ordering import SeededLoader
from data.splits import load_split, make_split, resolve_val_size, validate_split

TEXT_COLUMNS = ("text", "sentence")
ENCODE_CHUNK = 10_000  # texts per tokenizer call: bounds the Python lists alive at once


@dataclass(frozen=True)
class TextSource:
    """Where one text dataset comes from and which splits it has."""

    splits: tuple[str, ...]
    hub: tuple[str, ...]  # arguments of datasets.load_dataset


SOURCES = {
    "ag_news": TextSource(("train", "test"), ("fancyzhx/ag_news",)),
    "sst2": TextSource(("train", "validation", "test"), ("nyu-mll/glue", "sst2")),
}


@dataclass(frozen=True)
class TextSet:
    """One split: its texts and int64 labels."""

    texts: list[str]
    labels: np.ndarray


# ---------------------------------------------------------------------------------------------- files


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in (".parquet", ".csv"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def _layout_hint(name: str, folder: Path) -> str:
    files = ", ".join(f"{split}.parquet" for split in SOURCES[name].splits)
    labelled = " and the labelled SST test set as test.tsv" if name == "sst2" else ""
    return f"put {files} (or .csv; columns text or sentence, and label){labelled} in {folder}"


def _download(name: str, folder: Path) -> None:
    """Fetch the dataset from the hub and save its splits as parquet (one line if that fails)."""
    source = SOURCES[name]
    try:
        import datasets

        hub = datasets.load_dataset(*source.hub)
        folder.mkdir(parents=True, exist_ok=True)
        for split in source.splits:
            hub[split].to_parquet(str(folder / f"{split}.parquet"))
    except Exception as err:  # noqa: BLE001 - any failure (offline, hub change) gets the same advice
        reason = (str(err).strip().splitlines() or [""])[0]
        raise FileNotFoundError(
            f"{name}: downloading {'/'.join(source.hub)} failed ({type(err).__name__}: {reason}); "
            f"{_layout_hint(name, folder)}"
        ) from None


def _read_frame(path: Path):
    import pandas as pd

    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=False)  # a text 'NA' stays a text


def _read_set(path: Path) -> TextSet:
    frame = _read_frame(path)
    column = next((c for c in TEXT_COLUMNS if c in frame.columns), None)
    if column is None or "label" not in frame.columns:
        raise ValueError(f"{path} needs a text (or sentence) column and a label column, has {list(frame.columns)}")
    return TextSet([str(t) for t in frame[column]], np.array(frame["label"], dtype=np.int64))  # a writable copy


def read_text_sets(name: str, root: Path, download: bool) -> dict[str, TextSet]:
    """The official splits of ``name`` from ``root/name``, downloaded first when missing and allowed."""
    folder = root / name
    splits = SOURCES[name].splits
    if any(_split_file(folder, s) is None for s in splits):
        if not download:
            raise FileNotFoundError(f"{name} not found: {_layout_hint(name, folder)}, or pass download=True")
        _download(name, folder)
    sets = {split: _read_set(_split_file(folder, split)) for split in splits}
    if name == "sst2":
        sets["test"] = TextSet(sets["test"].texts, restore_sst2_labels(sets["test"].texts, folder / "test.tsv"))
    return sets


# ---------------------------------------------------------------------------------------------- SST-2 test


def _sst_key(sentence: str) -> str:
    """The reference's matching key: lower case, -LRB-/-RRB- as parentheses."""
    return sentence.strip().lower().replace("-lrb-", "(").replace("-rrb-", ")")


def _read_labelled_tsv(path: Path) -> dict[str, int]:
    labels: dict[str, int] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        sentence, _, label = line.rpartition("\t")
        label = label.strip()
        if not line.strip() or (line_no == 1 and not label.isdigit()):
            continue  # blank line or header
        if not sentence or not label.isdigit():
            raise ValueError(f"{path}:{line_no}: expected 'sentence<TAB>label', got {line[:80]!r}")
        key = _sst_key(sentence)
        if labels.setdefault(key, int(label)) != int(label):
            raise ValueError(f"{path}:{line_no}: {sentence[:60]!r} appears with two labels")
    return labels


def restore_sst2_labels(sentences: list[str], tsv: Path) -> np.ndarray:
    """Labels of GLUE's (unlabelled) SST-2 test sentences, looked up in the labelled SST test file."""
    if not tsv.is_file():
        raise FileNotFoundError(
            f"SST-2 test labels not found: put the labelled SST binary test set at {tsv} "
            "(one 'sentence<TAB>label' per line; GLUE's test split has no labels)"
        )
    known = _read_labelled_tsv(tsv)
    missing = [s for s in sentences if _sst_key(s) not in known]
    if missing:
        raise ValueError(f"{tsv} has no label for {len(missing)} of {len(sentences)} GLUE test sentences, "
                         f"e.g. {missing[0][:60]!r}")
    return np.asarray([known[_sst_key(s)] for s in sentences], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- splits


def text_split(
    name: str, labels: np.ndarray, *, split_file: str | None, val_size: int | float, n_per_class: int | None,
    seed: int, class_balanced: bool = True,
) -> dict[str, np.ndarray]:
    """'train'/'val' indices into the official training set, as the reference draws them.

    AG News: the last ``val_size`` of a ``seed``-ed permutation validate, the rest trains. SST-2: all of
    train trains (validation is GLUE's own). ``n_per_class`` first keeps that many per class;
    ``class_balanced`` does not apply (the reference's hold-out is uniform).
    """
    if split_file is not None:
        split = validate_split(load_split(split_file), num_examples=len(labels), source=f"split file {split_file}")
    else:
        kept = make_split(labels, val_size=0, n_per_class=n_per_class, seed=seed)["train"]
        n_val = resolve_val_size(val_size, len(kept)) if name == "ag_news" else 0
        if n_val >= len(kept):
            raise ValueError(f"val_size={n_val} leaves no training texts out of {len(kept)}")
        order = np.random.default_rng(seed).permutation(kept)
        split = {"train": np.sort(order[:len(kept) - n_val]), "val": np.sort(order[len(kept) - n_val:])}
    if name == "sst2" and len(split["val"]):
        raise ValueError(f"split file {split_file}: SST-2 validates on GLUE's validation set; 'val' must be empty")
    return split


# ---------------------------------------------------------------------------------------------- tokens


def load_tokenizer(name: str, download: bool = True):
    """A fast tokenizer by hub name or local folder; one line naming the fix if it cannot be had."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=not download)
    except Exception as err:  # noqa: BLE001 - missing folder, offline hub, bad files: same advice
        reason = (str(err).strip().splitlines() or [""])[0]
        hub = "" if download else ", or download=True to fetch it from the Hugging Face hub"
        raise OSError(f"tokenizer {name!r} could not be loaded ({type(err).__name__}: {reason}); pass "
                      f"tokenizer=<a folder written by save_pretrained>{hub}") from None
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer {name!r} is not a fast (Rust) tokenizer")
    return tokenizer


@dataclass(frozen=True)
class TokenIds:
    """Token ids of N texts packed in one tensor: text i is ``flat[starts[i]:starts[i] + lengths[i]]``."""

    flat: torch.Tensor  # int32 [total]
    starts: torch.Tensor  # int64 [N]
    lengths: torch.Tensor  # int64 [N]

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """int64 [B, L] ids of ``rows``, padded with 0 at the end to the longest one (L)."""
        lengths = self.lengths[rows]
        positions = torch.arange(int(lengths.max()))
        inside = positions < lengths[:, None]
        where = (self.starts[rows, None] + positions).masked_fill(~inside, 0)
        return self.flat[where].to(torch.int64).masked_fill_(~inside, 0)


def encode(tokenizer, texts: list[str], max_length: int, rows=None) -> TokenIds:
    """Tokenise ``texts[rows]`` (default: all), truncated to ``max_length``; other rows stay empty."""
    rows = np.arange(len(texts)) if rows is None else np.asarray(rows, dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    parts = []
    for begin in range(0, len(rows), ENCODE_CHUNK):
        chunk = rows[begin:begin + ENCODE_CHUNK]
        ids = tokenizer([texts[i] for i in chunk], truncation=True, max_length=max_length)["input_ids"]
        lengths[chunk] = [len(x) for x in ids]
        parts.append(np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(lengths[chunk].sum())))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    starts = np.zeros(len(texts), dtype=np.int64)
    starts[rows] = np.cumsum(lengths[rows]) - lengths[rows]
    return TokenIds(torch.from_numpy(flat), torch.from_numpy(starts), torch.from_numpy(lengths))


# ---------------------------------------------------------------------------------------------- loader


class TextLoader(SeededLoader):
    """Iterable over (x int64 [B, L] token ids padded with 0, y int64 [B]) batches on ``device``.

    The same interface as ``TensorLoader`` (``dataset_size``, ``len()``, ``batch_indices``, exact resume
    with ``state_dict``/``load_state_dict``); L is the longest text of the batch.

    Args:
        tokens: the encoded texts.
        labels: int64 [N].
        batch_size: texts per batch.
        indices: which of the N texts this loader serves (default: all), e.g. a split's 'train'.
        shuffle: new random order every epoch.
        drop_last: drop the last incomplete batch.
        device: where batches go.
        seed: seeds the loader's own generator (the order).
    """

    def __init__(
        self,
        tokens: TokenIds,
        labels: torch.Tensor,
        batch_size: int,
        *,
        indices=None,
        shuffle: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        # Text has no pixel statistics: SeededLoader gets identity placeholders it never applies here.
        super().__init__((0.0,), (1.0,), batch_size, shuffle=shuffle, drop_last=drop_last, device=device, seed=seed)
        self.tokens = tokens
        self.labels = labels
        self.indices = torch.arange(len(labels)) if indices is None else torch.as_tensor(np.asarray(indices))
        self.indices = self.indices.to(torch.int64)
        if len(self.indices) == 0:
            raise ValueError("a loader needs at least one text")
        self.batch_indices: torch.Tensor | None = None  # text indices of the last batch

    @property
    def dataset_size(self) -> int:
        """Number of texts this loader serves per epoch (before drop_last)."""
        return len(self.indices)

    @property
    def targets(self) -> torch.Tensor:
        """Labels in dataset order (the batch order when not shuffled)."""
        return self.labels[self.indices]

    def __iter__(self):
        skip = self._order.start_epoch()
        g = self._order.generator
        order = self.indices[torch.randperm(self.dataset_size, generator=g)] if self.shuffle else self.indices
        pin = self.device.type == "cuda"
        for b in range(skip, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.tokens.pad(idx), self.labels[idx]
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            self._order.batch_done()
            self.batch_indices = idx
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self._order.end_epoch()

    def __repr__(self) -> str:
        return (f"TextLoader(texts={self.dataset_size}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, device={self.device})")


# ---------------------------------------------------------------------------------------------- all of it


def _check_labels(name: str, sets: dict[str, TextSet], num_classes: int) -> None:
    for split, part in sets.items():
        bad = part.labels[(part.labels < 0) | (part.labels >= num_classes)]
        if bad.size:
            raise ValueError(f"{name} {split}: labels must lie in 0..{num_classes - 1}, found {int(bad[0])}")


def text_loaders(
    name: str, root: Path, split_args: dict, *, num_classes: int, download: bool, tokenizer: str, max_length: int,
    batch_size: int, eval_batch_size: int, drop_last: bool, device: str | torch.device, seed: int,
) -> tuple[TextLoader, TextLoader | None, TextLoader, dict[str, np.ndarray]]:
    """Train/val/test loaders of ``name`` ('ag_news' or 'sst2') and its split (see ``text_split``)."""
    sets = read_text_sets(name, root, download)
    _check_labels(name, sets, num_classes)
    train_set = sets["train"]
    split = text_split(name, train_set.labels, **split_args)
    tok = load_tokenizer(tokenizer, download)
    rows = np.union1d(split["train"], split["val"])
    train_tokens = encode(tok, train_set.texts, max_length, rows)
    labels = torch.from_numpy(train_set.labels)
    train = TextLoader(train_tokens, labels, batch_size, indices=split["train"], shuffle=True, drop_last=drop_last,
                       device=device, seed=seed)

    def evaluation(tokens: TokenIds, part_labels: np.ndarray | torch.Tensor, indices=None) -> TextLoader:
        return TextLoader(tokens, torch.as_tensor(part_labels), eval_batch_size, indices=indices, device=device)

    if name == "sst2":
        val = evaluation(encode(tok, sets["validation"].texts, max_length), sets["validation"].labels)
    else:
        val = evaluation(train_tokens, labels, split["val"]) if len(split["val"]) else None
    test = evaluation(encode(tok, sets["test"].texts, max_length), sets["test"].labels)
    return train, val, test, split
