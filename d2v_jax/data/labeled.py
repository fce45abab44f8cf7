"""Labeled data for fine-tuning and linear probes.

The pieces, each usable alone:

- `allocate(class_sizes, total)`: per-class counts proportional to the class
  sizes, at least one per class, summing to exactly `total` (largest remainder).
- `split_test(labels, test_fraction, seed)`: the held-out test indices. The
  seed is `config.data.split_seed`, not the run's seed, so every fine-tune of a
  task (any label fraction, any seed, pretrained or scratch) is scored on the
  same examples.
- `label_subset(labels, pool, fraction, seed)`: the stratified fraction of the
  training pool whose labels a run may use; it keeps every class.
- `make_labeled_data(config, backbone_config)`: a task's source, splits and
  transforms as `LabeledData`, from a per-modality builder in `BUILDERS`.
- `train_dataset(...)` (grain: shuffle, repeat, seeded augmentation, batch) and
  `eval_arrays(...)` (deterministic, padded to a static batch with a `valid` row
  mask) feed the fine-tune loop.

Classification labels are ints; regression targets are floats. A modality
plugs in by adding a builder to `BUILDERS` that returns a random-access source
of `{"label": ..., "index": i, <model inputs>}` records and its train / eval
transforms producing the batch dict its model's `encode` takes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol

import grain
import ml_collections
import numpy as np

from d2v_jax.data import image as image_ops
from d2v_jax.data.sources import make_source

TASKS = ("classification", "regression")


class LabeledSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


# --------------------------------------------------------------------------
# Splits (pure numpy)
# --------------------------------------------------------------------------

def allocate(class_sizes: np.ndarray, total: int) -> np.ndarray:
    """Counts per class summing to exactly `total`, each in [1, size].

    Proportional to `class_sizes` (Hamilton's largest-remainder method), then
    raised to one for any class that got none, taking the example back from
    the classes furthest above their proportional share.
    """
    sizes = np.asarray(class_sizes, dtype=np.int64)
    k, n = len(sizes), int(sizes.sum())
    if np.any(sizes < 1):
        raise ValueError(f"allocate: every class needs at least one example, got sizes {sizes.tolist()}")
    if not k <= total <= n:
        raise ValueError(
            f"allocate: cannot keep every one of {k} classes with {total} of {n} examples; "
            f"the count must be in [{k}, {n}]")
    share = sizes * (total / n)
    counts = np.floor(share).astype(np.int64)
    # Largest remainders first; ties broken by class order for determinism.
    order = np.lexsort((np.arange(k), -(share - counts)))
    counts[order[: total - counts.sum()]] += 1
    while np.any(counts < 1):
        lacking = int(np.argmax(counts < 1))
        surplus = np.where(counts > 1, counts - share, -np.inf)
        donor = int(np.argmax(surplus))
        counts[donor] -= 1
        counts[lacking] += 1
    return counts


def _stratified_pick(labels: np.ndarray, pool: np.ndarray, count: int,
                     rng: np.random.Generator) -> np.ndarray:
    classes, inverse = np.unique(labels[pool], return_inverse=True)
    counts = allocate(np.bincount(inverse, minlength=len(classes)), count)
    picked = [rng.permutation(pool[inverse == c])[:counts[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(picked))


def fraction_count(fraction: float, n: int, field: str) -> int:
    """round(fraction * n), checked: `field` names the config key in errors."""
    if not 0 < fraction <= 1:
        raise ValueError(f"config.{field}={fraction} must be in (0, 1]")
    return int(round(fraction * n))


def split_test(labels: np.ndarray, test_fraction: float, seed: int,
               stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(train_pool, test) index arrays, sorted, disjoint, covering every example.

    `test` has round(test_fraction * n) examples, stratified by class when
    `stratify` (classification) and uniform otherwise (regression).
    """
    labels = np.asarray(labels)
    n = len(labels)
    all_idx = np.arange(n)
    count = fraction_count(test_fraction, n, "data.test_fraction")
    if count >= n:
        raise ValueError(f"config.data.test_fraction={test_fraction} leaves no training examples of {n}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7e57]))
    if stratify:
        test = _stratified_pick(labels, all_idx, count, rng)
    else:
        test = np.sort(rng.permutation(n)[:count])
    return np.setdiff1d(all_idx, test), test


def label_subset(labels: np.ndarray, pool: np.ndarray, fraction: float, seed: int,
                 stratify: bool = True) -> np.ndarray:
    """round(fraction * len(pool)) indices of `pool`, sorted.

    Stratified (every class kept, proportions preserved up to rounding) when
    `stratify`; uniform otherwise. `fraction == 1` returns the whole pool.
    """
    labels, pool = np.asarray(labels), np.asarray(pool)
    count = fraction_count(fraction, len(pool), "data.label_fraction")
    if count == len(pool):
        return np.sort(pool)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1abe1]))
    if stratify:
        num_classes = len(np.unique(labels[pool]))
        if count < num_classes:
            raise ValueError(
                f"config.data.label_fraction={fraction} keeps {count} of {len(pool)} training "
                f"labels, fewer than the {num_classes} classes; raise it to at least "
                f"{num_classes / len(pool):.4f}")
        return _stratified_pick(labels, pool, count, rng)
    if count < 1:
        raise ValueError(f"config.data.label_fraction={fraction} keeps no example of {len(pool)}")
    return np.sort(rng.permutation(pool)[:count])


# --------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------

@dataclasses.dataclass
class LabeledData:
    """A labeled task: the source, its fixed test split and the used labels.

    `train_transform(element, epoch)` and `eval_transform(element)` map a source
    record to one example of the model's batch dict plus "label".
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


class ImageFinetuneTransform:
    """(element, epoch) -> {"image": f32 [S,S,C], "label"}: seeded crop augmentation.

    mnist_5k digits are first padded onto the S x S canvas (as in pretraining);
    `data.crop_scale` / `crop_ratio` set the random-resized crop, `data.flip`
    the horizontal flip. With `data.augment = False` it is the eval transform.
    """

    def __init__(self, config: ml_collections.ConfigDict, view: ml_collections.ConfigDict) -> None:
        d = config.data
        self.seed = int(config.seed)
        self.augment = bool(d.augment)
        self.size = int(view.model.image_size)
        self.pad_first = view.data.source == "mnist_5k"
        self.crop_scale = tuple(float(v) for v in d.crop_scale)
        self.crop_ratio = tuple(float(v) for v in d.crop_ratio)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"config.data.crop_scale={d.crop_scale} must satisfy 0 < lo <= hi <= 1")
        self.flip = bool(d.flip)
        self.eval = image_ops.EvalTransform(view)

    def __call__(self, element: dict[str, Any], epoch: int) -> dict[str, Any]:
        if not self.augment:
            return self.eval(element)
        image = element["image"]
        rng = image_ops.example_rng(self.seed, epoch, int(element["index"]), image_ops.AUG_STREAM)
        if self.pad_first:
            image = image_ops.resize_pad(image, self.size)
        image = image_ops.random_resized_crop(rng, image, self.size, self.crop_scale, self.crop_ratio)
        if self.flip:
            image = image_ops.maybe_flip(rng, image)
        return self.eval({**element, "image": np.ascontiguousarray(image)})


def image_view(config: ml_collections.ConfigDict,
               backbone_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The backbone's config (image size, channels, normalization) pointed at
    the fine-tune data (`config.data.source`, `config.data.path`)."""
    view = ml_collections.ConfigDict(backbone_config.to_dict())
    view.data.source = config.data.source
    view.data.path = config.data.path
    return view


def _image_builder(config, backbone_config):
    view = image_view(config, backbone_config)
    source = make_source(view)
    if hasattr(source, "labels"):  # folder sources know their labels without decoding
        labels = np.asarray(source.labels)
    else:
        labels = np.asarray([source[i]["label"] for i in range(len(source))])
    transform = ImageFinetuneTransform(config, view)
    return source, labels, list(getattr(source, "classes", [])) or None, transform, transform.eval


# modality -> builder(config, backbone_config) ->
#   (source, labels, class_names, train_transform, eval_transform)
BUILDERS: dict[str, Callable] = {
    "image": _image_builder,
}


def make_labeled_data(config: ml_collections.ConfigDict,
                      backbone_config: ml_collections.ConfigDict) -> LabeledData:
    """The task of `config` (a fine-tune config) read with `backbone_config`'s
    preprocessing; the test split from `data.split_seed`, the labels from
    `data.label_fraction` and `seed`."""
    if config.modality not in BUILDERS:
        raise ValueError(f"config.modality={config.modality!r} has no labeled-data builder; "
                         f"known: {sorted(BUILDERS)} (add one to d2v_jax.data.labeled.BUILDERS)")
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r}; expected one of {TASKS}")
    source, labels, class_names, train_tf, eval_tf = BUILDERS[config.modality](config, backbone_config)
    classify = config.task == "classification"
    if classify:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"config.task='classification' needs integer labels; the "
                             f"{config.data.source!r} data has {labels.dtype} labels")
        if labels.min() < 0:
            raise ValueError(f"labels must be >= 0, found {labels.min()} in {config.data.source!r}")
        num_classes = int(labels.max()) + 1
    else:
        labels = labels.astype(np.float32)
        num_classes = None
    pool, test = split_test(labels, config.data.test_fraction, config.data.split_seed, classify)
    train = label_subset(labels, pool, config.data.label_fraction, config.seed, classify)
    return LabeledData(source=source, labels=labels, task=config.task, train=train, test=test,
                       train_pool=pool, num_classes=num_classes, class_names=class_names,
                       train_transform=train_tf, eval_transform=eval_tf)


# --------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------

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
                  num_threads: int = 2, prefetch_buffer_size: int = 4) -> grain.IterDataset:
    """Endless shuffled batches of the used training labels, augmented with
    per-example seeds (seed, epoch, index), so a rerun sees the same stream."""
    n = len(data.train)
    if n < 1:
        raise ValueError("no training labels: raise config.data.label_fraction")

    def apply(position: int, element: dict[str, Any]) -> dict[str, Any]:
        return _with_label(data.train_transform(element, position // n), element, data.labels)

    ds = grain.MapDataset.source(_Subset(data.source, data.train)).shuffle(seed=seed).repeat(None)
    ds = ds.map_with_index(apply).batch(batch_size, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                prefetch_buffer_size=prefetch_buffer_size))


def eval_arrays(data: LabeledData, indices: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The examples at `indices`, preprocessed without randomness, as batches of
    exactly `batch_size` rows (static shapes): the last one is padded by
    repeating its first row, and `valid` [b] marks the real rows."""
    rows = [_with_label(data.eval_transform(data.source[int(i)]), {"index": i}, data.labels)
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
