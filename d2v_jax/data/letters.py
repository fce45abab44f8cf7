"""The letter vocabulary of CTC speech recognition (wav2vec 2.0 / data2vec
fine-tuning data): fairseq's `.ltr` units (letters, apostrophe, `|` after every
word), the LibriSpeech letter dictionary and fairseq `dict.ltr.txt` files."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np

from d2v_jax.errors import DataError

# The letter dictionary of the LibriSpeech fine-tuning data (fairseq dict.ltr.txt,
# by frequency) behind the Hugging Face `*-960h` CTC heads: <pad> is the CTC
# blank, `|` the word boundary. A model fine-tuned with it maps 1:1 onto
# Data2VecAudioForCTC / Wav2Vec2ForCTC's 32 outputs.
LETTERS = tuple("ETAONIHSRDLUMWCFGYPBVK'XJQZ")
DEFAULT_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "|") + LETTERS
# fairseq's Dictionary puts these first (bos, pad, eos, unk) and its CTC
# criterion uses bos (index 0) as the blank.
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BOUNDARY = "|"
# Punctuation a transcript may carry; it is dropped (a hyphen becomes a word break).
_DROP = re.compile(r"[.,;:!?\"()\[\]]")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Output units of the CTC head: index i is `tokens[i]`; `blank` is the
    CTC blank (also the label padding); `unk` stands for a character outside
    the dictionary."""

    tokens: tuple[str, ...] = DEFAULT_TOKENS
    blank: int = 0
    unk: int = 3

    def __post_init__(self):
        if BOUNDARY not in self.tokens:
            raise ValueError(f"the vocabulary has no word boundary {BOUNDARY!r}: {self.tokens}")
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def specials(self) -> frozenset[int]:
        return frozenset(i for i, t in enumerate(self.tokens) if t.startswith("<"))

    def encode_units(self, units: Sequence[str], origin: str = "") -> np.ndarray:
        """Letter units (an `.ltr` line split on spaces) -> int32 ids; a unit
        outside the dictionary is an error naming `origin`."""
        bad = sorted({u for u in units if u not in self._ids})
        if bad:
            raise DataError(f"{origin or 'transcript'}: units {bad} are not in the letter "
                            f"dictionary ({''.join(t for t in self.tokens if len(t) == 1)})")
        return np.asarray([self._ids[u] for u in units], np.int32)

    def encode(self, text: str, origin: str = "") -> np.ndarray:
        """A word transcript -> ids of its letters with `|` after every word."""
        return self.encode_units(letter_units(text), origin)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids (already collapsed) -> words: `|` is a space, specials are dropped."""
        text = "".join(self.tokens[i] for i in ids if i not in self.specials)
        return normalize_words(text.replace(BOUNDARY, " "))


def normalize_words(text: str) -> str:
    """Upper case, punctuation dropped, hyphens and whitespace runs -> one space."""
    text = _DROP.sub("", text.upper().replace("-", " "))
    return " ".join(text.split())


def letter_units(text: str) -> list[str]:
    """fairseq's `.ltr` form of a word transcript: its letters, `|` after every
    word ("HI YOU" -> H I | Y O U |)."""
    units = []
    for word in normalize_words(text).split():
        units.extend(word)
        units.append(BOUNDARY)
    return units


def read_fairseq_dict(path: str) -> Vocab:
    """A fairseq `dict.ltr.txt` ("<symbol> <count>" per line) as a Vocab: the
    four fairseq specials first, blank = `<s>` (index 0) as fairseq's CTC."""
    tokens = list(FAIRSEQ_SPECIALS)
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            sym = line.split()[0]
            if sym in tokens:
                raise DataError(f"{path} line {lineno}: symbol {sym!r} appears twice")
            tokens.append(sym)
    return Vocab(tuple(tokens), blank=0, unk=3)


def vocab_for(manifest_dir: str | None) -> Vocab:
    """`dict.ltr.txt` beside a fairseq manifest when there is one, else the
    LibriSpeech letter dictionary."""
    if manifest_dir:
        path = os.path.join(manifest_dir, "dict.ltr.txt")
        if os.path.isfile(path):
            return read_fairseq_dict(path)
    return Vocab()
