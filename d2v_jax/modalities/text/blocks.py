"""Token records -> the rows a text run trains on, as fairseq's `TokenBlockDataset`
builds them (`fairseq/data/token_block_dataset.py`, `token_block_utils_fast.pyx`).

A corpus is a sequence of *records*, each a run of token ids ending with
`</s>`: a document (our corpora), or a line of one (fairseq-preprocess output,
and `data.doc_sep='fairseq'`), where a record of only `</s>` (an empty line)
ends a document. Records lie back to back in one token stream: the files of a
split one after the other (`SplitTokens`, fairseq's `combine`, which builds
its blocks over the concatenation too), or `MemoryTokens` for a corpus read
into memory; a row is one slice of that stream, `<s>` prepended.

`data.packing` -> fairseq's `sample_break_mode`, block size B = data.max_len - 1
(the row's `<s>` is the last position, fairseq `tokens_per_sample - 1`):
  stream        `none`: the stream cut every B tokens; no index needed, a row is
                found by arithmetic.
  complete      `complete`: whole records packed greedily into blocks of <= B.
  complete_doc  `complete_doc`: the same, but a block never crosses an empty
                record (a document boundary), which is dropped; blocks of one
                token are dropped.
  doc           `eos`: one record per block.
A single record longer than B is a block of its own in fairseq (which its
trainer then drops as longer than the model's positions); here it follows
`data.too_long`: `error` (naming it), `skip` (fairseq's outcome), `split` into
consecutive blocks of B tokens, or `crop` (kept whole; the transform takes a
random window of max_len each epoch).

`stream` rows need no table. The other block tables (start token, length) are
computed once and cached beside the split
(`<split>.<packing>-<max_len>-<too_long>.rows.npy`, memory-mapped afterwards),
so later runs start in constant time whatever the corpus size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from d2v_jax.errors import ConfigError, DataError

PACKINGS = ("stream", "complete", "complete_doc", "doc")
TOO_LONG = ("error", "skip", "split", "crop")
SEPARATOR_LEN = 1  # fairseq document_sep_len: an empty line's record is its </s>
WINDOW = 1 << 20  # records per pass of the greedy packer (bounded memory)


def check_packing(packing: str, too_long: str, max_len: int) -> None:
    if packing not in PACKINGS:
        raise ConfigError(f"config.data.packing={packing!r}; expected one of {PACKINGS}")
    if too_long not in TOO_LONG:
        raise ConfigError(f"config.data.too_long={too_long!r}; expected one of {TOO_LONG}")
    if max_len < 3:
        raise ConfigError(f"config.data.max_len={max_len} must be >= 3 (<s>, a token, </s>)")


class MemoryTokens:
    """Records held in memory: one int32 stream and each record's size."""

    def __init__(self, records: Sequence[np.ndarray], name: str = "memory"):
        self.sizes = np.asarray([len(r) for r in records], np.int64)
        self.stream = (np.concatenate([np.asarray(r, np.int32) for r in records])
                       if len(records) else np.zeros(0, np.int32))
        self.num_tokens = int(self.stream.size)
        self.prefix = name

    def __len__(self) -> int:
        return len(self.sizes)

    def read(self, start: int, count: int) -> np.ndarray:
        return self.stream[int(start):int(start) + int(count)]


class SplitTokens:
    """The files of a split (`IndexedTokens`) as one record stream."""

    def __init__(self, parts: Sequence[Any], name: str):
        self.parts = list(parts)
        self.prefix = name
        self.starts = np.concatenate([[0], np.cumsum([p.num_tokens for p in self.parts])])
        self.num_tokens = int(self.starts[-1])

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def sizes(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.sizes) for p in self.parts]) if self.parts else \
            np.zeros(0, np.int32)

    @property
    def mtime(self) -> float:
        return max(os.path.getmtime(p.prefix + ".idx") for p in self.parts)

    def read(self, start: int, count: int) -> np.ndarray:
        start, end = int(start), int(start) + int(count)
        f = int(np.searchsorted(self.starts, start, side="right")) - 1
        out = []
        while start < end:
            local = start - int(self.starts[f])
            take = min(end - start, self.parts[f].num_tokens - local)
            out.append(self.parts[f].read(local, take))
            start += take
            f += 1
        return out[0] if len(out) == 1 else np.concatenate(out) if out else np.zeros(0, np.int32)


# ----------------------------------------------------------------------------- block tables


def greedy_blocks(sizes: np.ndarray, block: int, doc_breaks: bool) -> np.ndarray:
    """fairseq `complete` (doc_breaks=False) / `complete_doc` block table:
    int64 [n, 3] = (start token, length, first record), in order."""
    sizes = np.asarray(sizes)
    n = len(sizes)
    out: list[tuple[int, int, int]] = []
    s, tok = 0, 0  # first record of the next block, its token offset
    while s < n:
        w1 = min(n, s + WINDOW)
        win = sizes[s:w1].astype(np.int64)
        cum = np.concatenate([[0], np.cumsum(win)])
        seps = np.flatnonzero(win == SEPARATOR_LEN) if doc_breaks else np.zeros(0, np.int64)
        i = 0  # position in the window
        while i < len(win):
            if doc_breaks and win[i] == SEPARATOR_LEN:  # an empty record: a boundary
                tok += SEPARATOR_LEN
                i += 1
                continue
            # the records i..e-1 with cum[e] - cum[i] <= block, at least one
            e = max(int(np.searchsorted(cum, cum[i] + block, side="right")) - 1, i + 1)
            if doc_breaks:
                k = int(np.searchsorted(seps, i, side="left"))
                if k < len(seps):
                    e = min(e, int(seps[k]))
            if e >= len(win) and w1 < n and i > 0:
                break  # the block may continue past the window: redo it in the next one
            length = int(cum[e] - cum[i])
            if length > SEPARATOR_LEN or not doc_breaks:
                out.append((tok, length, s + i))
            tok += length
            i = e
        s += i
    return np.asarray(out, np.int64).reshape(-1, 3)


def record_blocks(sizes: np.ndarray) -> np.ndarray:
    """fairseq `eos`: every record is a block. int64 [n, 3]."""
    sizes = np.asarray(sizes, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else sizes
    return np.stack([starts, sizes, np.arange(len(sizes))], axis=1)


def apply_too_long(table: np.ndarray, block: int, too_long: str, name: str,
                   origins: Sequence[str] | None = None) -> np.ndarray:
    """(start, length) int64 [n, 2] after `data.too_long` for blocks longer than `block`."""
    long = table[:, 1] > block
    num_long = int(long.sum())
    if num_long:
        first = int(table[np.argmax(long), 2])
        where = origins[first] if origins is not None else f"{name} record {first}"
        if too_long == "error":
            n = int(table[np.argmax(long), 1]) - 1  # without its </s>
            raise DataError(
                f"document {first} ({where}) has {n} tokens, {n + 2} with <s> and </s>, more "
                f"than data.max_len={block + 1}; set data.too_long to 'crop', 'split' or "
                "'skip', or raise data.max_len (and model.max_positions)")
        logging.warning("%s: %d of %d blocks are longer than data.max_len=%d: %s "
                        "(data.too_long)", name, num_long, len(table), block + 1,
                        {"skip": "skipped", "split": "split", "crop": "cropped per epoch"}[too_long])
    if not num_long or too_long == "crop":
        return table[:, :2].copy()
    if too_long == "skip":
        return table[~long, :2].copy()
    pieces = -(-table[:, 1] // block)  # split: ceil(length / block) consecutive pieces
    row = np.repeat(np.arange(len(table)), pieces)
    offset = np.arange(len(row)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = table[row, 0] + offset * block
    length = np.minimum(table[row, 1] - offset * block, block)
    return np.stack([start, length], axis=1)


def block_table(sizes: np.ndarray, packing: str, max_len: int, too_long: str, name: str,
                origins: Sequence[str] | None = None) -> np.ndarray:
    """(start token, length) int64 [n, 2] of the rows of one record stream
    (`packing` != 'stream')."""
    block = max_len - 1
    if packing == "doc":
        table = record_blocks(sizes)
    else:
        table = greedy_blocks(sizes, block, doc_breaks=packing == "complete_doc")
    return apply_too_long(table, block, too_long, name, origins)


def cached_block_table(tokens: SplitTokens, packing: str, max_len: int,
                       too_long: str) -> np.ndarray:
    """`block_table` of a split, computed once and memory-mapped from
    `<split>.<packing>-<max_len>-<too_long>.rows.npy` after that (kept in
    memory when the folder is read-only)."""
    path = f"{tokens.prefix}.{packing}-{max_len}-{too_long}.rows.npy"
    if os.path.isfile(path) and os.path.getmtime(path) >= tokens.mtime:
        return np.load(path, mmap_mode="r")
    table = block_table(tokens.sizes, packing, max_len, too_long, tokens.prefix)
    tmp = f"{path}.tmp{os.getpid()}.npy"
    try:
        np.save(tmp, table)
        os.replace(tmp, path)
    except OSError as e:  # a read-only corpus: recomputed by every run
        logging.warning("%s: cannot cache the row table (%s); it is recomputed each run",
                        tokens.prefix, e)
    return table


# ----------------------------------------------------------------------------- rows


class StreamRows:
    """fairseq `none` over one record stream: row j = tokens [j B, (j+1) B)."""

    def __init__(self, num_tokens: int, block: int):
        self.num_tokens, self.block = int(num_tokens), int(block)

    def __len__(self) -> int:
        return -(-self.num_tokens // self.block)

    def __getitem__(self, j: int) -> tuple[int, int]:
        start = int(j) * self.block
        return start, min(self.block, self.num_tokens - start)

    @property
    def lengths(self) -> np.ndarray:
        out = np.full(len(self), self.block, np.int64)
        if len(out):
            out[-1] = self.num_tokens - (len(out) - 1) * self.block
        return out


class TableRows:
    """Rows from a (start, length) table (in memory or memory-mapped)."""

    def __init__(self, table: np.ndarray):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, j: int) -> tuple[int, int]:
        start, length = self.table[int(j)]
        return int(start), int(length)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.table[:, 1])


def rows_of(tokens, packing: str, max_len: int, too_long: str,
            origins: Sequence[str] | None = None):
    """The rows of a record stream (`MemoryTokens` or `SplitTokens`)."""
    check_packing(packing, too_long, max_len)
    if packing == "stream":
        return StreamRows(tokens.num_tokens, max_len - 1)
    if isinstance(tokens, MemoryTokens):
        return TableRows(block_table(tokens.sizes, packing, max_len, too_long, tokens.prefix,
                                     origins))
    return TableRows(cached_block_table(tokens, packing, max_len, too_long))


class RowSource:
    """Random-access rows for grain over a record stream (`MemoryTokens`,
    `SplitTokens`): {"tokens": int32 [n] = <s> + the block, "index": i}.
    Reads only the row it is asked for. `texts`: the SMILES of each row (one
    molecule per row), for enumeration."""

    def __init__(self, tokens: Any, rows: Any, bos_id: int, name: str = "rows",
                 texts: Sequence[str] | None = None):
        self.tokens, self.rows = tokens, rows
        self.bos = np.asarray([bos_id], np.int32)
        self.name = name
        self.texts = list(texts) if texts is not None else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: row {index} out of range [0, {len(self)})")
        start, length = self.rows[index]
        return {"tokens": np.concatenate([self.bos, self.tokens.read(start, length)]),
                "index": index}

    def lengths(self) -> np.ndarray:
        """Every row's length with its <s> (the token-budget batcher's sort key)."""
        return np.asarray(self.rows.lengths) + 1

    def __repr__(self) -> str:
        return f"RowSource({self.name}, rows={len(self)})"
