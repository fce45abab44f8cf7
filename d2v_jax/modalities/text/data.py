"""Token-sequence data: text, SMILES and protein corpora -> fixed-length rows + masks.

Flow (ARCHITECTURE.md): `read_corpus` (files or a packaged corpus, strictly
validated) -> `prepare` trains or reloads the tokenizer in the work dir and sets
`config.model.vocab_size` -> `build_sequences` tokenizes and packs documents into
rows of at most `data.max_len` tokens -> `TextPretrainTransform` pads each row and
draws its masks (numpy, seeded by (seed, epoch, index)) -> grain batches
(`d2v_jax.data.pipeline`).

Corpora (`data.source`) and their readers: modalities/text/corpus.py.

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

import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from d2v_jax.modalities.text import masking as text_masking
from d2v_jax.data.rng import MASK_STREAM, example_rng
from d2v_jax.modalities.text.corpus import corpus_parts, read_corpus
from d2v_jax.modalities.text.smiles import SmilesEnumerator
from d2v_jax.errors import ConfigError, DataError, DataNotFoundError
from d2v_jax.modalities.text.tokenizer import (BOS_ID, EOS_ID, META_FILE, NUM_SPECIAL, PAD_ID, BaseTokenizer,
                                    load_tokenizer, report_unknown_smiles, tokenizer_for,
                                    train_tokenizer)

PACKINGS = ("stream", "complete_doc", "doc")
TOO_LONG = ("error", "skip", "split", "crop")
CROP_STREAM = 2  # random stream for crop windows, independent of the mask draws


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
    name = "+".join(f"{s}:{p}" if p else s for s, p in corpus_parts(config))
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
