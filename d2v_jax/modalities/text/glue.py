"""GLUE as fairseq's `sentence_prediction` task reads it (data.source='glue').

`data.glue_task` names the task; `data.path` is either GLUE's own folder of
the task (`train.tsv`, `dev.tsv`; MNLI `dev_matched.tsv` / `dev_mismatched.tsv`,
as GLUE's download script writes them) or fairseq's preprocessed folder
(`input0/`, `input1/`, `label/` with `dict.txt` and `<split>.bin / .idx`, as
fairseq's `examples/roberta/preprocess_GLUE_tasks.sh` writes them; STS-B's
`label/<split>.label` floats). The TSV columns are the script's (`cut -f`):

| task | text columns | label column | classes (GLUE order) |
|---|---|---|---|
| CoLA | 4 (`sentence`; no header) | 2 | 0, 1 |
| SST-2 | `sentence` | `label` | 0, 1 |
| MRPC | `#1 String`, `#2 String` | `Quality` | 0, 1 |
| QQP | `question1`, `question2` | `is_duplicate` | 0, 1 |
| STS-B | `sentence1`, `sentence2` | `score` / 5 (the script's scaling) | regression |
| MNLI | `sentence1`, `sentence2` | `gold_label` | entailment, neutral, contradiction |
| QNLI | `question`, `sentence` | `label` | entailment, not_entailment |
| RTE | `sentence1`, `sentence2` | `label` | entailment, not_entailment |

QQP's train / dev rows with other than 6 fields are dropped, as the script's
`awk NF==6` does; other tasks' malformed rows are errors naming the line.

A row is `init + A + </s>` for one sentence and `init + A + </s> + sep + B +
</s>` for a pair (fairseq-preprocess ends every sentence with `</s>`; the task
prepends `init_token` to input0 and `separator_token` to input1): with the
official `<s>` and `</s>` that is `<s> A </s></s> B </s>`. Rows are padded to
`data.max_len`, or (None) to the longest row rounded up to a multiple of 8,
one static shape. The model trains on `train`, is scored on the dev set(s):
MNLI's two are test groups `matched` / `mismatched` (metrics `<name>_matched`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from d2v_jax.data import fairseq_bin, files
from d2v_jax.data.labeled import ArraySource, label_ids
from d2v_jax.errors import ConfigError, DataError, DataNotFoundError
from d2v_jax.modalities.text.tokenizer import tokenizer_for

SOURCE = "glue"  # config.data.source
PAD_MULTIPLE = 8  # rows padded to the longest, rounded up to this (static shape)


@dataclasses.dataclass(frozen=True)
class GlueTask:
    name: str  # GLUE's name (the folder the download script writes)
    text: tuple  # column names, or 0-based positions for a file without a header
    label: str | int
    classes: tuple[str, ...] = ()  # () = regression
    num_fields: int = 0  # > 0: rows with another field count are dropped (QQP)
    header: bool = True
    target_scale: float = 1.0  # regression targets x this (STS-B / 5)
    # (group name, TSV file stem, fairseq split) of the dev set(s)
    dev: tuple = (("dev", "dev", "valid"),)

    @property
    def regression(self) -> bool:
        return not self.classes


BINARY = ("0", "1")
NLI = ("entailment", "not_entailment")
TASKS = {
    "cola": GlueTask("CoLA", (3,), 1, BINARY, header=False),
    "sst_2": GlueTask("SST-2", ("sentence",), "label", BINARY),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", BINARY),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", BINARY, num_fields=6),
    "sts_b": GlueTask("STS-B", ("sentence1", "sentence2"), "score", target_scale=0.2),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"),
                     dev=(("matched", "dev_matched", "valid"),
                          ("mismatched", "dev_mismatched", "valid1"))),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", NLI),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", NLI),
}


def task_of(config) -> GlueTask:
    name = config.data.get("glue_task", "")
    if name not in TASKS:
        raise ConfigError(f"config.data.glue_task={name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def _layout(task: GlueTask) -> str:
    if task.header:
        cols = list(task.text) + [task.label]
        return ", ".join(repr(c) for c in cols)
    return f"no header, sentence in field {task.text[0] + 1}, label in field {task.label + 1}"


def read_tsv(path: str, task: GlueTask) -> tuple[list[tuple[str, ...]], list[str], list[str]]:
    """(texts per row (one or two strings), label strings, origins) of a GLUE
    TSV; a missing column or a malformed row is an error naming the file and line."""
    if not os.path.isfile(path):
        raise DataNotFoundError(f"{path}: no such file (GLUE {task.name}: data.path is the "
                                "task's folder of train.tsv / dev*.tsv, or fairseq's "
                                "preprocessed folder with input0/)")
    lines = list(files.lines(path))
    if lines and lines[0][1].startswith("\ufeff"):  # MRPC's files start with a byte-order mark
        lines[0] = (lines[0][0], lines[0][1][1:])
    reader = csv.reader((t for _, t in lines), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = list(reader)
    linenos = [n for n, _ in lines]
    if task.header:
        if not rows:
            raise DataError(f"{path}: empty file; expected GLUE {task.name}'s header")
        header = [h.strip() for h in rows[0]]
        missing = [c for c in (*task.text, task.label) if c not in header]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} in the header {header}; GLUE "
                            f"{task.name} (data.glue_task) reads columns {_layout(task)}")
        where = [header.index(c) for c in task.text], header.index(task.label)
        width, body, body_lines = len(header), rows[1:], linenos[1:]
    else:
        where = list(task.text), task.label
        width, body, body_lines = max(where[0] + [where[1]]) + 1, rows, linenos
    texts, labels, origins, dropped = [], [], [], 0
    for row, lineno in zip(body, body_lines):
        if not row or not any(v.strip() for v in row):
            continue
        if task.num_fields and len(row) != task.num_fields:
            dropped += 1  # the official script's awk NF == num_fields filter
            continue
        if (task.header and len(row) != width) or len(row) < width:
            raise DataError(f"{path}:{lineno}: {len(row)} fields, expected "
                            f"{width if task.header else f'at least {width}'} (GLUE "
                            f"{task.name}: {_layout(task)}); a tab inside the text?")
        texts.append(tuple(row[j] for j in where[0]))
        labels.append(row[where[1]].strip())
        origins.append(f"{path}:{lineno}")
    if dropped:
        logging.info("%s: %d rows without %d fields dropped (as fairseq's GLUE preprocessing)",
                     path, dropped, task.num_fields)
    if not texts:
        raise DataError(f"{path}: no data rows")
    return texts, labels, origins


def resolve_token(token, tokenizer_ids: dict[str, int], field: str) -> int | None:
    """`data.init_token` / `separator_token`: a special token's name ('<s>',
    '</s>'), an id, or '' / None for none."""
    if token is None or token == "":
        return None
    if isinstance(token, int):
        return token
    if token not in tokenizer_ids:
        raise ConfigError(f"config.data.{field}={token!r}; expected one of "
                          f"{sorted(tokenizer_ids)}, an int id, or '' for none")
    return tokenizer_ids[token]


def join_rows(first: Sequence[np.ndarray], second: Sequence[np.ndarray] | None,
              init: int | None, sep: int | None) -> list[np.ndarray]:
    """fairseq's PrependTokenDataset + ConcatSentencesDataset: init + first
    (+ sep + second); each sentence already ends with </s>."""
    out = []
    for i, a in enumerate(first):
        parts = ([np.asarray([init], np.int32)] if init is not None else []) + [a]
        if second is not None:
            parts += ([np.asarray([sep], np.int32)] if sep is not None else []) + [second[i]]
        out.append(np.concatenate(parts).astype(np.int32))
    return out


def pad_rows(rows: Sequence[np.ndarray], max_len: int | None, limit: int, pad: int,
             too_long: str, origins: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [N, L], padding_mask bool [N, L]). L = `max_len`, or the
    longest row rounded up to PAD_MULTIPLE (at most `limit`). A longer row is
    an error naming it (`too_long='error'`, fairseq's default: no shortening)
    or keeps its first L tokens (`'truncate'`, fairseq's shorten_method)."""
    longest = max(len(r) for r in rows)
    length = int(max_len) if max_len else min(limit, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    if length > limit:
        raise ConfigError(f"config.data.max_len={length} is more than the backbone's "
                          f"model.max_positions={limit}")
    tokens = np.full((len(rows), length), pad, np.int32)
    long = 0
    for i, r in enumerate(rows):
        if len(r) > length:
            if too_long == "error":
                raise DataError(f"{origins[i]}: {len(r)} tokens, more than {length} (the "
                                "backbone's max positions / data.max_len); set "
                                "data.too_long='truncate' to keep the first ones")
            long += 1
            r = r[:length]
        tokens[i, :len(r)] = r
    if long:
        logging.info("%d of %d GLUE rows truncated to %d tokens", long, len(rows), length)
    return tokens, np.arange(length)[None, :] >= np.asarray([min(len(r), length)
                                                           for r in rows])[:, None]


def _encode(tokenizer, texts: list[str], eos: int) -> list[np.ndarray]:
    return [np.append(ids, eos).astype(np.int32) for ids in tokenizer.encode_batch(texts)]


def _tsv_split(path: str, task: GlueTask, stem: str, tokenizer):
    texts, labels, origins = read_tsv(os.path.join(path, stem + ".tsv"), task)
    columns = [_encode(tokenizer, [t[k] for t in texts], tokenizer.eos_id)
               for k in range(len(task.text))]
    return columns, labels, origins


def _bin_split(path: str, task: GlueTask, split: str, label_dict):
    """fairseq's preprocessed split: (token records per input, label strings or
    floats, origins)."""
    columns = []
    for k in range(len(task.text)):
        prefixes = fairseq_bin.split_prefixes(os.path.join(path, f"input{k}"), split)
        columns.append([r for p in prefixes for r in fairseq_bin.IndexedTokens(p)])
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise DataError(f"{path}: input0/{split} has {n} records but input1/{split} "
                        f"{len(columns[-1])}: they must pair up")
    origins = [f"{path}/input0/{split} record {i}" for i in range(n)]
    if task.regression:
        label_file = os.path.join(path, "label", split + ".label")
        values = [line for _, line in files.lines(label_file)]
        if len(values) != n:
            raise DataError(f"{label_file}: {len(values)} lines for {n} records of input0/{split}")
        return columns, values, origins
    records = [r for p in fairseq_bin.split_prefixes(os.path.join(path, "label"), split)
               for r in fairseq_bin.IndexedTokens(p)]
    if len(records) != n:
        raise DataError(f"{path}/label/{split}: {len(records)} labels for {n} records")
    # label/<split>.bin holds `<label symbol id> </s>`; fairseq strips </s> and
    # subtracts nspecial: the symbol is the GLUE label string.
    labels = [label_dict.symbols[int(r[0])] if len(r) else "" for r in records]
    return columns, labels, origins


def is_fairseq_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "input0", "dict.txt"))


def read_glue(config, tokenizer) -> dict:
    """Rows, labels and splits of the task at data.path (either layout)."""
    d, task = config.data, task_of(config)
    if not d.path or not os.path.isdir(d.path):
        raise DataNotFoundError(f"config.data.path={d.path!r} is not a folder: GLUE {task.name} "
                                "reads the task's folder (train.tsv, dev.tsv) or fairseq's "
                                "preprocessed folder (input0/, input1/, label/)")
    fairseq = is_fairseq_dir(d.path)
    if fairseq:
        data_dict = fairseq_bin.read_dictionary(os.path.join(d.path, "input0", "dict.txt"))
        mine = getattr(tokenizer, "dictionary", None)
        if mine is None or mine.symbols != data_dict.symbols:
            raise ConfigError(f"{d.path}/input0/dict.txt: the preprocessed ids are of this "
                              f"dictionary; the backbone's tokenizer ({tokenizer.kind!r}) "
                              "has another vocabulary, so the ids would mean other tokens. "
                              "Use the checkpoint converted with this dict.txt, or the TSV files")
        ids = {"<s>": data_dict.bos, "</s>": data_dict.eos, "<pad>": data_dict.pad}
        label_dict = (None if task.regression else
                      fairseq_bin.read_dictionary(os.path.join(d.path, "label", "dict.txt")))
        splits = [("train", "train")] + [(group, split) for group, _, split in task.dev]
        read = lambda split: _bin_split(d.path, task, split, label_dict)  # noqa: E731
    else:
        ids = {"<s>": tokenizer.bos_id, "</s>": tokenizer.eos_id, "<pad>": tokenizer.pad_id}
        splits = [("train", "train")] + [(group, stem) for group, stem, _ in task.dev]
        read = lambda stem: _tsv_split(d.path, task, stem, tokenizer)  # noqa: E731
    init = resolve_token(d.get("init_token", "<s>"), ids, "init_token")
    sep = resolve_token(d.get("separator_token", "</s>"), ids, "separator_token")
    rows, labels, origins, parts = [], [], [], {}
    for group, name in splits:
        columns, lab, org = read(name)
        start = len(rows)
        rows += join_rows(columns[0], columns[1] if len(columns) > 1 else None, init, sep)
        labels += lab
        origins += org
        parts[group] = np.arange(start, len(rows))
    return {"rows": rows, "labels": labels, "origins": origins, "parts": parts, "pad": ids["<pad>"],
            "task": task}


def _targets(task: GlueTask, labels, origins, classes) -> tuple[np.ndarray, list[str] | None]:
    if task.regression:
        out = np.empty(len(labels), np.float32)
        for i, v in enumerate(labels):
            try:
                out[i] = float(v)
            except ValueError:
                raise DataError(f"{origins[i]}: GLUE {task.name} score {v!r} is not a "
                                "number") from None
        return out, None
    return label_ids(labels, origins, tuple(classes) or task.classes,
                     f"GLUE {task.name} label")


class GlueSource(ArraySource):
    """The rows of all splits; `splits` (train, test) and `test_groups` tell
    `data.labeled.labeled_data` the task's own train / dev split."""

    def __init__(self, tokens, padding_mask, splits, test_groups):
        super().__init__("glue", tokens=tokens, padding_mask=padding_mask)
        self.splits, self.test_groups = splits, test_groups


def model_inputs(element: dict, epoch: int | None = None) -> dict:
    """Text rows (GLUE's and the other text tasks') go to the model as they are
    (no augmentation)."""
    del epoch
    return {k: v for k, v in element.items() if k != "index"}


def labeled_parts(config, backbone_config):
    """(source, labels, class names, train transform, eval transform) of a GLUE task."""
    d = config.data
    tokenizer = tokenizer_for(backbone_config)
    g = read_glue(config, tokenizer)
    task = g["task"]
    if config.task != ("regression" if task.regression else "classification"):
        raise ConfigError(f"config.task={config.task!r}, but GLUE {task.name} is "
                          f"{'regression' if task.regression else 'classification'}")
    labels, class_names = _targets(task, g["labels"], g["origins"], d.get("classes", ()))
    if task.regression and not is_fairseq_dir(d.path):
        labels = labels * np.float32(task.target_scale)  # the script's score / 5
    vocab = int(backbone_config.model.vocab_size)
    top = max(int(r.max()) for r in g["rows"])
    if top >= vocab:
        raise ConfigError(f"GLUE {task.name} at {d.path}: token id {top} >= the backbone's "
                          f"model.vocab_size={vocab}")
    tokens, padding = pad_rows(g["rows"], d.get("max_len"), int(backbone_config.model.max_positions),
                               g["pad"], d.get("too_long", "error"), g["origins"])
    parts = g["parts"]
    test = np.concatenate([parts[group] for group, _, _ in task.dev])
    groups = None
    if len(task.dev) > 1:  # positions in the test order
        offsets = np.cumsum([0] + [len(parts[group]) for group, _, _ in task.dev])
        groups = {group: np.arange(offsets[k], offsets[k + 1])
                  for k, (group, _, _) in enumerate(task.dev)}
    source = GlueSource(tokens, padding, {"train": parts["train"], "test": test}, groups)
    logging.info("GLUE %s: %d train, %d dev rows of %d tokens", task.name, len(parts["train"]),
                 len(test), tokens.shape[1])
    return source, labels, class_names, model_inputs, model_inputs
