"""Small GPT-2 BPE files for the tests (nothing is downloaded): an
`encoder.json` + `vocab.bpe` pair in GPT-2's format, learned by Hugging Face
`tokenizers` on CPython's packaged reference manual, and a fairseq `dict.txt`
made as fairseq-preprocess makes one (GPT-2 ids as symbols, most frequent
first), with some ids left out (they become <unk>) and fairseq's
`madeupword` padding at the end.

Also the two references the tokenizer is checked against, written from the
official description (fairseq `gpt2_bpe_utils.py` + `Dictionary`), not from
d2v_jax: `reference_gpt2_ids` and `reference_dict_ids`.
"""

from __future__ import annotations

import collections
import json
import os
from functools import lru_cache

import regex

# GPT-2's pre-tokenizer pattern, as in OpenAI's encoder.py / fairseq gpt2_bpe_utils.py.
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# Text the BPE is learned on: the reference manual's paragraphs.
TRAIN_DOCS = 800
DROPPED_FROM_DICT = 7  # GPT-2 ids the dict leaves out (-> <unk>)


def write_gpt2_files(directory: str, vocab_size: int = 600) -> dict[str, str]:
    """encoder.json, vocab.bpe and dict.txt in `directory`; returns their paths."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from d2v_jax.modalities.text.corpus import python_docs_corpus

    os.makedirs(directory, exist_ok=True)
    docs = python_docs_corpus().texts[:TRAIN_DOCS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(directory)  # vocab.json, merges.txt ("#version: 0.2" header)
    paths = {"encoder_json": os.path.join(directory, "encoder.json"),
             "vocab_bpe": os.path.join(directory, "vocab.bpe"),
             "dict": os.path.join(directory, "dict.txt")}
    os.replace(os.path.join(directory, "vocab.json"), paths["encoder_json"])
    os.replace(os.path.join(directory, "merges.txt"), paths["vocab_bpe"])
    # dict.txt as fairseq-preprocess writes it: symbols by count, most frequent first.
    encoder, merges = read_files(paths["encoder_json"], paths["vocab_bpe"])
    counts = collections.Counter(i for d in docs for i in reference_gpt2_ids(d, encoder, merges))
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    kept = ranked[:-DROPPED_FROM_DICT]
    with open(paths["dict"], "w", encoding="utf-8") as f:
        for i in kept:
            f.write(f"{i} {counts[i]}\n")
        f.write("madeupword0000 0\n")
    return paths


def read_files(encoder_json: str, vocab_bpe: str):
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [tuple(m.split()) for m in f.read().split("\n")[1:-1]]
    return encoder, {m: r for r, m in enumerate(merges)}


@lru_cache()
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _bpe(word: str, ranks: dict) -> list[str]:
    """Merge the lowest-ranked adjacent pair, every occurrence left to right, until none ranks."""
    parts = list(word)
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                out.append(parts[i] + parts[i + 1])
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


def reference_gpt2_ids(text: str, encoder: dict, ranks: dict) -> list[int]:
    """GPT-2 BPE as fairseq's gpt2_bpe_utils.Encoder.encode describes it."""
    table = byte_to_unicode()
    ids = []
    for word in GPT2_PATTERN.findall(text):
        mapped = "".join(table[b] for b in word.encode("utf-8"))
        ids += [encoder[p] for p in _bpe(mapped, ranks)]
    return ids


def read_dict_symbols(dict_txt: str) -> list[str]:
    """fairseq Dictionary.load: <s> <pad> </s> <unk>, then each line's symbol."""
    symbols = ["<s>", "<pad>", "</s>", "<unk>"]
    with open(dict_txt, encoding="utf-8") as f:
        for line in f:
            symbols.append(line.rstrip().rsplit(" ", 1)[0])
    return symbols


def reference_dict_ids(gpt2_ids: list[int], symbols: list[str]) -> list[int]:
    """fairseq's encode_line (no </s>) of the BPE output ' '.join(map(str, ids))."""
    index = {s: i for i, s in enumerate(symbols)}
    return [index.get(w, 3) for w in " ".join(map(str, gpt2_ids)).split()]
