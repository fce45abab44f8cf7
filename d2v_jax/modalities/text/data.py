"""Token-sequence data: text, SMILES and protein corpora -> rows + masks.

Flow (ARCHITECTURE.md): `prepare` sets up the run's tokenizer in the work dir
(trained on the corpus, read from GPT-2 BPE files, or taken from prepared
shards) and `config.model.vocab_size` -> `make_source` gives the rows as a
random-access `blocks.RowSource`, from one of
  - a fairseq data directory (`data.source='fairseq'`, modalities/text/shards.py):
    fairseq-preprocess output or `python -m d2v_jax.prepare` shards, read per
    row from disk, never loaded (start-up and memory independent of its size);
  - a corpus read into memory (packaged sets and files, modalities/text/corpus.py),
    tokenized at start-up into the same records (one per document, `</s>`
    ended) as prepare would write;
-> rows as fairseq's TokenBlockDataset cuts them (`data.packing`,
modalities/text/blocks.py) -> `TextPretrainTransform` pads each row and draws
its masks (numpy, seeded by (seed, epoch, index)) -> grain batches of
`data.batch_size` rows (`d2v_jax.data.pipeline`) or, with `data.max_tokens`,
token-budget batches per length bucket (modalities/text/batching.py).
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

from d2v_jax.data.rng import MASK_STREAM, example_rng
from d2v_jax.errors import ConfigError, DataError, DataNotFoundError
from d2v_jax.modalities.text import masking as text_masking
from d2v_jax.modalities.text import shards
from d2v_jax.modalities.text.blocks import (PACKINGS, TOO_LONG, MemoryTokens, RowSource,
                                            SplitTokens, check_packing, rows_of)
from d2v_jax.modalities.text.corpus import corpus_parts, read_corpus
from d2v_jax.modalities.text.smiles import SmilesEnumerator
from d2v_jax.modalities.text.tokenizer import (BOS_ID, EOS_ID, META_FILE, BaseTokenizer,
                                               fairseq_dir, gpt2_from_config, load_tokenizer,
                                               report_unknown_smiles, resolve_kind,
                                               tokenizer_for, train_tokenizer)

__all__ = ["PACKINGS", "TOO_LONG", "CROP_STREAM", "prepare", "build_sequences", "make_source",
           "TextPretrainTransform", "pretrain_parts", "prepare_backbone"]

CROP_STREAM = 2  # random stream for crop windows, independent of the mask draws


# ---------------------------------------------------------------------------- tokenizer


def _new_tokenizer(config: ml_collections.ConfigDict, kind: str) -> tuple[BaseTokenizer, str]:
    """(tokenizer, how it was made) for a run that has none saved yet."""
    data_dir = fairseq_dir(config)
    if data_dir:
        shards.check_directory(data_dir)
    if kind == "gpt2":
        return gpt2_from_config(config), "read from its GPT-2 BPE files"
    if data_dir:
        saved = shards.saved_tokenizer_dir(data_dir)
        if not saved:
            raise DataNotFoundError(f"{data_dir}: no tokenizer/ (python -m d2v_jax.prepare "
                                    f"output) to read its {kind!r} ids with")
        return load_tokenizer(saved), f"taken from the shards at {data_dir}"
    t = config.tokenizer
    corpus = read_corpus(config)
    tok = train_tokenizer(kind, corpus.texts, vocab_size=t.vocab_size, min_frequency=t.min_frequency)
    return tok, f"trained on {len(corpus)} documents"


def _save(tok: BaseTokenizer, path: str) -> None:
    """Written to a temporary folder and renamed: a reader never sees half a file."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tokenizer-")
    tok.save(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(config: ml_collections.ConfigDict, workdir: str | None, *,
            check_data: bool = True) -> ml_collections.ConfigDict:
    """Sets up the run's tokenizer and sets `config.model.vocab_size` from it.

    The tokenizer lives at `config.tokenizer.path`, by default `<workdir>/tokenizer`:
    a run that finds one there (a resumed run, or fine-tuning pointed at a
    pretraining run's tokenizer) reloads it; else it is made (`_new_tokenizer`)
    and saved there, so fine-tuning finds it beside the checkpoints. Shards
    (`data.source='fairseq'`) must hold this tokenizer's ids (`check_data`;
    a fine-tune's backbone does not read its pretraining data).
    """
    t = config.tokenizer
    kind = resolve_kind(config)
    path = t.path or (os.path.join(workdir, "tokenizer") if workdir else "")
    if not path:
        raise ConfigError("config.tokenizer.path is empty and no workdir was given: nowhere "
                          "to find or save the tokenizer")
    if os.path.isfile(os.path.join(path, META_FILE)):
        tok = load_tokenizer(path)
        if tok.kind != kind:
            raise ConfigError(f"config.tokenizer.kind={kind!r} but {path} holds a {tok.kind!r} "
                              "tokenizer")
        if kind == "gpt2" and (t.get("dict") or t.get("encoder_json")):
            given = gpt2_from_config(config)
            if not given.same_vocabulary(tok):
                raise ConfigError(f"config.tokenizer.dict={t.dict!r} is not the dictionary of "
                                  f"the tokenizer the run saved at {path}")
        logging.info("tokenizer: reloaded %s (%s, %d tokens)", path, tok.kind, tok.vocab_size)
    else:
        tok, how = _new_tokenizer(config, kind)
        _save(tok, path)
        logging.info("tokenizer: %s %s, %d tokens, saved to %s", tok.kind, how, tok.vocab_size,
                     path)
    data_dir = fairseq_dir(config) if check_data else ""
    if data_dir:
        shards.check_tokenizer(data_dir, tok, path)
    elif check_data and kind == "gpt2" and not tok.can_encode:
        raise ConfigError(f"config.data.source={config.data.source!r} is text to encode, but the "
                          "gpt2 tokenizer has no BPE files: set config.tokenizer.encoder_json "
                          "and vocab_bpe")
    m = config.model
    if m.vocab_size is not None and m.vocab_size != tok.vocab_size:
        raise ConfigError(f"config.model.vocab_size={m.vocab_size} but the tokenizer at {path} has "
                          f"{tok.vocab_size} tokens; leave model.vocab_size unset (it comes from "
                          "the tokenizer; a converted checkpoint needs its own vocabulary's files)")
    t.kind, t.path = kind, path
    m.vocab_size = tok.vocab_size
    return config


# ------------------------------------------------------------------------------ rows


def records_of(docs: Sequence[np.ndarray], eos_id: int, name: str = "memory") -> MemoryTokens:
    """Encoded documents -> records (each followed by </s>), in memory."""
    eos = np.asarray([eos_id], np.int32)
    return MemoryTokens([np.concatenate([np.asarray(d, np.int32), eos]) for d in docs], name)


def build_sequences(docs: Sequence[np.ndarray], max_len: int, packing: str, too_long: str,
                    origins: Sequence[str] | None = None, bos_id: int = BOS_ID,
                    eos_id: int = EOS_ID) -> list[np.ndarray]:
    """The rows (int32, `<s>` first) that `packing` makes of encoded documents."""
    records = records_of(docs, eos_id)
    src = RowSource(records, rows_of(records, packing, max_len, too_long, origins), bos_id)
    if not len(src):
        raise DataError(f"no rows left after data.too_long={too_long!r} (every document is "
                        f"longer than data.max_len={max_len})")
    return [src[i]["tokens"] for i in range(len(src))]


def _memory_source(config: ml_collections.ConfigDict, tokenizer: BaseTokenizer) -> RowSource:
    corpus = read_corpus(config)
    d = config.data
    # A reloaded tokenizer or min_frequency > 1 can leave SMILES tokens out.
    report_unknown_smiles(tokenizer, corpus.texts, corpus.origins,
                          f"pretraining corpus data.source={d.source!r}", d.get("on_unknown", "warn"))
    docs = tokenizer.encode_batch(corpus.texts)
    name = "+".join(f"{s}:{p}" if p else s for s, p in corpus_parts(config))
    records = records_of(docs, tokenizer.eos_id, name)
    rows = rows_of(records, d.packing, d.max_len, d.too_long, corpus.origins)
    texts = None
    if float(d.get("smiles_enumerate", 0.0)) != 0:
        # Enumeration rewrites a row from its molecule: one whole SMILES per row.
        if tokenizer.kind != "smiles" or d.packing != "doc" or d.too_long not in ("skip", "error"):
            raise ConfigError(
                f"config.data.smiles_enumerate={d.smiles_enumerate} needs a SMILES tokenizer, "
                f"data.packing='doc' and data.too_long 'skip' or 'error' (one whole molecule per "
                f"row); got tokenizer {tokenizer.kind!r}, packing {d.packing!r}, too_long "
                f"{d.too_long!r}")
        texts = [t for t, doc in zip(corpus.texts, docs) if len(doc) + 2 <= d.max_len]
    return RowSource(records, rows, tokenizer.bos_id, name, texts)


def make_source(config: ml_collections.ConfigDict, tokenizer: BaseTokenizer) -> RowSource:
    """The rows of the run's corpus (module docstring)."""
    d = config.data
    check_packing(d.packing, d.too_long, int(d.max_len))
    if d.source != shards.SOURCE:
        src = _memory_source(config, tokenizer)
    else:
        if float(d.get("smiles_enumerate", 0.0)) != 0:
            raise ConfigError(f"config.data.smiles_enumerate={d.smiles_enumerate}: shards hold "
                              "ids, not the SMILES to enumerate; set it to 0 with "
                              "data.source='fairseq'")
        split = d.get("split", "train")
        tokens = SplitTokens(shards.open_split(d.path, split), os.path.join(d.path, split))
        rows = rows_of(tokens, d.packing, int(d.max_len), d.too_long)
        src = RowSource(tokens, rows, tokenizer.bos_id, f"{d.path}:{split}")
        logging.info("%s: %d files, %d tokens, %d rows of <= %d tokens (%s)", src.name,
                     len(tokens.parts), tokens.num_tokens, len(src), d.max_len, d.packing)
    if not len(src):
        raise DataError(f"no rows in {src.name} after data.too_long={d.too_long!r} (every "
                        f"document longer than data.max_len={d.max_len}?)")
    return src


# ---------------------------------------------------------------------------- transform


class TextPretrainTransform:
    """Pads (or crops) a row to `length` (default `data.max_len`) and draws its masks (SPEC 5).

    Output: tokens int32 [T], padding_mask bool [T] (True = padding), mask bool
    [M, T] (positions the loss counts) and, for 1.0, inputs int32 [M, T] (the
    corrupted student input). Padding is never masked; special tokens are
    unless `masking.mask_specials` is False. With `data.smiles_enumerate` = p
    > 0 a row is first, with probability p, replaced by a random SMILES of its
    molecule (`texts[index]`, modalities/text/smiles.py), seeded by (seed,
    epoch, index). An id outside the vocabulary (shards of another tokenizer)
    is an error naming the row.
    """

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: BaseTokenizer,
                 texts: Sequence[str] | None = None):
        self.config = config
        self.max_len = int(config.data.max_len)
        self.seed = int(config.seed)
        self.tok = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.special = np.asarray(tokenizer.special_ids, np.int32)
        self.enumerator = None
        p = float(config.data.get("smiles_enumerate", 0.0))
        if p != 0:
            if texts is None:
                raise ConfigError(f"config.data.smiles_enumerate={p}: the data source has no "
                                  "SMILES per row to enumerate (set it to 0 for this source)")
            self.enumerator = SmilesEnumerator(texts, tokenizer, self.max_len - 2, p,
                                               config.data.smiles_enumerate_tries, self.seed)

    def __call__(self, element: dict[str, Any], epoch: int, length: int | None = None
                 ) -> dict[str, np.ndarray]:
        index = int(element["index"])
        row = np.asarray(element["tokens"], np.int32)
        t = int(length or self.max_len)
        tok = self.tok
        ids = self.enumerator.draw(index, epoch) if self.enumerator is not None else None
        if ids is not None:  # a random SMILES of the row's molecule, fitting the row
            row = np.concatenate([[tok.bos_id], ids, [tok.eos_id]]).astype(np.int32)
        if row.size > t:  # only with data.too_long='crop'
            start = example_rng(self.seed, epoch, index, CROP_STREAM).integers(0, row.size - t + 1)
            row = row[start:start + t]
        if row.size and (row.max() >= self.vocab_size or row.min() < 0):
            raise DataError(f"row {index}: token id {int(row.max())} outside the tokenizer's "
                            f"{self.vocab_size} ids: the data was written with another vocabulary")
        n = row.size
        tokens = np.full((t,), tok.pad_id, np.int32)
        tokens[:n] = row
        padding = np.arange(t) >= n
        maskable = ~padding  # masking.mask_specials: fairseq masks <s> / </s> too
        if not self.config.masking.get("mask_specials", True):
            maskable &= ~np.isin(tokens, self.special)
        rng = example_rng(self.seed, epoch, index, MASK_STREAM)
        low, high = tok.random_range
        out = text_masking.text_masks(rng, tokens, maskable, n, self.config.masking,
                                      mask_id=tok.mask_id, random_low=low, vocab_size=high)
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
    (`tokenizer.path` in its config, else `<init_from>/tokenizer`); a converted
    fairseq checkpoint (`tokenizer.kind='gpt2'`, its dictionary's ids) reads
    the GPT-2 files saved in `<init_from>/tokenizer` by `python -m
    d2v_jax.prepare --tokenizer_for`. A scratch backbone trains one on its
    pretraining corpus into `<workdir>/tokenizer`, as pretraining does, and
    takes `model.vocab_size` from it.
    """
    if init_from:
        saved = bconfig.tokenizer.path
        fallback = os.path.join(init_from, "tokenizer")
        if not (saved and os.path.isdir(saved)):
            if not os.path.isdir(fallback):
                hint = (f"a converted fairseq text checkpoint needs its vocabulary's files: python "
                        f"-m d2v_jax.prepare --tokenizer_for={init_from} "
                        "--config.tokenizer.encoder_json=... --config.tokenizer.vocab_bpe=... "
                        "--config.tokenizer.dict=..." if bconfig.tokenizer.kind == "gpt2" else None)
                raise DataNotFoundError(f"the pretraining run {init_from!r} names tokenizer "
                                        f"{saved!r}, which does not exist, and has no {fallback}",
                                        hint=hint)
            bconfig.tokenizer.path = fallback
        return prepare(bconfig, init_from, check_data=False)
    if not workdir:
        raise ValueError("a scratch text backbone trains its tokenizer into the work dir; "
                         "pass workdir")
    return prepare(bconfig, workdir)
