"""The grain pipeline that feeds pretraining: source -> shuffle -> repeat ->
transform (crop, flip, normalize, masks) -> per-process batch -> iterator.
Modalities whose examples are independent (image, text) build theirs with
`map_pretrain_dataset`; a batch-level pipeline (audio's length buckets) is
the modality's own.

Everything up to `.to_iter_dataset` is a lazy random-access `MapDataset`, so
the iterator's checkpoint state is just a position: `get_state()` /
`set_state()` (or orbax's `grain.checkpoint.CheckpointSave`) resume exactly,
with the same examples, crops and masks.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import grain
import ml_collections
import numpy as np
from absl import flags

from d2v_jax.data import bad_samples
from d2v_jax.data.splits import split_test
from d2v_jax.errors import ConfigError, DataError


def holdout_split(config: ml_collections.ConfigDict, source) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) indices of `source` for pretraining.

    `data.holdout_fraction` of the labeled examples (stratified, seeded by
    `data.holdout_seed`) are kept out of pretraining. With the same fraction
    and seed as a fine-tune's `data.test_fraction` / `data.split_seed` this is
    exactly its test split, so the test images are unseen by the encoder too.
    """
    labels = getattr(source, "labels", None)
    if labels is None:
        raise ConfigError(f"config.data.holdout_fraction={config.data.holdout_fraction}: the source "
                          f"{source!r} has no `labels` to stratify the held-out split by")
    return split_test(np.asarray(labels), float(config.data.holdout_fraction),
                      int(config.data.holdout_seed))


def check_holdout_fraction(config: ml_collections.ConfigDict) -> float:
    """`data.holdout_fraction` (0 when the config has none), checked to be in [0, 1)."""
    fraction = float(config.data.get("holdout_fraction", 0.0) or 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"config.data.holdout_fraction={fraction} is not in [0, 1)")
    return fraction


def held_out_indices(config: ml_collections.ConfigDict, labels, stratify: bool = True
                     ) -> np.ndarray:
    """The indices of a labeled set (its `labels` in the fine-tune's order) that
    pretraining leaves out: `split_test` with `data.holdout_fraction` /
    `data.holdout_seed` in place of the fine-tune's `data.test_fraction` /
    `data.split_seed`, stratified for classification sets, uniform for
    regression ones, as the fine-tune splits (`data.labeled.labeled_data`)."""
    fraction = check_holdout_fraction(config)
    return split_test(np.asarray(labels), fraction, int(config.data.get("holdout_seed", 0)),
                      stratify)[1]


# data.num_workers="auto": no worker processes on this many usable cores or fewer.
# Measured on the 2-core development VM (docs/performance.md): a grain worker
# takes 5-8 s to start (it imports the package and jax), and the workers then
# compete with the train step for the same two cores.
AUTO_WORKERS_MIN_CORES = 2
# ... and at most this many (each holds a copy of the pipeline and its buffers).
AUTO_WORKERS_MAX = 32


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's
    cpuset or a Slurm allocation), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_num_workers(value: Any, cores: int | None = None) -> int:
    """`data.num_workers` as a count: an int >= 0 as is; "auto" = 0 on
    <= AUTO_WORKERS_MIN_CORES usable cores, else one worker per core but the
    one the train loop keeps, at most AUTO_WORKERS_MAX."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        cores = usable_cores() if cores is None else int(cores)
        if cores <= AUTO_WORKERS_MIN_CORES:
            return 0
        return min(cores - 1, AUTO_WORKERS_MAX)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"config.data.num_workers={value!r} must be an int >= 0 or 'auto'")
    return int(value)


def local_batch_size(config: ml_collections.ConfigDict, process_count: int) -> int:
    """Per-process batch: config.data.batch_size split evenly over processes."""
    global_batch = int(config.data.batch_size)
    if process_count < 1 or global_batch < 1 or global_batch % process_count:
        raise ConfigError(
            f"config.data.batch_size={global_batch} must be a positive multiple of the "
            f"process count {process_count}")
    return global_batch // process_count


def bucket_rows(max_tokens: int, length: int, multiple: int) -> int:
    """Rows of a token-budget batch of `length`-token examples (SPEC 7):
    `(max_tokens // length) // multiple * multiple`, the most rows of `length`
    that fit in `max_tokens`, rounded down to a multiple of `multiple`."""
    if length < 1 or multiple < 1:
        raise ValueError(f"bucket_rows: length={length} and multiple={multiple} must be >= 1")
    return (int(max_tokens) // int(length)) // int(multiple) * int(multiple)


def bucketed_epoch(seed: int, epoch: int, stream: int, bucket: np.ndarray,
                   rows: tuple[int, ...], index_dtype: Any = None) -> list[np.ndarray]:
    """An epoch of length-bucketed batches: one permutation of the examples
    (`bucket[i]` = example i's bucket, -1 = unused), each bucket's members in
    that order cut into batches of `rows[b]` (the remainder dropped), the
    batches in random order. A pure function of (seed, epoch, stream), so every
    process plans the same global batches. `index_dtype` narrows the indices
    (a large corpus' plan)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(stream)]))
    perm = rng.permutation(len(bucket))
    if index_dtype is not None:
        perm = perm.astype(index_dtype)
    batches = []
    for b, n_rows in enumerate(rows):
        members = perm[bucket[perm] == b]
        n = len(members) // n_rows * n_rows
        batches.extend(members[:n].reshape(-1, n_rows))
    return [batches[j] for j in rng.permutation(len(batches))]


def batch_number_dataset(batcher: Callable[[int, Any], dict], num_batches: int,
                         config: ml_collections.ConfigDict, num_examples: int, *,
                         num_threads: int = 4, prefetch_buffer_size: int = 8) -> grain.IterDataset:
    """Endless batches from `batcher(k)` = global batch k, a pure function of k:
    a lazy random-access dataset over batch numbers, so the iterator's
    checkpoint state is a position; run by `with_workers`."""
    ds = grain.MapDataset.range(num_batches).repeat(None)
    ds = ds.map_with_index(batcher)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch_buffer_size))
    return with_workers(it, config, num_examples)


def map_pretrain_dataset(
    config: ml_collections.ConfigDict,
    parts: Callable[[ml_collections.ConfigDict, Any], tuple[Any, Callable]],
    *,
    process_index: int = 0,
    process_count: int = 1,
    source: Any = None,
    num_threads: int = 4,
    prefetch_buffer_size: int = 8,
) -> grain.IterDataset:
    """Endless batches for this process, from a modality's per-example pieces.

    `parts(config, source)` -> (random-access source, transform(element, epoch))
    gives the examples and turns one into the model's inputs with its masks
    (e.g. for images {"image": f32 [S, S, C], "mask": bool [M, N], ...}); they
    are batched to b = data.batch_size // process_count rows. Process p gets
    rows [p*b, (p+1)*b) of every global batch, so the processes together see
    exactly the 1-process stream. `source` overrides the config's source
    (custom data, tests). `num_threads` /
    `prefetch_buffer_size` are grain's in-process read threads and the number
    of batches they buffer (per worker when data.num_workers > 0).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    batch = local_batch_size(config, process_count)
    src, transform = parts(config, source)
    num_examples = len(src)
    if num_examples < 1:
        raise DataError(f"data source {src!r} is empty")
    # An unreadable record is replaced by the next readable one (data.on_bad_sample).
    src = bad_samples.wrap(src, config)

    def apply(position: int, element: dict[str, Any]) -> dict[str, Any]:
        # `position` counts examples in the global stream (all processes), so
        # the epoch, and with it the crop/mask seeds, is shard-independent.
        return bad_samples.carry(element, transform(element, position // num_examples))

    ds = grain.MapDataset.source(src)
    # shuffle-then-repeat: repeat re-seeds the shuffle each epoch, so every
    # epoch is a fresh permutation (each index exactly once per epoch).
    ds = ds.shuffle(seed=config.seed).repeat(None)
    ds = ds.map_with_index(apply)
    # Batches of b consecutive examples; global batch k is the chunks
    # [k*P, (k+1)*P), and process p keeps chunk k*P + p. MapDataset is lazy,
    # so other processes' examples are never decoded here.
    ds = ds.batch(batch, drop_remainder=True)
    if process_count > 1:
        ds = ds[process_index::process_count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    return with_workers(it, config, num_examples)


def with_workers(it: grain.IterDataset, config: ml_collections.ConfigDict,
                 num_examples: int | None = None) -> grain.IterDataset:
    """`it` run by `data.num_workers` grain worker processes (resolved), or as
    is for 0. `num_examples` (the source's size) is kept as an attribute: the
    train loop's bad-sample limit counts at least one epoch of it."""
    workers = resolve_num_workers(config.data.num_workers)
    if workers > 0:
        # grain's workers read absl flags; outside `app.run` (notebooks, tests)
        # they are unparsed and grain would raise, so fall back to defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    it.num_examples = num_examples
    return it
