"""Text batches: `data.batch_size` rows of `data.max_len`, or fairseq's token budget.

fairseq's text 1.0 recipe (`config/text/pretraining/base.yaml`) batches by
`max_tokens: 8192` per GPU: blocks sorted by length, each batch as many rows
as fit in the budget once padded to its longest (`data_utils.batch_by_size`),
the batches shuffled. Under jit every batch shape is a compilation, so here
`data.max_tokens` (the budget summed over the official GPUs, 16 x 8192) is
spent per length bucket (`data.buckets`, ascending, the last = `data.max_len`):
a row joins the smallest bucket that holds it and is padded to that length; a
batch of bucket S has `bucket_rows(max_tokens, S, batch_size)` rows, a
multiple of `data.batch_size` (fairseq's `required_batch_size_multiple`: the
GPU count), so short rows come many to a batch, as in fairseq, and each
bucket keeps one static shape. Each epoch draws a fresh permutation of the
rows, cuts every bucket's rows into batches and shuffles the batches.

Process p of P gets rows [p b, (p+1) b) of every global batch (b = the
batch's rows / P): the processes read disjoint rows whose union is the
1-process batch. The plan is numpy over the rows' lengths (no token is
read), so every process computes the same one, and batch k is a pure
function of k: the iterator's checkpoint state is a position.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from d2v_jax.data.pipeline import (batch_number_dataset, bucket_rows, bucketed_epoch,
                                   local_batch_size, map_pretrain_dataset)
from d2v_jax.errors import DataError, check_field

BATCH_STREAM = 4  # the epoch's row permutation and batch order


def buckets_of(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    d = config.data
    return tuple(int(b) for b in (d.get("buckets", ()) or ())) or (int(d.max_len),)


def validate(config: ml_collections.ConfigDict) -> None:
    d = config.data
    budget = int(d.get("max_tokens", 0) or 0)
    check_field(budget >= 0, "data.max_tokens", f"{budget} must be >= 0 (0 = data.batch_size rows)")
    if not budget:
        return
    check_field(config.version == "v1", "data.max_tokens",
                "a token budget varies the row length per batch; 2.0's student encodes a static "
                "num_keep of data.max_len per row: use data.batch_size (and max_tokens=0)")
    buckets = buckets_of(config)
    check_field(list(buckets) == sorted(set(buckets)) and buckets[0] >= 3
                and buckets[-1] == int(d.max_len), "data.buckets",
                f"{buckets} must be increasing row lengths >= 3 ending at data.max_len={d.max_len}")
    rows = bucket_rows(budget, buckets[-1], int(d.batch_size))
    check_field(rows >= 1, "data.max_tokens",
                f"{budget} holds fewer than data.batch_size={d.batch_size} rows of "
                f"data.max_len={d.max_len}; raise it to at least {int(d.batch_size) * buckets[-1]}")


class BudgetPlan:
    """Which rows form global batch k, and its bucket length (module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, lengths: np.ndarray):
        d = config.data
        self.seed = int(config.seed)
        self.buckets = buckets_of(config)
        self.rows = tuple(bucket_rows(int(d.max_tokens), s, int(d.batch_size)) for s in self.buckets)
        # The bucket of each row (a byte per row: the plan of a billion-token
        # corpus stays small); a crop row longer than the last bucket joins it.
        self.bucket = np.minimum(np.searchsorted(np.asarray(self.buckets), lengths, side="left"),
                                 len(self.buckets) - 1).astype(np.int8)
        counts = np.bincount(self.bucket.astype(np.intp), minlength=len(self.buckets))
        self.num_batches = int(sum(c // r for c, r in zip(counts, self.rows)))
        if self.num_batches == 0:
            raise DataError(f"text: no bucket of data.buckets={self.buckets} fills one batch of "
                            f"{list(self.rows)} rows (rows per bucket {counts.tolist()}); lower "
                            "data.max_tokens")
        logging.info("text: token budget %d, buckets %s with %s rows each, %d batches per epoch "
                     "(rows per bucket %s)", d.max_tokens, self.buckets, self.rows,
                     self.num_batches, counts.tolist())

    @functools.lru_cache(maxsize=2)
    def epoch(self, epoch: int) -> list[np.ndarray]:
        return bucketed_epoch(self.seed, epoch, BATCH_STREAM, self.bucket, self.rows,
                              np.int32 if len(self.bucket) < 2**31 else np.int64)

    def batch(self, k: int) -> tuple[int, np.ndarray, int]:
        """(epoch, row indices, bucket length) of global batch k."""
        epoch, j = divmod(int(k), self.num_batches)
        idx = self.epoch(epoch)[j]
        return epoch, idx, self.buckets[int(self.bucket[idx[0]])]


class BudgetBatcher:
    """Global batch k -> this process's rows, read, padded and masked (grain map fn)."""

    def __init__(self, config, source, transform, process_index: int, process_count: int):
        self.plan = BudgetPlan(config, source.lengths())
        self.source, self.transform = source, transform
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, k: int, _: Any = None) -> dict[str, np.ndarray]:
        epoch, idx, length = self.plan.batch(k)
        local = len(idx) // self.process_count
        mine = idx[self.process_index * local:(self.process_index + 1) * local]
        rows = [self.transform(self.source[int(i)], epoch, length) for i in mine]
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def pretrain_dataset(config: ml_collections.ConfigDict, *, parts, process_index: int = 0,
                     process_count: int = 1, source: Any = None, num_threads: int = 4,
                     prefetch_buffer_size: int = 8) -> grain.IterDataset:
    """Endless batches for this process: `map_pretrain_dataset` with
    data.batch_size rows, or token-budget batches (`data.max_tokens` > 0)."""
    if not int(config.data.get("max_tokens", 0) or 0):
        return map_pretrain_dataset(config, parts, process_index=process_index,
                                    process_count=process_count, source=source,
                                    num_threads=num_threads,
                                    prefetch_buffer_size=prefetch_buffer_size)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    local_batch_size(config, process_count)  # data.batch_size divides over the processes
    src, transform = parts(config, source)
    batcher = BudgetBatcher(config, src, transform, process_index, process_count)
    return batch_number_dataset(batcher, batcher.plan.num_batches, config, len(src),
                                num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
