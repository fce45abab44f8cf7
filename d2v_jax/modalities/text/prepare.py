"""Corpora of any size -> fairseq-format shards, once (`python -m d2v_jax.prepare`).

Reads what a text / SMILES / protein config's `data` section names (files:
`text`, `smiles`, `fasta`; or any packaged or labeled corpus, its held-out
test rows left out as pretraining leaves them out), with the same readers and
checks as a run (modalities/text/corpus.py: strict UTF-8 naming file:line,
`data.on_invalid`), and writes

    <out>/train.bin, train.idx, train1.bin, ...   MMIDIDX records (data/fairseq_bin.py)
    <out>/tokenizer/                              the tokenizer that wrote them
    <out>/dict.txt                                (gpt2) its fairseq dictionary
    <out>/d2v_shards.json                         counts, the tokenizer's fingerprint

one record per document (or line, `data.doc_sep='fairseq'`), `</s>` ended:
exactly the records a run reading the corpus into memory makes, so training
from the shards (`data.source=fairseq`, `data.path=<out>`) gives the same rows.

The files are cut into chunks at document boundaries (a line; a blank line
for `blank`; a `>` header for FASTA); worker processes each tokenize chunks
into shard files, the progress bar counting bytes. The tokenizer comes first:
`tokenizer.path` (a saved one), the GPT-2 files, or trained on the corpus
(one pass). Everything is written into `<out>.tmp-<pid>` and renamed to
`<out>` at the end: a refused or failed run leaves nothing.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from concurrent import futures
import os
import shutil
import time
from collections.abc import Iterator

import ml_collections
import numpy as np
from tqdm import tqdm

from d2v_jax import checkpoint
from d2v_jax.data import files
from d2v_jax.data.fairseq_bin import IndexedTokensWriter, best_fitting_dtype
from d2v_jax.errors import ConfigError, DataError, UserError
from d2v_jax.modalities.text import config as text_config
from d2v_jax.modalities.text import corpus as text_corpus
from d2v_jax.modalities.text import shards
from d2v_jax.modalities.text.tokenizer import (gpt2_from_config, load_tokenizer,
                                               report_unknown_smiles, resolve_kind,
                                               train_tokenizer)
from d2v_jax.modalities.text.vocab import META_FILE

FILE_SOURCES = ("text", "smiles", "fasta")  # streamed from files in chunks
PARALLELISM = "TOKENIZERS_PARALLELISM"
CHUNK_MB = 32  # input bytes per shard (a worker's task)
ENCODE_BATCH = 8192  # documents a worker encodes at once


@dataclasses.dataclass
class Chunk:
    """Bytes [start, end) of `path`, whose first line is `first_line`; or
    in-memory documents (`texts`, `origins`: packaged / labeled corpora)."""

    index: int
    path: str = ""
    start: int = 0
    end: int = 0
    first_line: int = 1
    column: int = 0  # smiles: the SMILES column
    texts: list | None = None
    origins: list | None = None

    @property
    def size(self) -> int:
        return self.end - self.start if self.texts is None else sum(map(len, self.texts))


def chunk_lines(chunk: Chunk) -> Iterator[tuple[int, str]]:
    """(line number, text) of a chunk, strictly UTF-8 (errors name file:line)."""
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the chunk's last newline
    for i, raw in enumerate(lines):
        try:
            yield chunk.first_line + i, raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise DataError(f"{chunk.path}:{chunk.first_line + i}: not valid UTF-8 ({e.reason} "
                            f"at byte {e.start} of the line)") from None


def _boundary(path: str, source: str, doc_sep: str):
    """Whether a line (bytes) may start a chunk: after a blank line for
    paragraphs, at a `>` header for FASTA, any line otherwise."""
    if source == "fasta":
        return lambda line, prev: line.startswith(b">")
    if source == "text" and doc_sep == "blank":
        return lambda line, prev: prev is not None and not prev.strip() and bool(line.strip())
    return lambda line, prev: True


def file_chunks(paths: list[str], source: str, doc_sep: str, column: str,
                chunk_bytes: int, first_index: int = 0) -> list[Chunk]:
    """Cuts every file into chunks of about `chunk_bytes`, each starting at a
    document boundary, with its first line number."""
    chunks: list[Chunk] = []
    for path in paths:
        ok = _boundary(path, source, doc_sep)
        col, start, lineno = 0, 0, 1
        with open(path, "rb") as f:
            if source == "smiles":  # the header is read once; chunks hold data lines
                header = f.readline()
                if not header:
                    raise DataError(f"{path}: empty file (expected a header with a {column!r} "
                                    "column)")
                try:
                    col = text_corpus.smiles_column(path, header.decode("utf-8"), column)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:1: not valid UTF-8 ({e.reason})") from None
                start, lineno = len(header), 2
            pos, line_at, prev = start, lineno, None
            first_line = lineno
            for line in f:
                if pos - start >= chunk_bytes and ok(line, prev):
                    chunks.append(Chunk(first_index + len(chunks), path, start, pos, first_line,
                                        col))
                    start, first_line = pos, line_at
                pos += len(line)
                line_at += 1
                prev = line
            if pos > start:
                chunks.append(Chunk(first_index + len(chunks), path, start, pos, first_line, col))
    return chunks


def read_chunk(config: ml_collections.ConfigDict, chunk: Chunk) -> text_corpus.Corpus:
    """The documents of a chunk, read as the run's corpus reader reads them."""
    d = config.data
    if chunk.texts is not None:
        return text_corpus.Corpus(list(chunk.texts), list(chunk.origins))
    lines = chunk_lines(chunk)
    if d.source == "text":
        return text_corpus.split_documents(lines, d.doc_sep, chunk.path)
    if d.source == "smiles":
        return text_corpus.read_smiles_lines(lines, chunk.path, chunk.column, d.on_invalid,
                                             bool(d.validate_smiles), text_corpus.Corpus([], []))
    return text_corpus.read_fasta_lines(lines, chunk.path, d.on_invalid, text_corpus.Corpus([], []))


# ----------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(config_dict: dict, tokenizer_dir: str, out: str, dtype: str,
                 single: bool = False) -> None:
    if not single:  # a worker process: one core each, the tokenizer's threads off
        os.environ[PARALLELISM] = "false"
    _WORKER.update(config=ml_collections.ConfigDict(config_dict),
                   tok=load_tokenizer(tokenizer_dir), out=out, dtype=np.dtype(dtype))


def write_chunk(chunk: Chunk) -> dict:
    """Tokenizes one chunk into the shard file of its index (a worker's task)."""
    config, tok = _WORKER["config"], _WORKER["tok"]
    corpus = read_chunk(config, chunk)
    if tok.kind == "smiles" and config.data.get("on_unknown", "warn") == "error":
        report_unknown_smiles(tok, corpus.texts, corpus.origins, f"prepare {chunk.path}", "error")
    eos = np.asarray([tok.eos_id], np.int32)
    name = "train" + (str(chunk.index) if chunk.index else "")
    writer = IndexedTokensWriter(os.path.join(_WORKER["out"], name), _WORKER["dtype"])
    try:
        for i in range(0, len(corpus.texts), ENCODE_BATCH):  # bounded memory per worker
            docs = tok.encode_batch(corpus.texts[i:i + ENCODE_BATCH])
            writer.add_concatenated(np.concatenate([x for d in docs for x in (d, eos)]),
                                    [len(d) + 1 for d in docs])
    except BaseException:
        writer.abort()
        raise
    writer.finalize()
    return {"index": chunk.index, "bytes": chunk.size, "records": len(writer.sizes),
            "documents": sum(1 for t in corpus.texts if t), "skipped": corpus.skipped,
            "tokens": writer.num_tokens}


# ----------------------------------------------------------------------------- driver


def _documents(config: ml_collections.ConfigDict, chunks: list[Chunk]) -> Iterator[str]:
    """Every document, chunk by chunk (one pass, for training a tokenizer)."""
    for chunk in chunks:
        yield from read_chunk(config, chunk).texts


def _tokenizer(config: ml_collections.ConfigDict, kind: str, chunks: list[Chunk]):
    t = config.tokenizer
    if t.path and os.path.isfile(os.path.join(t.path, META_FILE)):
        tok = load_tokenizer(t.path)
        if tok.kind != kind:
            raise ConfigError(f"config.tokenizer.kind={kind!r} but {t.path} holds a {tok.kind!r} "
                              "tokenizer")
        return tok, f"reloaded from {t.path}"
    if kind == "gpt2":
        tok = gpt2_from_config(config)
        if not tok.can_encode:
            raise ConfigError("config.tokenizer.encoder_json / vocab_bpe are unset: prepare "
                              "encodes text and needs GPT-2's BPE files")
        return tok, "read from its GPT-2 BPE files"
    tok = train_tokenizer(kind, _documents(config, chunks), vocab_size=t.vocab_size,
                          min_frequency=t.min_frequency)
    return tok, "trained on the corpus"


def plan_chunks(config: ml_collections.ConfigDict, chunk_bytes: int, workers: int) -> list[Chunk]:
    """The chunks of the corpus `config.data` names (files streamed; packaged and
    labeled corpora read whole, held-out rows removed, cut into `workers`
    or more parts)."""
    d = config.data
    if d.source in FILE_SOURCES and not tuple(d.get("extra_sources", ()) or ()):
        paths = files.paths(d.path, d.source)
        total = sum(os.path.getsize(p) for p in paths)
        size = max(1024, min(chunk_bytes, -(-total // max(1, 2 * workers))))
        return file_chunks(paths, d.source, d.doc_sep, d.smiles_column, size)
    corpus = text_corpus.read_corpus(config)
    n = max(1, min(len(corpus), 2 * workers))
    bounds = np.linspace(0, len(corpus), n + 1).astype(int)
    return [Chunk(i, texts=corpus.texts[a:b], origins=corpus.origins[a:b])
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


def prepare_shards(config: ml_collections.ConfigDict, out: str, *, workers: int = 0,
                   chunk_mb: float = CHUNK_MB, progress: bool = True) -> dict:
    """Writes the shards of `config`'s corpus into `out` (module docstring);
    returns the summary also saved as `<out>/d2v_shards.json`."""
    t0 = time.perf_counter()
    text_config.validate(config)
    d = config.data
    if d.source == shards.SOURCE:
        raise ConfigError(f"config.data.source={shards.SOURCE!r} is already a fairseq data "
                          "directory: train on it directly")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out!r} exists and is not an empty folder",
                        hint="give a new folder: prepare never overwrites shards")
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    kind = resolve_kind(config)
    chunks = plan_chunks(config, int(chunk_mb * (1 << 20)), workers)
    tok, how = _tokenizer(config, kind, chunks)
    tmp = f"{os.path.abspath(out).rstrip(os.sep)}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        tok.save(os.path.join(tmp, shards.TOKENIZER_DIR))
        if kind == "gpt2":
            shutil.copyfile(tok.files["dict.txt"], os.path.join(tmp, shards.DICT_FILE))
        dtype = np.dtype(best_fitting_dtype(tok.vocab_size)).name
        stats = _run_workers(config, chunks, tmp, dtype, workers, progress)
        meta = {"created_by": "python -m d2v_jax.prepare", "source": d.source, "path": d.path,
                "doc_sep": d.doc_sep, "holdout_fraction": float(d.get("holdout_fraction", 0.0)),
                "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size,
                              "fingerprint": tok.fingerprint(), "made": how},
                "dtype": dtype, "splits": {"train": {
                    "files": len(chunks), **{k: int(sum(s[k] for s in stats)) for k in
                                             ("bytes", "records", "documents", "skipped", "tokens")}}},
                "workers": workers, "seconds": round(time.perf_counter() - t0, 2)}
        if not meta["splits"]["train"]["documents"]:
            raise DataError(f"empty corpus: no documents in data.source={d.source!r}"
                            + (f", data.path={d.path!r}" if d.path else ""))
        shards.write_meta(tmp, meta)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _run_workers(config, chunks: list[Chunk], out: str, dtype: str, workers: int,
                 progress: bool) -> list[dict]:
    args = (config.to_dict(), os.path.join(out, shards.TOKENIZER_DIR), out, dtype)
    bar = tqdm(total=sum(c.size for c in chunks), unit="B", unit_scale=True, desc="prepare",
               disable=not progress, mininterval=2.0)
    stats = []
    try:
        if workers == 1 or len(chunks) == 1:  # in this process, the tokenizer's own threads
            _init_worker(*args, single=True)
            for c in chunks:
                stats.append(write_chunk(c))
                bar.update(stats[-1]["bytes"])
            return stats
        # Workers forked from a clean server process that has imported this
        # module once: forking this process instead can deadlock a child when
        # it runs threads (a started JAX runtime, grain readers) holding locks.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            ctx.set_forkserver_preload([__name__])
        # A worker that dies (killed, out of memory) fails the run
        # (BrokenProcessPool) instead of leaving it waiting.
        pool = futures.ProcessPoolExecutor(min(workers, len(chunks)), ctx, _init_worker, args)
        try:
            for done in futures.as_completed([pool.submit(write_chunk, c) for c in chunks]):
                stats.append(done.result())
                bar.update(stats[-1]["bytes"])
        finally:  # on an error the chunks not started yet are dropped
            pool.shutdown(wait=True, cancel_futures=True)
        return stats
    finally:
        bar.close()


def attach_tokenizer(config: ml_collections.ConfigDict, run_dir: str) -> str:
    """Saves the GPT-2 tokenizer `config.tokenizer` names into `<run_dir>/tokenizer`
    of a converted fairseq text checkpoint, after checking it is the checkpoint's
    vocabulary (fairseq's ids, the same size); fine-tuning and `--init_from`
    then find it there. Returns the folder."""
    saved = checkpoint.restore_config(run_dir)
    kind = saved.tokenizer.get("kind", "")
    if kind != "gpt2":
        raise ConfigError(f"{run_dir} holds a {kind!r} model (its own tokenizer is saved by its "
                          "run); --tokenizer_for is for converted fairseq text checkpoints")
    tok = gpt2_from_config(config)
    if not tok.can_encode:
        raise ConfigError("config.tokenizer.encoder_json / vocab_bpe are unset: a fine-tune "
                          "encodes text and needs GPT-2's BPE files")
    if tok.vocab_size != saved.model.vocab_size:
        raise ConfigError(f"the GPT-2 files give {tok.vocab_size} ids (4 specials + "
                          f"{len(tok.dictionary) - 4} dict.txt lines + <mask>) but {run_dir} was "
                          f"converted with {saved.model.vocab_size}: not the checkpoint's "
                          f"dictionary ({tok.dictionary.path})")
    path = os.path.join(run_dir, shards.TOKENIZER_DIR)
    if os.path.exists(path):
        raise UserError(f"{path} exists: the run already has a tokenizer")
    tmp = f"{path}.tmp-{os.getpid()}"
    tok.save(tmp)
    os.rename(tmp, path)
    return path
