"""fairseq's binary corpora: `MMIDIDX` token files and `dict.txt` dictionaries.

What `fairseq-preprocess --dataset-impl mmap` writes (fairseq
`fairseq/data/indexed_dataset.py`, `fairseq/data/dictionary.py`), read as it
is and written the same way (`python -m d2v_jax.prepare` writes it too):

- `<prefix>.bin`: every record's token ids back to back, one dtype.
- `<prefix>.idx`: the magic `MMIDIDX\\x00\\x00`, version 1 (`<Q`), the dtype
  code (`<B`, `DTYPE_CODES`), the record count n (`<Q`), then `sizes`
  (int32 [n], tokens per record) and `pointers` (int64 [n], byte offset of
  each record in the .bin).
- `dict.txt`: one `<symbol> <count>` per line (an optional trailing
  `#fairseq:overwrite` flag); a `Dictionary` puts `<s> <pad> </s> <unk>`
  (ids 0-3) before the file's symbols.

A split may be several files: `train`, `train1`, `train2`, ... (fairseq's
`combine`; `split_prefixes`). Records are written back to back, so any run of
consecutive records is one contiguous slice of the .bin: `IndexedTokens.read`
reads it with one `pread`, never mapping or loading the file, so a reader's
memory does not grow with what it has read. Only the index is memory-mapped.

Library functions for any reader of fairseq data (pretraining corpora, GLUE's
`input0` / `input1` / `label` folders): `IndexedTokens`, `write_indexed`,
`IndexedTokensWriter`, `Dictionary`, `read_dictionary`, `write_dictionary`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence

import numpy as np

from d2v_jax.errors import DataError, DataNotFoundError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# fairseq's `_code_to_dtype` (code 7 is np.double, the same type as code 6).
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.double, 8: np.uint16, 9: np.uint32, 10: np.uint64}
_HEADER = len(MAGIC) + 8 + 1 + 8  # magic, version, dtype code, count

# fairseq Dictionary: these four first, in this order (ids 0-3).
BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
DICT_SPECIALS = (BOS, PAD, EOS, UNK)
OVERWRITE = "#fairseq:overwrite"


def best_fitting_dtype(vocab_size: int | None) -> type:
    """fairseq's `best_fitting_int_dtype`: uint16 below 65,500 ids, then uint32, int64."""
    if vocab_size is None:
        return np.uint32
    if vocab_size < 65500:
        return np.uint16
    if vocab_size < 4294967295:
        return np.uint32
    return np.int64


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, d in DTYPE_CODES.items():
        if np.dtype(d) == dtype:
            return code
    raise ValueError(f"no MMIDIDX dtype code for {dtype}")


def split_prefixes(directory: str, split: str) -> list[str]:
    """`<dir>/<split>`, `<dir>/<split>1`, ... while both files exist (fairseq's
    `combine`); a missing first one is an error naming what is there."""
    out = []
    while True:
        prefix = os.path.join(directory, split + (str(len(out)) if out else ""))
        if not (os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")):
            break
        out.append(prefix)
    if not out:
        if not os.path.isdir(directory):
            raise DataNotFoundError(f"config.data.path={directory!r} is not a folder (a fairseq "
                                    "data directory with dict.txt and <split>.bin / .idx)")
        have = sorted(f[:-4] for f in os.listdir(directory) if f.endswith(".idx"))
        raise DataNotFoundError(f"{directory}: no {split}.bin / {split}.idx (config.data.split="
                                f"{split!r}); splits there: {have or 'none'}")
    return out


class IndexedTokens:
    """One MMIDIDX file pair, read without loading it: `sizes` / `pointers` are
    views of the memory-mapped index, records and token runs are read from the
    .bin with `os.pread`. Picklable (grain workers reopen the files)."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self._open()

    def _open(self) -> None:
        idx, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for p in (idx, bin_path):
            if not os.path.isfile(p):
                raise DataNotFoundError(f"{p}: no such file")
        file_size = os.path.getsize(idx)
        with open(idx, "rb") as f:
            head = f.read(_HEADER)
        if len(head) < _HEADER or head[:len(MAGIC)] != MAGIC:
            raise DataError(f"{idx}: not an MMIDIDX index (magic {head[:len(MAGIC)]!r}, expected "
                            f"{MAGIC!r}); fairseq-preprocess --dataset-impl mmap writes it")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise DataError(f"{idx}: MMIDIDX version {version}; only version {VERSION} exists")
        code = head[17]
        if code not in DTYPE_CODES:
            raise DataError(f"{idx}: dtype code {code} is not one of fairseq's {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        (n,) = struct.unpack("<Q", head[18:26])
        expected = _HEADER + 12 * n
        if file_size < expected:
            raise DataError(f"{idx}: {file_size} bytes, but its header says {n} records "
                            f"({expected} bytes): the index is truncated")
        self._num = int(n)
        index = np.memmap(idx, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(index, np.int32, n, _HEADER)
        self.pointers = np.frombuffer(index, np.int64, n, _HEADER + 4 * n)
        bin_size = os.path.getsize(bin_path)
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if bin_size < end:
            raise DataError(f"{bin_path}: {bin_size} bytes, shorter than its index says "
                            f"({end} bytes for {n} records): the file is truncated")
        self.num_tokens = end // self.dtype.itemsize
        self._fd = os.open(bin_path, os.O_RDONLY)

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None and os is not None:  # `os` is gone at interpreter shutdown
            os.close(fd)

    def __len__(self) -> int:
        return self._num

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the file's token stream, int32."""
        nbytes = int(count) * self.dtype.itemsize
        buf = os.pread(self._fd, nbytes, int(start) * self.dtype.itemsize)
        if len(buf) != nbytes:
            raise DataError(f"{self.prefix}.bin: short read at token {start} (+{count}): the "
                            "file changed while being read")
        return np.frombuffer(buf, self.dtype).astype(np.int32)

    def __getitem__(self, i: int) -> np.ndarray:
        """Record i (int32)."""
        i = int(i)
        if not 0 <= i < self._num:
            raise IndexError(f"{self.prefix}: record {i} out of range [0, {self._num})")
        return self.read(int(self.pointers[i]) // self.dtype.itemsize, int(self.sizes[i]))

    def __repr__(self) -> str:
        return f"IndexedTokens({self.prefix!r}, records={self._num}, tokens={self.num_tokens})"


class IndexedTokensWriter:
    """Writes records to `<prefix>.bin` / `.idx` as fairseq's
    `MMapIndexedDatasetBuilder` does; `finalize()` writes the index. Both files
    are written under temporary names and renamed at the end, so a reader never
    sees half a file."""

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # a dtype fairseq can name
        self._tmp = f"{self.prefix}.tmp{os.getpid()}"
        self._bin = open(self._tmp + ".bin", "wb")
        self.sizes: list[int] = []
        self.num_tokens = 0

    def add(self, record: np.ndarray) -> None:
        arr = np.asarray(record)
        if arr.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"{self.prefix}: ids outside the range of {self.dtype}")
        self._bin.write(arr.astype(self.dtype).tobytes())
        self.sizes.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def add_many(self, records: Iterable[np.ndarray]) -> None:
        for r in records:
            self.add(r)

    def add_concatenated(self, tokens: np.ndarray, sizes: Sequence[int]) -> None:
        """Records given back to back (`tokens`) with their `sizes`, in one write."""
        sizes = [int(n) for n in sizes]
        if sum(sizes) != len(tokens):
            raise ValueError(f"{self.prefix}: sizes sum to {sum(sizes)}, not {len(tokens)} tokens")
        if not sizes:
            return
        self.add(tokens)
        self.sizes[-1:] = sizes

    def finalize(self) -> str:
        self._bin.close()
        sizes = np.asarray(self.sizes, np.int32)
        pointers = np.zeros(len(sizes), np.int64)
        if len(sizes):
            pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64)) * self.dtype.itemsize
        with open(self._tmp + ".idx", "wb") as f:
            f.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", dtype_code(self.dtype))
                    + struct.pack("<Q", len(sizes)) + sizes.tobytes() + pointers.tobytes())
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")
        return self.prefix

    def abort(self) -> None:
        self._bin.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(self._tmp + ext):
                os.remove(self._tmp + ext)


def write_indexed(prefix: str, records: Iterable[np.ndarray], dtype=np.uint16) -> str:
    """Writes `records` to `<prefix>.bin` / `.idx`; returns the prefix."""
    w = IndexedTokensWriter(prefix, dtype)
    try:
        w.add_many(records)
    except BaseException:
        w.abort()
        raise
    return w.finalize()


# ----------------------------------------------------------------------------- dict.txt


class Dictionary:
    """fairseq's `Dictionary` as loaded from a dict.txt: `symbols` (the four
    specials, then the file's symbols in order), `index(symbol)` (unk for an
    unknown one), `counts`. `mask_id` is where masked LM appends `<mask>`."""

    def __init__(self, symbols: Sequence[str], counts: Sequence[int], path: str = ""):
        self.symbols = list(symbols)
        self.counts = list(counts)
        self.path = path
        self.indices: dict[str, int] = {}
        for i, s in enumerate(self.symbols):
            self.indices[s] = i  # an overwritten symbol maps to its last line, as fairseq's
        self.bos, self.pad, self.eos, self.unk = range(4)

    def __len__(self) -> int:
        return len(self.symbols)

    def index(self, symbol: str) -> int:
        return self.indices.get(symbol, self.unk)

    def encode_line(self, line: str, append_eos: bool = True) -> np.ndarray:
        """fairseq's `encode_line`: whitespace-split symbols -> ids (+ </s>)."""
        ids = [self.index(w) for w in line.split()]
        return np.asarray(ids + ([self.eos] if append_eos else []), np.int32)

    @property
    def mask_id(self) -> int:
        return len(self.symbols)


def read_dictionary(path: str) -> Dictionary:
    """A fairseq dict.txt; a line that is not `<symbol> <count> [#fairseq:overwrite]`
    or repeats a symbol without the flag is an error naming the file and line."""
    if not os.path.isfile(path):
        raise DataNotFoundError(f"{path}: no such dictionary file (a fairseq dict.txt)")
    symbols, counts = list(DICT_SPECIALS), [1] * len(DICT_SPECIALS)
    seen = set(symbols)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            parts = line.rsplit(" ", 1)
            overwrite = len(parts) == 2 and parts[1] == OVERWRITE
            if overwrite:
                parts = parts[0].rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or not parts[0]:
                raise DataError(f"{path}:{lineno}: {line[:80]!r} is not '<symbol> <count>' "
                                "(fairseq dict.txt format)")
            word = parts[0]
            if word in seen and not overwrite:
                raise DataError(f"{path}:{lineno}: symbol {word!r} appears twice (fairseq "
                                f"refuses duplicates without a trailing '{OVERWRITE}')")
            seen.add(word)
            symbols.append(word)
            counts.append(int(parts[1]))
    return Dictionary(symbols, counts, path)


def write_dictionary(path: str, symbols: Sequence[str], counts: Sequence[int] | None = None) -> None:
    """A dict.txt of `symbols` (the specials excluded), as fairseq's `Dictionary.save`."""
    counts = [1] * len(symbols) if counts is None else counts
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for s, c in zip(symbols, counts):
            f.write(f"{s} {int(c)}\n")
    os.replace(tmp, path)
