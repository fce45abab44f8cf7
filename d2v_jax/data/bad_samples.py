"""Unreadable samples met during training (`data.on_bad_sample`).

A run of days should not stop for one truncated FLAC or one file that is not
what its extension says, and must not quietly train on a broken mount either:

- `data.on_bad_sample = "skip"` (default): a sample that cannot be read
  (`errors.BadSampleError`, raised by a source naming the file) is replaced
  by the next readable record of the same source, `index + 1, index + 2, ...`
  (audio: by another row of its batch). The replacement is a function of the
  index alone, so a resumed run reads exactly what the uninterrupted run read.
  The record carries how many reads it replaced (`bad_samples`) and which
  (`bad_log`, JSON [[path, error], ...]); the loops count them
  (`bad_samples` in metrics.jsonl and the progress line), write each path
  and its error once to `<workdir>/bad_samples.jsonl`, and stop with one
  line (`TooManyBadSamples`, exit 3) once the replaced reads pass
  `data.max_bad_fraction` of the samples read (at least one epoch's worth:
  the denominator is max(samples read, examples in the source)).
- `"error"`: the first unreadable sample stops the run naming the file.

Evaluation sets are always read whole and strictly: a metric must not
silently change with what could be read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from d2v_jax.errors import BadSampleError, ConfigError, DataError, RunStopped

MODES = ("skip", "error")
DEFAULT_MODE = "skip"
DEFAULT_MAX_FRACTION = 1e-3
# Per-record / per-row fields the pipelines add; `host_fields` takes them out
# of a batch before it goes to the devices.
COUNT, LOG = "bad_samples", "bad_log"
HOST_FIELDS = (COUNT, LOG)
# How far past a bad index a source looks for a readable record before the
# data is declared unreadable (a broken mount, the wrong folder).
MAX_TRIES = 32
LOG_FILE = "bad_samples.jsonl"


class TooManyBadSamples(RunStopped):
    """More unreadable samples than `data.max_bad_fraction` allows."""


def settings(config: ml_collections.ConfigDict) -> tuple[str, float]:
    """(`data.on_bad_sample`, `data.max_bad_fraction`), checked."""
    d = config.data
    mode = d.get("on_bad_sample", DEFAULT_MODE)
    fraction = d.get("max_bad_fraction", DEFAULT_MAX_FRACTION)
    if mode not in MODES:
        raise ConfigError(f"config.data.on_bad_sample={mode!r}; expected one of {MODES}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ConfigError(f"config.data.max_bad_fraction={fraction!r} must be in [0, 1)")
    return mode, float(fraction)


class ForgivingSource:
    """A random-access source whose unreadable records are replaced by the
    next readable ones (mode 'skip') or raise (mode 'error'). Records gain
    `bad_samples` (int) and `bad_log` (str) fields."""

    def __init__(self, source: Any, mode: str) -> None:
        self.source = source
        self.mode = mode

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name: str) -> Any:  # labels, classes, ... of the source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.source)
        failed: list[list[str]] = []
        for k in range(min(MAX_TRIES, n)):
            try:
                record = self.source[(int(index) + k) % n]
            except BadSampleError as e:
                if self.mode == "error":
                    raise
                failed.append([e.path, str(e)])
                continue
            record = dict(record)
            record[COUNT] = np.int32(len(failed))
            record[LOG] = json.dumps(failed) if failed else ""
            return record
        raise DataError(f"{len(failed)} records in a row are unreadable from index {index} of "
                        f"{self.source!r} (data.on_bad_sample='skip' looks {MAX_TRIES} ahead): "
                        f"{failed[0][1]}")

    def __repr__(self) -> str:
        return f"ForgivingSource({self.source!r}, mode={self.mode!r})"


def wrap(source: Any, config: ml_collections.ConfigDict) -> Any:
    """`source` as `data.on_bad_sample` says; 'error' keeps it as it is."""
    mode, _ = settings(config)
    return source if mode == "error" else ForgivingSource(source, mode)


def carry(record: Mapping[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """`out` (a transform's output) with the record's bad-sample fields."""
    for key in HOST_FIELDS:
        if key in record:
            out[key] = record[key]
    return out


def replace_rows(batch: dict[str, np.ndarray], failed: dict[int, tuple[str, str]],
                 keys: tuple[str, ...]) -> None:
    """For batch-level pipelines (audio's length buckets): each unreadable row
    takes the next readable row of its batch, cyclically, in every field of
    `keys` (the same bucket, so the same shapes; a choice of the batch alone,
    so a resumed run repeats it), and the batch gains the `bad_samples` /
    `bad_log` fields. An empty `failed` just adds the fields."""
    n = len(batch[keys[0]])
    batch[COUNT] = np.zeros(n, np.int32)
    log = np.full(n, "", dtype=object)
    if failed:
        good = [r for r in range(n) if r not in failed]
        if not good:
            raise DataError(f"every one of the {n} rows of a batch is unreadable, e.g. "
                            f"{next(iter(failed.values()))[1]}")
        for r, (path, error) in failed.items():
            src = next((g for g in good if g > r), good[0])
            for key in keys:
                batch[key][r] = batch[key][src]
            batch[COUNT][r] = 1
            log[r] = json.dumps([[path, error]])
    batch[LOG] = log.astype(str)


def host_fields(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the batch the devices get, the bad-sample fields kept on the host)."""
    if not any(k in batch for k in HOST_FIELDS):
        return batch, {}
    return ({k: v for k, v in batch.items() if k not in HOST_FIELDS},
            {k: batch[k] for k in HOST_FIELDS if k in batch})


class BadSampleLog:
    """The host side: counts replaced reads, lists each bad path once in
    `<workdir>/bad_samples.jsonl` (process 0; process i of a multi-process
    run in `bad_samples.process_<i>.jsonl`), and stops the run past
    `data.max_bad_fraction`.

    `total` is the cumulative count of replaced reads since the run began
    (restored from metrics.jsonl on resume, so it continues as the
    uninterrupted run's); `check` sums it over processes, at logged steps
    only (a host sync), so every process stops at the same step.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | None,
                 num_examples: int | None, total: int = 0) -> None:
        self.mode, self.max_fraction = settings(config)
        self.num_examples = int(num_examples or 0)
        self.total = int(total)
        self.path = None
        self.seen: set[str] = set()
        if workdir is not None:
            p = jax.process_index()
            name = LOG_FILE if p == 0 else f"bad_samples.process_{p}.jsonl"
            self.path = os.path.join(workdir, name)
            if os.path.exists(self.path):  # a resumed run: paths already listed
                with open(self.path) as f:
                    self.seen = {json.loads(line)["path"] for line in f if line.strip()}

    def add(self, fields: Mapping[str, Any], step: int) -> None:
        """Counts one host batch's bad-sample fields (from `host_fields`)."""
        if not fields:
            return
        self.total += int(np.sum(fields.get(COUNT, 0)))
        for entry in np.asarray(fields.get(LOG, [])).reshape(-1):
            if not entry:
                continue
            for path, error in json.loads(str(entry)):
                if path in self.seen:
                    continue
                self.seen.add(path)
                logging.warning("unreadable sample skipped (data.on_bad_sample='skip'): %s", error)
                if self.path is not None:
                    with open(self.path, "a") as f:
                        f.write(json.dumps({"path": path, "error": error, "step": int(step)}) + "\n")

    def global_total(self) -> int:
        if jax.process_count() == 1:
            return self.total
        return int(np.sum(multihost_utils.process_allgather(np.int64(self.total))))

    def check(self, samples_read: int) -> int:
        """The global count; raises TooManyBadSamples past the allowed fraction of
        max(samples_read, num_examples)."""
        total = self.global_total()
        denominator = max(int(samples_read), self.num_examples, 1)
        if total > self.max_fraction * denominator:
            where = f"; listed in {self.path}" if self.path else ""
            raise TooManyBadSamples(
                f"{total} unreadable samples replaced in {samples_read} read (dataset "
                f"{self.num_examples}): more than data.max_bad_fraction={self.max_fraction:g} "
                f"of {denominator}{where}",
                hint="fix or remove the files, or raise data.max_bad_fraction; the run "
                     "resumes from its last checkpoint")
        return total


def restored_total(metrics_path: str, step: int) -> int:
    """The cumulative `bad_samples` logged at or before `step` (0 if none)."""
    total = 0
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                row = json.loads(line)
                if row.get("step", 0) <= step and COUNT in row:
                    total = int(row[COUNT])
    return total
