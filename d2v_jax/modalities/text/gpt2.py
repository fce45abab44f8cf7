"""RoBERTa's vocabulary: GPT-2 byte-level BPE mapped through a fairseq dict.txt.

What fairseq does to a line of text (`fairseq/data/encoders/gpt2_bpe_utils.py`,
`gpt2_bpe.py`, `fairseq/data/dictionary.py`, `tasks/masked_lm.py`):

1. GPT-2's regex splits the text into words (`'s 't ... | ?\\p{L}+ | ?\\p{N}+ |
   ?[^\\s\\p{L}\\p{N}]+ | \\s+(?!\\S) | \\s+`), each word's UTF-8 bytes become
   printable characters (`bytes_to_unicode`), and the merges of `vocab.bpe`
   (its first line is a `#version` header; the file is split on newlines and
   the first and last pieces dropped) are applied by rank; every resulting
   piece is looked up in `encoder.json`: the GPT-2 ids.
2. Each GPT-2 id, written as a decimal string, is a symbol of the
   `Dictionary` loaded from `dict.txt`: `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3,
   then the file's lines in order; a symbol the file lacks is `<unk>`.
3. Masked LM appends `<mask>` after the dictionary (`vocab_size` = 4 + lines + 1:
   50,265 for RoBERTa and the released data2vec text checkpoints).

Step 1 runs in Hugging Face `tokenizers` (Rust, parallel over a batch), built
from the two files exactly as read by fairseq; steps 2-3 are a lookup table.
`tests/test_gpt2_tokenizer.py` checks the ids against two references written
from the official description: fairseq's algorithm, and transformers'
`GPT2Tokenizer` on the same files, each followed by the dictionary mapping.

`Gpt2Tokenizer.from_files(encoder_json, vocab_bpe, dict_txt)` is the library
entry (GLUE preprocessing and the like); without the two BPE files it still
knows the vocabulary (data that is already ids) but cannot encode text.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Sequence

import numpy as np

from d2v_jax.data.fairseq_bin import Dictionary, read_dictionary
from d2v_jax.errors import ConfigError, DataError, DataNotFoundError
from d2v_jax.modalities.text.vocab import BaseTokenizer

ENCODER_FILE, MERGES_FILE, DICT_FILE = "encoder.json", "vocab.bpe", "dict.txt"
# fairseq's Dictionary.finalize pads the symbol count with these.
MADEUP_PREFIX = "madeupword"


def read_encoder(path: str) -> dict[str, int]:
    """encoder.json: a JSON object {token string: GPT-2 id}."""
    if not os.path.isfile(path):
        raise DataNotFoundError(f"config.tokenizer.encoder_json: {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            encoder = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(encoder, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in encoder.items()):
        raise DataError(f"{path}: expected a JSON object of token -> id (GPT-2's encoder.json)")
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise DataError(f"{path}: the ids are not 0..{len(encoder) - 1}, each once")
    return encoder


def read_merges(path: str, encoder: dict[str, int]) -> list[tuple[str, str]]:
    """vocab.bpe as fairseq reads it (split on newlines, first and last pieces
    dropped); every merge and its result must be tokens of `encoder`."""
    if not os.path.isfile(path):
        raise DataNotFoundError(f"config.tokenizer.vocab_bpe: {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")[1:-1]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
    merges = []
    for lineno, line in enumerate(lines, 2):
        pair = tuple(line.split())
        if len(pair) != 2:
            raise DataError(f"{path}:{lineno}: {line[:60]!r} is not a merge '<a> <b>'")
        if pair[0] not in encoder or pair[1] not in encoder or pair[0] + pair[1] not in encoder:
            raise DataError(f"{path}:{lineno}: the merge {line!r} uses or makes a token that "
                            "encoder.json lacks: the two files are not one GPT-2 BPE")
        merges.append(pair)
    return merges


def dict_lookup(dictionary: Dictionary, num_gpt2: int | None) -> np.ndarray | None:
    """GPT-2 id -> dictionary id (`<unk>` where the dict lacks it), checking
    that every dictionary symbol is a GPT-2 id (`str(id)`, id < num_gpt2) or
    fairseq's `madeupwordNNNN` padding. None without BPE files (`num_gpt2`)."""
    lut = None if num_gpt2 is None else np.full(num_gpt2, dictionary.unk, np.int32)
    found = 0
    for i, s in enumerate(dictionary.symbols[4:], 4):
        if s.isdigit() and str(int(s)) == s and (num_gpt2 is None or int(s) < num_gpt2):
            found += 1
            if lut is not None and dictionary.indices[s] == i:
                lut[int(s)] = i
        elif not s.startswith(MADEUP_PREFIX):
            what = f"of encoder.json's {num_gpt2}" if num_gpt2 is not None else ""
            raise DataError(f"{dictionary.path}:{i - 3}: symbol {s!r} is not a GPT-2 token id "
                            f"{what} (nor fairseq's {MADEUP_PREFIX}NNNN padding): this dict.txt "
                            "is not the dictionary of a GPT-2 BPE")
    if found == 0:
        raise DataError(f"{dictionary.path}: no GPT-2 token id among its symbols")
    return lut


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Gpt2Tokenizer(BaseTokenizer):
    """GPT-2 BPE + fairseq dictionary, fairseq's ids (module docstring)."""

    kind = "gpt2"

    def __init__(self, dict_txt: str, encoder_json: str = "", vocab_bpe: str = ""):
        if bool(encoder_json) != bool(vocab_bpe):
            raise ConfigError("config.tokenizer.encoder_json and config.tokenizer.vocab_bpe go "
                              f"together (got {encoder_json!r} and {vocab_bpe!r})")
        self.files = {DICT_FILE: dict_txt, ENCODER_FILE: encoder_json, MERGES_FILE: vocab_bpe}
        self.dictionary = read_dictionary(dict_txt)
        d = self.dictionary
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = d.bos, d.pad, d.eos, d.unk
        self.mask_id = d.mask_id
        self.special_ids = (d.bos, d.pad, d.eos, d.unk, d.mask_id)
        self.hf = None
        encoder = None
        if encoder_json:
            encoder = read_encoder(encoder_json)
            self.hf = _byte_level_bpe(encoder, read_merges(vocab_bpe, encoder))
        self.lut = dict_lookup(d, None if encoder is None else len(encoder))

    @classmethod
    def from_files(cls, encoder_json: str, vocab_bpe: str, dict_txt: str) -> "Gpt2Tokenizer":
        return cls(dict_txt, encoder_json, vocab_bpe)

    @property
    def vocab_size(self) -> int:
        return len(self.dictionary) + 1  # + <mask>

    @property
    def random_range(self) -> tuple[int, int]:
        return 4, self.mask_id  # the dictionary's own symbols (fairseq: nspecial = 4)

    @property
    def can_encode(self) -> bool:
        return self.hf is not None

    def _need_bpe(self) -> None:
        if self.hf is None:
            raise ConfigError("config.tokenizer.encoder_json / vocab_bpe are unset: this GPT-2 "
                              f"tokenizer has only {self.files[DICT_FILE]} and cannot encode "
                              "text; give GPT-2's encoder.json and vocab.bpe")

    def gpt2_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The GPT-2 ids of each text (before the dictionary)."""
        self._need_bpe()
        # encode_batch_fast: the ids without the character offsets (tokenizers >= 0.20).
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        ids = self.gpt2_ids(texts)
        if not ids:
            return []
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
        return np.split(self.lut[flat], np.cumsum(lengths)[:-1])  # one lookup for the batch

    def decode(self, ids: Iterable[int]) -> str:
        self._need_bpe()
        symbols = self.dictionary.symbols
        gpt2 = [int(symbols[i]) for i in map(int, ids)
                if 4 <= i < len(symbols) and symbols[i].isdigit()]
        return self.hf.decode(gpt2, skip_special_tokens=False)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in (DICT_FILE, ENCODER_FILE, MERGES_FILE):
            h.update(name.encode() + b"=" + (sha256_file(self.files[name]).encode()
                                            if self.files[name] else b"-"))
        return h.hexdigest()

    def same_vocabulary(self, other: "Gpt2Tokenizer") -> bool:
        """The same dictionary (the ids of preprocessed data mean the same)."""
        return self.dictionary.symbols == other.dictionary.symbols

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for name, path in self.files.items():
            if path:
                shutil.copyfile(path, os.path.join(directory, name))
        self._write_meta(directory, layout="fairseq", dict_lines=len(self.dictionary) - 4,
                         can_encode=self.can_encode,
                         sha256={n: sha256_file(p) for n, p in self.files.items() if p})

    @classmethod
    def load(cls, directory: str) -> "Gpt2Tokenizer":
        enc = os.path.join(directory, ENCODER_FILE)
        have_bpe = os.path.isfile(enc)
        return cls(os.path.join(directory, DICT_FILE), enc if have_bpe else "",
                   os.path.join(directory, MERGES_FILE) if have_bpe else "")


def _byte_level_bpe(encoder: dict[str, int], merges: list[tuple[str, str]]):
    """GPT-2's BPE in Hugging Face `tokenizers`: the same regex pre-tokenizer
    and byte-to-unicode map (ByteLevel, no prefix space), the merges by rank."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE(vocab=encoder, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok

