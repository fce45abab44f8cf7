"""Tokenizers for the sequence modalities: subword text, SMILES, protein residues.

Each maps text to ids (`encode(str) -> list[int]`, `encode_batch` for many);
the model's vocabulary size is always `tokenizer.vocab_size` (set into
`config.model.vocab_size` by the text modality's `prepare`), never a constant.
Our three trained kinds put `<pad> <s> </s> <unk> <mask>` at ids 0-4
(modalities/text/vocab.py); `gpt2` keeps fairseq's ids.

- `SubwordTokenizer` (`bpe`): byte-level BPE (Hugging Face `tokenizers`, the
  RoBERTa recipe) trained on the user's corpus; any UTF-8 text round-trips.
- `Gpt2Tokenizer` (`gpt2`, modalities/text/gpt2.py): RoBERTa's vocabulary,
  GPT-2's `encoder.json` + `vocab.bpe` through a fairseq `dict.txt`: fairseq's ids.
- `SmilesTokenizer` (`smiles`): the regex of Schwaller et al. (Molecular
  Transformer, 2019): bracket atoms (`[nH]`, `[C@@H]`, `[Na+]`, `[13CH3]`) are one
  token, `Cl`/`Br` stay whole, bonds, branches and ring closures (`%10`,
  `%(123)`) are tokens. A SMILES the regex cannot cover exactly is an error
  naming the character, so "".join(smiles_tokens(s)) == s always holds. The
  vocabulary is the tokens seen in the training corpus (>= min_frequency times)
  plus `SMILES_BASE_TOKENS`, the organic-subset atoms and the syntax every SMILES
  may use. A bracket atom the vocabulary lacks backs off to the nearest one it
  has (`smiles_backoff`: drop the atom map, isotope, chirality, H count, charge,
  then the bare organic-subset atom: `[13CH3]` -> `[CH3]` -> `[C]` -> `C`),
  anything else is <unk>; `unknown_smiles_tokens` reports such tokens with
  counts and the SMILES they are in.
- `ProteinTokenizer` (`protein`): one token per residue over the IUPAC letters.

`save(directory)` writes the tokenizer beside the run; `load_tokenizer(directory)`
reads any of them back (pretraining resume, fine-tuning); `load(config)` is the
tokenizer a config trains with.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np
from absl import logging

from d2v_jax.errors import ConfigError, DataError, DataNotFoundError
from d2v_jax.modalities.text import shards
from d2v_jax.modalities.text.gpt2 import Gpt2Tokenizer
from d2v_jax.modalities.text.vocab import (BOS, BOS_ID, EOS, EOS_ID, MASK, MASK_ID, META_FILE,
                                           NUM_SPECIAL, PAD, PAD_ID, SPECIAL_TOKENS, UNK,
                                           UNK_ID, BaseTokenizer)

__all__ = ["BOS", "BOS_ID", "EOS", "EOS_ID", "MASK", "MASK_ID", "META_FILE", "NUM_SPECIAL", "PAD",
           "PAD_ID", "SPECIAL_TOKENS", "UNK", "UNK_ID", "BaseTokenizer", "Gpt2Tokenizer",
           "ProteinTokenizer", "SmilesTokenizer", "SubwordTokenizer", "TOKENIZERS", "load",
           "load_tokenizer", "smiles_tokens", "tokenizer_for", "train_tokenizer"]

# Schwaller et al. 2019 (Molecular Transformer), the standard SMILES regex, plus
# OpenSMILES' `%(nnn)` ring closures (RDKit writes them past %99).
SMILES_REGEX = (r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?"
                r"|>|\*|\$|%\([0-9]+\)|%[0-9]{2}|[0-9])")
_SMILES_RE = re.compile(SMILES_REGEX)

# Always in a SMILES vocabulary, seen in the corpus or not: the organic-subset
# atoms (aliphatic and aromatic), which are also where bracket atoms back off to,
# and the syntax (bonds, branches, dot, wildcard, single-digit ring closures).
SMILES_ORGANIC = ("B", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I")
SMILES_AROMATIC = ("b", "c", "n", "o", "p", "s")
SMILES_BASE_TOKENS = (SMILES_ORGANIC + SMILES_AROMATIC
                      + ("(", ")", ".", "=", "#", "-", "+", "\\", "/", ":", "~", "$", "*")
                      + tuple("0123456789"))

# A bracket atom: [isotope? symbol chirality? Hcount? charge? :map?] (OpenSMILES).
_BRACKET_RE = re.compile(
    r"\[(?P<isotope>[0-9]+)?(?P<symbol>[A-Z][a-z]?|[a-z][a-z]?|\*)"
    r"(?P<chiral>@(?:TH[12]|AL[12]|SP[123]|TB[0-9]{1,2}|OH[0-9]{1,2}|@)?)?"
    r"(?P<hcount>H[0-9]?)?(?P<charge>(?:\+[0-9]*|-[0-9]*)+)?(?P<map>:[0-9]+)?\]")
_BACKOFF_ORDER = ("map", "isotope", "chiral", "hcount", "charge")

# IUPAC one-letter amino acids: the 20 standard, then X (any), B (D/N), Z (E/Q),
# U (selenocysteine), O (pyrrolysine).
PROTEIN_ALPHABET = "ACDEFGHIKLMNPQRSTVWYXBZUO"


class _TableTokenizer(BaseTokenizer):
    """A tokenizer with an explicit token table (SMILES, protein)."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[:NUM_SPECIAL]) != SPECIAL_TOKENS:
            raise ValueError(f"{type(self).__name__}: the vocabulary must start with the special "
                             f"tokens {SPECIAL_TOKENS}, got {tokens[:NUM_SPECIAL]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"{type(self).__name__}: duplicate tokens in the vocabulary")
        self.tokens = tokens
        self.ids = {t: i for i, t in enumerate(tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def split(self, text: str) -> list[str]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray([self.ids.get(t, UNK_ID) for t in self.split(text)], np.int32)
                for text in texts]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.kind, self.tokens]).encode()).hexdigest()

    def token_id(self, token: str) -> int:
        """The id of a token of `split`'s output (<unk> if not in the vocabulary)."""
        return self.ids.get(token, UNK_ID)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[i] for i in ids if int(i) >= NUM_SPECIAL)

    def save(self, directory: str) -> None:
        self._write_meta(directory)
        with open(os.path.join(directory, "vocab.json"), "w") as f:
            json.dump(self.tokens, f, indent=0)


def smiles_tokens(smiles: str) -> list[str]:
    """Splits a SMILES string with `SMILES_REGEX`; raises if a character is not covered."""
    tokens = _SMILES_RE.findall(smiles)
    if sum(map(len, tokens)) != len(smiles):
        pos = 0
        for t in _SMILES_RE.finditer(smiles):
            if t.start() != pos:
                break
            pos = t.end()
        raise DataError(f"SMILES {smiles!r}: character {smiles[pos]!r} at position {pos} is not "
                        "a SMILES token (atom, [bracket atom], bond, branch or ring closure)")
    return tokens


def smiles_backoff(token: str) -> list[str]:
    """The tokens an out-of-vocabulary SMILES token may stand in for, nearest first.

    A bracket atom sheds its atom map, isotope, chirality, H count and charge in
    turn, one more field each step (`[13CH3+]` -> `[CH3+]` -> `[C+]` -> `[C]`),
    then becomes its organic-subset atom (`C`, aromatic `c`) if it has one: the
    charge outlives the H count, as it says more about the atom. Other tokens
    (ring closures `%nn`, `[Sn]`, `[te]`: no organic-subset atom) end at <unk>.
    """
    m = _BRACKET_RE.fullmatch(token)
    if m is None:
        return []
    fields = m.groupdict(default="")
    out = []
    for name in _BACKOFF_ORDER:
        fields[name] = ""
        t = (f"[{fields['isotope']}{fields['symbol']}{fields['chiral']}{fields['hcount']}"
             f"{fields['charge']}{fields['map']}]")
        if t != token and t not in out:
            out.append(t)
    if m["symbol"] in SMILES_ORGANIC + SMILES_AROMATIC:
        out.append(m["symbol"])
    return out


class SmilesTokenizer(_TableTokenizer):
    kind = "smiles"

    def __init__(self, tokens: Sequence[str]):
        super().__init__(tokens)
        self._backoff: dict[str, int] = {}  # out-of-vocabulary token -> id (cache)

    def split(self, text: str) -> list[str]:
        return smiles_tokens(text)

    def token_id(self, token: str) -> int:
        """The token's id, else its nearest in-vocabulary backoff's, else <unk>."""
        i = self.ids.get(token)
        if i is not None:
            return i
        if token not in self._backoff:
            self._backoff[token] = next((self.ids[t] for t in smiles_backoff(token)
                                         if t in self.ids), UNK_ID)
        return self._backoff[token]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_tokens(smiles_tokens(text)) for text in texts]

    def encode_tokens(self, tokens: Sequence[str]) -> np.ndarray:
        """Ids of `smiles_tokens` output (backoff / <unk> for tokens not in the vocabulary)."""
        ids = self.ids
        return np.asarray([ids[t] if t in ids else self.token_id(t) for t in tokens], np.int32)

    @classmethod
    def train(cls, corpus: Iterable[str], min_frequency: int = 1) -> "SmilesTokenizer":
        """Vocabulary = regex tokens seen >= min_frequency times, most frequent
        first, then the `SMILES_BASE_TOKENS` the corpus lacks (so every
        organic-subset atom and bond has an id and bracket atoms a backoff)."""
        counts = collections.Counter(t for s in corpus for t in smiles_tokens(s))
        kept = sorted((t for t, c in counts.items() if c >= min_frequency),
                      key=lambda t: (-counts[t], t))
        if not counts:
            raise DataError("SmilesTokenizer.train: the corpus has no tokens")
        return cls(list(SPECIAL_TOKENS) + kept + [t for t in SMILES_BASE_TOKENS if t not in kept])


def unknown_smiles_tokens(tokenizer: BaseTokenizer, texts: Sequence[str],
                          origins: Sequence[str] | None = None) -> dict[str, dict]:
    """{token: {"count", "mapped_to", "origin", "smiles"}} for every token of
    `texts` that is not in the SMILES tokenizer's vocabulary: how often it
    occurs, the token it is encoded as (a backoff, or "<unk>") and the first
    SMILES (and its origin) that has it. Empty for other tokenizers."""
    if not isinstance(tokenizer, SmilesTokenizer):
        return {}
    out: dict[str, dict] = {}
    for i, text in enumerate(texts):
        for t in smiles_tokens(text):
            if t in tokenizer.ids:
                continue
            if t not in out:
                out[t] = {"count": 0, "mapped_to": tokenizer.tokens[tokenizer.token_id(t)],
                          "origin": origins[i] if origins is not None else f"SMILES {i}",
                          "smiles": text}
            out[t]["count"] += 1
    return out


ON_UNKNOWN = ("warn", "error")


def report_unknown_smiles(tokenizer: BaseTokenizer, texts: Sequence[str],
                          origins: Sequence[str] | None, where: str, on_unknown: str = "warn",
                          field: str = "data.on_unknown", max_listed: int = 20) -> dict[str, dict]:
    """Logs a warning (`on_unknown='warn'`) or raises DataError ('error') naming
    every SMILES token of `texts` the tokenizer lacks, with its count, what it
    is encoded as and the first SMILES that has it. Returns the report."""
    if on_unknown not in ON_UNKNOWN:
        raise ConfigError(f"config.{field}={on_unknown!r}; expected one of {ON_UNKNOWN}")
    report = unknown_smiles_tokens(tokenizer, texts, origins)
    if not report:
        return report
    total = sum(r["count"] for r in report.values())
    num_smiles = sum(any(t not in tokenizer.ids for t in smiles_tokens(s)) for s in texts)
    ranked = sorted(report.items(), key=lambda kv: -kv[1]["count"])
    listed = "; ".join(f"{t!r} x{r['count']} -> {r['mapped_to']!r} (first in {r['origin']}: "
                       f"{r['smiles']!r})" for t, r in ranked[:max_listed])
    more = f"; and {len(ranked) - max_listed} more" if len(ranked) > max_listed else ""
    message = (f"{where}: {total} token(s) in {num_smiles} of {len(texts)} SMILES are not in the "
               f"tokenizer's vocabulary ({tokenizer.vocab_size} tokens) and are encoded as a "
               f"backoff token or <unk>: {listed}{more}")
    if on_unknown == "error":
        raise DataError(message + f" (set {field}='warn' to continue)")
    logging.warning("%s", message)
    return report


class ProteinTokenizer(_TableTokenizer):
    kind = "protein"

    def __init__(self, tokens: Sequence[str] | None = None):
        super().__init__(tokens if tokens is not None else list(SPECIAL_TOKENS) + list(PROTEIN_ALPHABET))

    def split(self, text: str) -> list[str]:
        for i, ch in enumerate(text):
            if ch not in self.ids or self.ids[ch] < NUM_SPECIAL:
                raise DataError(f"protein sequence: character {ch!r} at position {i} is not an "
                                f"amino-acid letter of {PROTEIN_ALPHABET!r}")
        return list(text)

    @classmethod
    def train(cls, corpus: Iterable[str] = (), min_frequency: int = 1) -> "ProteinTokenizer":
        del corpus, min_frequency  # a fixed alphabet: nothing to learn
        return cls()


class SubwordTokenizer(BaseTokenizer):
    """Byte-level BPE trained with Hugging Face `tokenizers` (RoBERTa's scheme)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        # "<mask>" written in a document is text, not the mask token.
        self.hf.encode_special_tokens = True
        for i, t in enumerate(SPECIAL_TOKENS):
            if self.hf.token_to_id(t) != i:
                raise ValueError(f"SubwordTokenizer: special token {t!r} must have id {i}, "
                                 f"has {self.hf.token_to_id(t)}")

    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int, min_frequency: int = 2
              ) -> "SubwordTokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        hf = Tokenizer(models.BPE(unk_token=UNK))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size), min_frequency=int(min_frequency),
            special_tokens=list(SPECIAL_TOKENS), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(corpus, trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # Rust threads: the whole corpus in one call.
        out = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in out]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str) -> None:
        self._write_meta(directory)
        self.hf.save(os.path.join(directory, "tokenizer.json"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()


TOKENIZERS = {"bpe": SubwordTokenizer, "gpt2": Gpt2Tokenizer, "smiles": SmilesTokenizer,
              "protein": ProteinTokenizer}
# Kinds trained on the corpus (gpt2 is read from its files).
TRAINED = ("bpe", "smiles", "protein")


def train_tokenizer(kind: str, corpus: Iterable[str], *, vocab_size: int,
                    min_frequency: int) -> BaseTokenizer:
    """A new tokenizer of `kind` fitted to `corpus` (`vocab_size` is the BPE target)."""
    if kind not in TRAINED:
        raise ConfigError(f"tokenizer.kind={kind!r} is not trained on a corpus; expected one of "
                          f"{list(TRAINED)}")
    if kind == "bpe":
        return SubwordTokenizer.train(corpus, vocab_size, min_frequency)
    return TOKENIZERS[kind].train(corpus, min_frequency)


def load_tokenizer(directory: str) -> BaseTokenizer:
    """Reads a tokenizer that `save(directory)` wrote."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise DataNotFoundError(f"no tokenizer in {directory!r} (missing {META_FILE})")
    with open(meta_path) as f:
        meta = json.load(f)
    kind = meta.get("kind")
    if kind == "bpe":
        from tokenizers import Tokenizer
        tok = SubwordTokenizer(Tokenizer.from_file(os.path.join(directory, "tokenizer.json")))
    elif kind in ("smiles", "protein"):
        with open(os.path.join(directory, "vocab.json")) as f:
            tok = TOKENIZERS[kind](json.load(f))
    elif kind == "gpt2":
        tok = Gpt2Tokenizer.load(directory)
    else:
        raise DataError(f"{meta_path}: unknown tokenizer kind {kind!r}; expected one of {sorted(TOKENIZERS)}")
    if tok.vocab_size != meta["vocab_size"]:
        raise DataError(f"{directory}: vocab size {tok.vocab_size} != {meta['vocab_size']} in {META_FILE}")
    return tok


# --------------------------------------------------------------------- from a config

KINDS = (*TOKENIZERS, "auto")


def fairseq_dir(config: ml_collections.ConfigDict) -> str:
    """`data.path` when `data.source='fairseq'`, else ''."""
    d = config.data
    return str(d.path) if d.get("source") == shards.SOURCE else ""


def resolve_kind(config: ml_collections.ConfigDict) -> str:
    """`tokenizer.kind`, with `auto` (the base text recipes) resolved: `gpt2` when
    GPT-2 BPE files or a fairseq dict.txt are given, the kind of a prepared shard
    folder's tokenizer, else `bpe` (trained on the corpus)."""
    t = config.tokenizer
    if t.kind != "auto":
        return t.kind
    if t.get("encoder_json") or t.get("vocab_bpe") or t.get("dict"):
        return "gpt2"
    data_dir = fairseq_dir(config)
    if data_dir:
        saved = shards.saved_tokenizer_dir(data_dir)
        if saved:
            with open(os.path.join(saved, META_FILE)) as f:
                return json.load(f).get("kind", "bpe")
        if os.path.isfile(os.path.join(data_dir, shards.DICT_FILE)):
            return "gpt2"
    return "bpe"


def gpt2_from_config(config: ml_collections.ConfigDict) -> Gpt2Tokenizer:
    """The GPT-2 tokenizer the config's files name; `tokenizer.dict` defaults to
    the fairseq data directory's dict.txt (`data.source='fairseq'`)."""
    t = config.tokenizer
    dict_txt = t.get("dict", "") or ""
    data_dir = fairseq_dir(config)
    if not dict_txt and data_dir:
        dict_txt = os.path.join(data_dir, shards.DICT_FILE)
    if not dict_txt:
        raise ConfigError("config.tokenizer.dict is unset: tokenizer.kind='gpt2' maps GPT-2 ids "
                          "through a fairseq dict.txt (RoBERTa's, or the one fairseq-preprocess "
                          "wrote); give --config.tokenizer.dict=... and encoder_json / vocab_bpe")
    return Gpt2Tokenizer(dict_txt, t.get("encoder_json", "") or "", t.get("vocab_bpe", "") or "")


def load(config: ml_collections.ConfigDict) -> BaseTokenizer:
    """The tokenizer a run of `config` trains with; `load(config).encode(text)`
    gives the ids of `text` in its rows (without the row's <s> / </s>).

    In order: the tokenizer saved at `config.tokenizer.path` (a run sets it to
    `<workdir>/tokenizer`), the GPT-2 BPE files of `tokenizer.kind='gpt2'`
    (or `auto` with files), the tokenizer of a prepared shard folder
    (`data.source='fairseq'`). A trained kind (bpe, smiles, protein) needs a
    saved one: run `d2v_jax.train` (or `python -m d2v_jax.prepare`) first."""
    t = config.tokenizer
    if t.get("path") and os.path.isfile(os.path.join(t.path, META_FILE)):
        return load_tokenizer(t.path)
    kind = resolve_kind(config)
    if kind == "gpt2":
        return gpt2_from_config(config)
    data_dir = fairseq_dir(config)
    saved = shards.saved_tokenizer_dir(data_dir) if data_dir else ""
    if saved:
        return load_tokenizer(saved)
    raise ConfigError(f"config.tokenizer.path={t.get('path', '')!r} holds no tokenizer, and a "
                      f"{kind!r} tokenizer is trained on the corpus by a run: point "
                      "tokenizer.path at a run's <workdir>/tokenizer")


def tokenizer_for(config) -> BaseTokenizer:
    """The run's tokenizer: the one at `config.tokenizer.path` (set by `data.prepare`)."""
    if not config.tokenizer.path:
        raise ValueError("config.tokenizer.path is unset: call d2v_jax.data.prepare(config, "
                         "workdir) first (train.py does), which trains or reloads the tokenizer")
    return load_tokenizer(config.tokenizer.path)
