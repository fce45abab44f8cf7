"""fairseq data directories as pretraining corpora (`data.source='fairseq'`).

A directory holds a split's MMIDIDX files (`<split>.bin/.idx`, `<split>1...`;
d2v_jax/data/fairseq_bin.py) and the vocabulary its ids belong to:

- `dict.txt`: fairseq-preprocess output (RoBERTa's Books + Wikipedia, GLUE),
  ids of the `gpt2` tokenizer with that dictionary; or
- `d2v_shards.json` + `tokenizer/`: what `python -m d2v_jax.prepare` writes
  (any tokenizer kind; with `gpt2` it writes `dict.txt` too, so fairseq reads
  the folder as well).

`check_tokenizer` refuses shards written with another vocabulary than the
run's; `open_split` returns the record files of a split, never reading them.
"""

from __future__ import annotations

import json
import os

from d2v_jax.data.fairseq_bin import IndexedTokens, read_dictionary, split_prefixes
from d2v_jax.errors import ConfigError, DataError, DataNotFoundError
from d2v_jax.modalities.text.vocab import BaseTokenizer, META_FILE

SOURCE = "fairseq"  # the data.source value
META = "d2v_shards.json"
TOKENIZER_DIR = "tokenizer"
DICT_FILE = "dict.txt"


def read_meta(directory: str) -> dict | None:
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def saved_tokenizer_dir(directory: str) -> str:
    """`<dir>/tokenizer` when prepare saved one there, else ''."""
    path = os.path.join(directory, TOKENIZER_DIR)
    return path if os.path.isfile(os.path.join(path, META_FILE)) else ""


def check_directory(directory: str) -> None:
    if not directory:
        raise ConfigError("config.data.path is empty: data.source='fairseq' reads a fairseq data "
                          "directory (dict.txt + <split>.bin / .idx, or python -m d2v_jax.prepare "
                          "output)")
    if not os.path.isdir(directory):
        raise DataNotFoundError(f"config.data.path={directory!r} is not a folder (a fairseq data "
                                "directory)")
    if read_meta(directory) is None and not os.path.isfile(os.path.join(directory, DICT_FILE)):
        raise DataNotFoundError(f"{directory}: neither dict.txt (fairseq-preprocess) nor {META} "
                                "(python -m d2v_jax.prepare): not a fairseq data directory")


def check_tokenizer(directory: str, tok: BaseTokenizer, where: str) -> None:
    """The shards' ids are the run's tokenizer's: the same dictionary (gpt2) or
    the same tokenizer fingerprint (prepare's record); else a DataError."""
    check_directory(directory)
    meta = read_meta(directory)
    recorded = (meta or {}).get("tokenizer", {})
    if os.path.isfile(os.path.join(directory, DICT_FILE)) and (not meta or recorded.get("kind") == "gpt2"):
        if tok.kind != "gpt2":
            raise DataError(f"{directory} holds fairseq dictionary ids (dict.txt) but the run's "
                            f"tokenizer ({where}) is {tok.kind!r}; use tokenizer.kind='gpt2'")
        data_dict = read_dictionary(os.path.join(directory, DICT_FILE))
        if data_dict.symbols != tok.dictionary.symbols:
            raise DataError(f"{directory}/dict.txt ({len(data_dict) - 4} symbols) is not the "
                            f"dictionary of the run's tokenizer ({where}: "
                            f"{tok.dictionary.path}, {len(tok.dictionary) - 4} symbols): the "
                            "shards come from another tokenizer")
        return
    if recorded.get("kind") != tok.kind or recorded.get("fingerprint") != tok.fingerprint():
        raise DataError(f"{directory}: the shards were written by a {recorded.get('kind')!r} "
                        f"tokenizer ({recorded.get('vocab_size')} tokens, fingerprint "
                        f"{str(recorded.get('fingerprint'))[:12]}) but the run's ({where}) is "
                        f"{tok.kind!r} ({tok.vocab_size} tokens, {tok.fingerprint()[:12]}): the "
                        "shards come from another tokenizer",
                        hint="train with the shards' own tokenizer (leave tokenizer.path empty "
                             "in a new work dir), or prepare the corpus again with this one")


def open_split(directory: str, split: str) -> list[IndexedTokens]:
    """The record files of `split` (train, train1, ...), opened (indexes mapped)."""
    check_directory(directory)
    return [IndexedTokens(p) for p in split_prefixes(directory, split)]


def write_meta(directory: str, meta: dict) -> None:
    tmp = os.path.join(directory, f".{META}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(directory, META))
