"""Loading text-classification splits (local CSV/CSV.gz or the hub), tokenizing once, batching.

Local layout: a directory with ``train.csv[.gz]`` and ``test.csv[.gz]`` (and, read only where clients bring
their own data and accuracies are measured on validation rows, ``val.csv[.gz]``), either with a header that
names ``label_column`` and ``text_columns`` (our AG News copy: ``label,title,description``, labels
0-based) or headerless in the original AG News order (label 1..C, then the text columns).
Without a directory the hub dataset ``fancyzhx/ag_news`` is loaded through ``datasets``.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import ExperimentConfig

HUB_DATASET = "fancyzhx/ag_news"


class DataError(ValueError):
    """A data file or split is missing or malformed; the message names the file and the problem."""


@dataclass
class TextSplit:
    """One split as plain texts and integer labels (0..C-1)."""

    texts: list[str]
    labels: np.ndarray
    source: str
    groups: list[str] | None = None  # each row's value of the group column (partition = "natural")

    def __len__(self) -> int:
        return len(self.labels)


def find_split_file(data_dir: Path, split: str) -> Path:
    for name in (f"{split}.csv", f"{split}.csv.gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"data directory {data_dir} has no {split}.csv or {split}.csv.gz")


def read_csv_split(path: Path, text_columns: Sequence[str], label_column: str, num_labels: int,
                   group_column: str = "") -> TextSplit:
    """Read one CSV split, accepting our header format or the original headerless AG News format.
    ``group_column`` (header format only): also keep each row's value of that column (``TextSplit.groups``).

    The one reader of every data file (a data directory's splits, a client's own file, the audit's public
    rows), so that each damaged file gets the same one-line error: a ``.gz`` whose stream is cut short
    (``EOFError``), fails its checksum (``BadGzipFile``) or is damaged inside (``zlib.error``, which is
    no ``OSError``) alike."""
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty") from None
    except (zlib.error, gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path} is a damaged gzip file ({e}); replace it with an intact copy") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path} is not a readable CSV file: {e}") from None
    if raw.empty:
        raise DataError(f"{path} is empty")
    first = list(raw.iloc[0])
    if label_column in first:
        frame = raw.iloc[1:].set_axis(first, axis=1)
        wanted = [label_column, *text_columns] + ([group_column] if group_column else [])
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise DataError(f"{path} has columns {first}, missing {missing} "
                            f"(set text_columns / label_column / partition_by to match)")
        label_text, offset = frame[label_column], 0
        texts_frame = frame[list(text_columns)]
    else:
        # Original AG News: no header, label 1..C in the first column, then the text columns.
        if raw.shape[1] != 1 + len(text_columns):
            raise DataError(f"{path} has no header naming {label_column!r} and {raw.shape[1]} columns; a "
                            f"headerless file needs {1 + len(text_columns)} (label, "
                            f"{', '.join(text_columns)})")
        if group_column:
            raise DataError(f"{path} has no header, so no column {group_column!r} to partition by (partition_by)")
        label_text, offset = raw[0], 1
        texts_frame = raw.iloc[:, 1:]
    if len(label_text) == 0:
        raise DataError(f"{path} has a header but no rows")
    labels = pd.to_numeric(label_text.str.strip(), errors="coerce")
    bad = labels.isna() | (labels % 1 != 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: label {label_text.iloc[row]!r} in data row {row + 1} is not an integer")
    # the range is checked on the values as read: a label like 1e300 would wrap when cast to an integer
    out_of_range = ((labels - offset < 0) | (labels - offset >= num_labels)).to_numpy()
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        lo, hi = offset, num_labels - 1 + offset
        raise DataError(f"{path}: label {label_text.iloc[row].strip()} in data row {row + 1} is outside {lo}..{hi} "
                        f"({num_labels} classes configured in class_names)")
    labels = labels.to_numpy().astype(np.int64) - offset
    texts = [" ".join(part for part in parts if part) for parts in texts_frame.itertuples(index=False)]
    if not any(t.strip() for t in texts):
        raise DataError(f"{path}: every row's text ({', '.join(map(str, texts_frame.columns))}) is empty; "
                        "check text_columns")
    groups = list(frame[group_column]) if group_column else None
    return TextSplit(texts=texts, labels=labels, source=str(path), groups=groups)


def load_hub_split(split: str, num_labels: int) -> TextSplit:  # pragma: no cover - needs the network
    """AG News from the hub (``datasets``); its ``text`` already joins title and description."""
    import datasets

    try:
        ds = datasets.load_dataset(HUB_DATASET, split=split)
    except Exception as e:
        raise DataError(f"could not load {HUB_DATASET} split {split!r} from the hub ({e}); "
                        f"pass data_dir or set FEDSLIP_DATA_DIR to a local copy") from None
    labels = np.asarray(ds["label"], dtype=np.int64)
    if labels.min() < 0 or labels.max() >= num_labels:
        raise DataError(f"{HUB_DATASET}: labels outside 0..{num_labels - 1}")
    return TextSplit(texts=list(ds["text"]), labels=labels, source=f"hub:{HUB_DATASET}/{split}")


def load_split(cfg: ExperimentConfig, split: str) -> TextSplit:
    """One split (``train`` / ``test``) named by the config: the local directory's file, else the hub's."""
    data_dir = cfg.resolved_data_dir()
    group_column = cfg.partition_by if cfg.partition == "natural" else ""
    if not data_dir:
        if group_column:
            raise DataError(f"partition='natural' reads the column {group_column!r} of a local data directory; "
                            "set data_dir")
        return load_hub_split(split, cfg.num_labels)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    return read_csv_split(find_split_file(root, split), cfg.text_columns, cfg.label_column, cfg.num_labels,
                          group_column)


def has_local_split(cfg: ExperimentConfig, split: str) -> bool:
    """Whether the config's data directory holds ``split`` (``<split>.csv[.gz]``); the hub's AG News has no
    ``val`` split."""
    data_dir = cfg.resolved_data_dir()
    return bool(data_dir) and any((Path(data_dir) / f"{split}.csv{ext}").is_file() for ext in ("", ".gz"))


def load_splits(cfg: ExperimentConfig) -> tuple[TextSplit, TextSplit]:
    """The train and test splits named by the config (local directory, else the hub)."""
    return load_split(cfg, "train"), load_split(cfg, "test")


def read_own_file(cfg: ExperimentConfig, path: str | Path) -> TextSplit:
    """A client's own data file (``partition = "own"``), with the data directory's columns."""
    return read_csv_split(check_own_file(path), cfg.text_columns, cfg.label_column, cfg.num_labels)


def check_own_file(path: str | Path) -> Path:
    """A client's data file, refused with one clear error when it is not there."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"client data file {path} is a directory; name the client's CSV file in it")
    if not path.is_file():
        raise DataError(f"client data file {path} does not exist")
    return path


class Encoded:
    """Token ids of a set of rows, tokenized once per run and padded per batch.

    The ids of all rows are one flat int32 array with row offsets: a client's rows live for the whole
    run, and as Python lists of ints they cost ~45 bytes per token (~2.8 KB per 64-token row, 34 MiB for
    1,000 clients of 12 rows), as an array 4."""

    def __init__(self, input_ids: Sequence[Sequence[int]], labels: torch.Tensor):
        lengths = np.fromiter((len(r) for r in input_ids), dtype=np.int64, count=len(input_ids))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.tokens = np.fromiter((t for r in input_ids for t in r), dtype=np.int32, count=int(self.offsets[-1]))
        self.lengths = lengths
        self.labels = labels

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> list[int]:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]].tolist()

    @property
    def input_ids(self) -> list[list[int]]:
        """Every row's ids as lists (what a tokenizer returns)."""
        return [self.row(i) for i in range(len(self))]

    def digest(self) -> str:
        """SHA-256 of the rows (ids and labels): equal exactly when the rows are."""
        h = hashlib.sha256()
        for part in (self.offsets, self.tokens, self.labels.numpy()):
            h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest()

    @classmethod
    def union(cls, parts: Sequence[Encoded]) -> Encoded:
        """The rows of ``parts`` in order."""
        return cls([r for p in parts for r in p.input_ids], torch.cat([p.labels for p in parts]))


def encode(tokenizer, split: TextSplit, rows: Sequence[int], max_seq_len: int) -> Encoded:
    texts = [split.texts[i] for i in rows]
    ids = tokenizer(texts, truncation=True, max_length=max_seq_len)["input_ids"] if texts else []
    return Encoded(ids, labels=torch.as_tensor(split.labels[list(rows)], dtype=torch.long))


PAD_MULTIPLE = 8  # batches are padded to a multiple of this many tokens


def collate(tokenizer, data: Encoded, idx: Sequence[int]) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad to the longest sequence of this batch (rounded up to ``PAD_MULTIPLE``), not to
    max_seq_len. The rounding bounds the number of distinct batch shapes: bf16 kernels on a CPU (oneDNN)
    keep compiled code per input shape, and with one shape per sequence length a federation whose clients
    each bring new lengths grew by ~70 MiB over 1,000 clients (tiny backbone); a multiple of 8 is also
    what GPU tensor cores want. Padded positions are masked, so a row's logits do not depend on it."""
    batch = tokenizer.pad({"input_ids": [data.row(i) for i in idx]}, return_tensors="pt",
                          pad_to_multiple_of=PAD_MULTIPLE)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": data.labels[list(idx)]}


GROUP_CHUNK_BATCHES = 16  # group_by_length: rows are sorted by length within chunks of this many batches


def train_batches(tokenizer, data: Encoded, batch_size: int, generator: torch.Generator,
                  steps: int, group_by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` shuffled batches (``batch_rows``), collated."""
    for idx in batch_rows(data, batch_size, generator, steps, group_by_length):
        yield collate(tokenizer, data, idx)


def batch_rows(data: Encoded, batch_size: int, generator: torch.Generator, steps: int,
               group_by_length: bool = False) -> Iterator[list[int]]:
    """The row indices of ``steps`` shuffled batches, reshuffling at each pass over the data (epochs
    continue seamlessly).

    ``group_by_length``: each shuffled chunk of ``GROUP_CHUNK_BATCHES`` batches is sorted by length and
    cut into batches, then the batches are shuffled, so a batch holds rows of similar length and
    dynamic padding has little to pad (a random batch of AG News rows almost always contains a
    full-length one). Every row is still seen once per pass; batch composition changes."""
    done = 0
    while done < steps:
        order = torch.randperm(len(data), generator=generator).tolist()
        if group_by_length:
            chunk = batch_size * GROUP_CHUNK_BATCHES
            batches = []
            for c in range(0, len(order), chunk):
                rows = sorted(order[c:c + chunk], key=lambda i: data.lengths[i])
                batches += [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        else:
            batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        for idx in batches:
            if done == steps:
                return
            yield idx
            done += 1


def eval_batches(tokenizer, data: Encoded, batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(row indices, batch) in length-grouped order, so that little compute goes to padding."""
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, collate(tokenizer, data, idx)
