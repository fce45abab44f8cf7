"""The tokenizer interface every sequence tokenizer implements, and our id layout.

Our tokenizers (`bpe`, `smiles`, `protein`) put the five special tokens first,

    <pad>=0  <s>=1 (BOS)  </s>=2 (EOS)  <unk>=3  <mask>=4

then the learned or fixed vocabulary. The `gpt2` tokenizer keeps fairseq's
layout instead (`<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3, the dictionary, `<mask>`
last), so its ids are the ones fairseq and the released checkpoints use. Code
that builds rows asks the tokenizer (`pad_id`, `bos_id`, ...), never these
constants.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS, UNK, MASK = "<pad>", "<s>", "</s>", "<unk>", "<mask>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL = len(SPECIAL_TOKENS)

META_FILE = "d2v_tokenizer.json"


class BaseTokenizer:
    """The shared interface: `encode(str) -> list[int]` (the ids of the text,
    without <s> / </s>), `encode_batch` (int32 arrays, the fast path),
    `decode`, `save(directory)`, the special ids and `vocab_size`."""

    kind = ""
    pad_id, bos_id, eos_id, unk_id, mask_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID
    special_ids: tuple[int, ...] = tuple(range(NUM_SPECIAL))

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def random_range(self) -> tuple[int, int]:
        """[low, high) of the ids BERT-style random replacement draws from: no
        special token."""
        return NUM_SPECIAL, self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest of everything that decides the ids (shards record it)."""
        raise NotImplementedError

    def _write_meta(self, directory: str, **extra) -> None:
        os.makedirs(directory, exist_ok=True)
        meta = {"kind": self.kind, "special_tokens": list(SPECIAL_TOKENS),
                "vocab_size": self.vocab_size, **extra}
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
