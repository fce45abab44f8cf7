"""Labeled data for fine-tuning and linear probes (any modality).

- `LabeledData`: a task's source, its fixed test split, the labels a run uses
  and its train / eval transforms; `labeled_data(config, *parts)` assembles it
  from a modality's `labeled_parts(config, backbone_config)` (the splits come
  from `d2v_jax.data.splits`).
- `label_ids`, `read_table`, `ArraySource`: labels and tables read from files.
- `train_dataset(...)` (grain: shuffle, repeat, seeded augmentation, batch) and
  `eval_arrays(...)` (deterministic, padded to a static batch with a `valid` row
  mask) feed the fine-tune loop.

Classification labels are ints; regression targets are floats. A modality plugs
in with `labeled_parts` returning a random-access source of
`{"label": ..., "index": i, <model inputs>}` records and its train / eval
transforms producing the batch dict its model's `encode` takes.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, Callable, Protocol

import grain
import ml_collections
import numpy as np

from d2v_jax.data import bad_samples, files
from d2v_jax.data.splits import label_subset, split_test
from d2v_jax.errors import ConfigError, DataError, DataNotFoundError


TASKS = ("classification", "regression")


class LabeledSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass
class LabeledData:
    """A labeled task: the source, its fixed test split and the used labels.

    `train_transform(element, epoch)` and `eval_transform(element)` map a source
    record to one example of the model's batch dict plus "label". With test-time
    augmentation the eval transform has `num_views` > 1 and
    `eval_transform(element, view)` gives view 1, 2, ... (view 0 is the plain
    input); evaluation averages the predictions over the views.
    """

    source: LabeledSource
    labels: np.ndarray          # [n] int (classification) or float (regression)
    task: str
    train: np.ndarray           # indices whose labels this run uses
    test: np.ndarray            # the held-out test indices
    train_pool: np.ndarray      # every non-test index (label_fraction = 1)
    num_classes: int | None
    class_names: list[str] | None
    train_transform: Callable[[dict[str, Any], int], dict[str, Any]]
    eval_transform: Callable[[dict[str, Any]], dict[str, Any]]
    # {name: positions in `test`} scored on their own too (MNLI matched / mismatched)
    test_groups: dict[str, np.ndarray] | None = None

    @property
    def num_eval_views(self) -> int:
        """Test-time views per example (1 = the plain input only)."""
        return int(getattr(self.eval_transform, "num_views", 1))


def label_ids(names: Sequence[str], origins: Sequence[str], classes: Sequence[str] = (),
              field: str = "label") -> tuple[np.ndarray, list[str]]:
    """Class-name labels -> (int64 ids, class names).

    The classes are the sorted distinct names, or `classes` (config.data.classes,
    in that order) when given: then a name outside it is an error naming where
    it was read (`origins[i]`) and `field`.
    """
    if classes:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise ConfigError(f"config.data.classes={classes} has duplicates")
    else:
        classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    ids = np.empty(len(names), np.int64)
    for i, name in enumerate(names):
        if name not in index:
            raise DataError(f"{origins[i]}: {field} {name!r} is not one of config.data.classes "
                            f"{classes}")
        ids[i] = index[name]
    return ids, classes


def read_table(path: str, columns: Sequence[str], fields: Sequence[str]
               ) -> list[tuple[str, dict[str, str]]]:
    """(origin 'path:line', {column: value}) for every record of a CSV or TSV
    file with a header row that names every one of `columns`.

    `.tsv` / `.tab` files are tab-separated without quoting (GLUE style: quotes
    are text); other files are CSV with the usual double-quote rules. Errors
    name the file, the line and the column (`fields[j]` is the config key that
    named `columns[j]`).
    """
    if not os.path.isfile(path):
        raise DataNotFoundError(f"labeled data file {path!r} (config.data.path) does not exist")
    tsv = path.lower().endswith((".tsv", ".tab"))
    lines = list(files.lines(path))  # strict UTF-8, errors name the line
    reader = csv.reader((text for _, text in lines), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    header = next(reader, None)
    if not header:
        raise DataError(f"{path}: empty file; expected a header row naming the columns "
                        f"{list(columns)}")
    header = [h.strip() for h in header]
    for column, field in zip(columns, fields):
        if column not in header:
            raise DataError(f"{path}: no column {column!r} (config.data.{field}) in the header "
                            f"{header}")
    where = {c: header.index(c) for c in columns}
    rows = []
    try:
        for row in reader:
            line = reader.line_num
            if not row or not any(v.strip() for v in row):
                continue  # blank lines
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} fields, but the header has "
                                f"{len(header)} ({header})" + ("; a tab inside the text?"
                                                                 if tsv else ""))
            rows.append((f"{path}:{line}", {c: row[j] for c, j in where.items()}))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return rows


class ArraySource:
    """Random access to rows of named arrays: {name: array[i], "index": i}."""

    def __init__(self, name: str, **arrays: np.ndarray) -> None:
        self.name, self.arrays = name, arrays
        self._len = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return {**{k: v[index] for k, v in self.arrays.items()}, "index": index}

    def __repr__(self) -> str:
        return f"ArraySource({self.name}, len={len(self)})"


def labeled_data(config: ml_collections.ConfigDict, source: LabeledSource, labels: np.ndarray,
                 class_names: list[str] | None, train_transform: Callable,
                 eval_transform: Callable) -> LabeledData:
    """The task of `config` (a fine-tune config) from a modality's parts; the
    test split from `data.split_seed`, the labels from `data.label_fraction`
    and `seed`."""
    if config.task not in TASKS:
        raise ConfigError(f"config.task={config.task!r}; expected one of {TASKS}")
    classify = config.task == "classification"
    if classify:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(f"config.task='classification' needs integer labels; the "
                              f"{config.data.source!r} data has {labels.dtype} labels")
        if labels.min() < 0:
            raise DataError(f"labels must be >= 0, found {labels.min()} in {config.data.source!r}")
        num_classes = int(labels.max()) + 1
    else:
        labels = labels.astype(np.float32)
        num_classes = None
    given = getattr(source, "splits", None)  # a task with its own train / dev files (GLUE)
    if given is not None:
        pool, test = np.asarray(given["train"]), np.asarray(given["test"])
    else:
        pool, test = split_test(labels, config.data.test_fraction, config.data.split_seed,
                                classify)
    train = label_subset(labels, pool, config.data.label_fraction, config.seed, classify)
    return LabeledData(source=source, labels=labels, task=config.task, train=train, test=test,
                       train_pool=pool, num_classes=num_classes, class_names=class_names,
                       train_transform=train_transform, eval_transform=eval_transform,
                       test_groups=getattr(source, "test_groups", None))


class _Subset:
    """Random access to `source` restricted to `indices` (grain source)."""

    def __init__(self, source: LabeledSource, indices: np.ndarray) -> None:
        self.source, self.indices = source, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.source[int(self.indices[i])]


def _with_label(example: dict[str, Any], element: dict[str, Any], labels: np.ndarray) -> dict[str, Any]:
    out = {k: v for k, v in example.items() if k != "index"}
    out["label"] = labels[int(element["index"])]
    return out


def train_dataset(data: LabeledData, batch_size: int, seed: int, *,
                  num_threads: int = 2, prefetch_buffer_size: int = 4,
                  on_bad_sample: str = "error") -> grain.IterDataset:
    """Endless shuffled batches of the used training labels, augmented with
    per-example seeds (seed, epoch, index), so a rerun sees the same stream.
    `on_bad_sample='skip'`: an unreadable example is replaced by the next
    readable one of the training subset, with its own label
    (d2v_jax/data/bad_samples.py)."""
    n = len(data.train)
    if n < 1:
        raise ConfigError("no training labels: raise config.data.label_fraction")

    def apply(position: int, element: dict[str, Any]) -> dict[str, Any]:
        example = _with_label(data.train_transform(element, position // n), element, data.labels)
        return bad_samples.carry(element, example)

    source = _Subset(data.source, data.train)
    if on_bad_sample != "error":
        source = bad_samples.ForgivingSource(source, on_bad_sample)
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds.map_with_index(apply).batch(batch_size, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                prefetch_buffer_size=prefetch_buffer_size))


def eval_arrays(data: LabeledData, indices: np.ndarray, batch_size: int, view: int = 0
                ) -> list[dict[str, np.ndarray]]:
    """The examples at `indices`, preprocessed without randomness, as batches of
    exactly `batch_size` rows (static shapes): the last one is padded by
    repeating its first row, and `valid` [b] marks the real rows. `view` > 0:
    that test-time view of each example (`LabeledData.num_eval_views`)."""
    if not 0 <= view < data.num_eval_views:
        raise ValueError(f"view {view} not in [0, {data.num_eval_views})")

    def transform(element):
        return data.eval_transform(element, view) if view else data.eval_transform(element)

    rows = [_with_label(transform(data.source[int(i)]), {"index": i}, data.labels)
            for i in indices]
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        valid = np.zeros(batch_size, bool)
        valid[:len(chunk)] = True
        chunk = chunk + [chunk[0]] * (batch_size - len(chunk))
        batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
        batch["valid"] = valid
        batches.append(batch)
    return batches


def num_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
