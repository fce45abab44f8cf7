"""RoBERTa's vocabulary (tokenizer.kind='gpt2'): GPT-2 byte-level BPE from
encoder.json + vocab.bpe, mapped through a fairseq dict.txt.

The ids are checked against two references written from the official
description (tests/gpt2_helpers.py): fairseq's gpt2_bpe_utils algorithm +
Dictionary.encode_line, and transformers' GPT2Tokenizer on the same files
followed by the same dictionary mapping."""

import jax
import numpy as np
import pytest

from d2v_jax.api import save_checkpoint
from d2v_jax.config import load_config, validate
from d2v_jax.modalities.text import data as text_data
from d2v_jax.modalities.text import tokenizer as tk
from d2v_jax.modalities.text.corpus import read_corpus
from d2v_jax.modalities.text.gpt2 import Gpt2Tokenizer
from d2v_jax.modalities.text.prepare import attach_tokenizer

from gpt2_helpers import (read_dict_symbols, read_files, reference_dict_ids, reference_gpt2_ids,
                          write_gpt2_files)
from helpers import TEXT, TINY_TEXT, init_state, write_text

# Unicode (accents, CJK, emoji, a zero-width space), whitespace runs (spaces,
# tabs, newlines, leading and trailing), contractions, digits, and symbols the
# small dictionary lacks (-> <unk>).
TEXTS = [
    "The quick brown fox.",
    "naïve café — 東京 and Ünïcödé",
    "  leading spaces, trailing   ",
    "tabs\t\tand\nnew\n\nlines \r\n",
    "It's we'll they've I'M you'd",
    "emoji 🤖🤖 and \u200b zero-width",
    "1234567 8.9e10 0x1F",
    "<mask> </s> <|endoftext|> are text",
    "",
    "x" * 300,
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_gpt2_files(str(tmp_path_factory.mktemp("gpt2")))


def test_ids_equal_fairseq_and_transformers_references(files):
    from transformers import GPT2Tokenizer

    tok = Gpt2Tokenizer.from_files(files["encoder_json"], files["vocab_bpe"], files["dict"])
    encoder, ranks = read_files(files["encoder_json"], files["vocab_bpe"])
    symbols = read_dict_symbols(files["dict"])
    hf = GPT2Tokenizer(files["encoder_json"], files["vocab_bpe"])
    # fairseq: <s> <pad> </s> <unk>, the dict's lines, <mask> appended.
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(symbols) + 1 and tok.mask_id == len(symbols)
    unknown = 0
    for text in TEXTS:
        ours = tok.encode(text)
        assert isinstance(ours, list) and all(isinstance(i, int) for i in ours)
        assert ours == reference_dict_ids(reference_gpt2_ids(text, encoder, ranks), symbols), text
        if "<|endoftext|>" not in text:  # transformers makes that string its special token
            assert ours == reference_dict_ids(hf.encode(text), symbols), text
        unknown += ours.count(tok.unk_id)
    assert unknown > 0  # the dictionary lacks some GPT-2 ids: they are <unk>, as fairseq's
    batch = tok.encode_batch(TEXTS)
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in TEXTS]
    assert tok.decode(tok.encode("The quick brown fox.")) == "The quick brown fox."


def test_save_load_and_the_run_layout(files, tmp_path):
    tok = Gpt2Tokenizer.from_files(files["encoder_json"], files["vocab_bpe"], files["dict"])
    tok.save(str(tmp_path / "tok"))
    again = tk.load_tokenizer(str(tmp_path / "tok"))
    assert again.kind == "gpt2" and again.fingerprint() == tok.fingerprint()
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    # A run: tokenizer.kind=gpt2 + the files; model.vocab_size from them, rows
    # start with fairseq's <s> (0), pad with <pad> (1), </s> is 2.
    config = load_config(f"{TEXT}:tiny_v2", {**TINY_TEXT, "tokenizer.kind": "gpt2",
                                             "tokenizer.encoder_json": files["encoder_json"],
                                             "tokenizer.vocab_bpe": files["vocab_bpe"],
                                             "tokenizer.dict": files["dict"],
                                             "data.packing": "doc", "data.too_long": "skip"})
    validate(config)
    config = text_data.prepare(config, str(tmp_path / "run"))
    assert config.model.vocab_size == tok.vocab_size
    assert tk.load(config).encode(TEXTS[0]) == tok.encode(TEXTS[0])
    src, transform = text_data.pretrain_parts(config)
    out = transform(src[0], epoch=0)
    n = int((~out["padding_mask"]).sum())
    assert out["tokens"][0] == 0 and out["tokens"][n - 1] == 2 and (out["tokens"][n:] == 1).all()
    first = next(t for t in read_corpus(config).texts if len(tok.encode(t)) + 2 <= 24)
    assert out["tokens"][1:n - 1].tolist() == tok.encode(first)  # packing 'doc': one per row
    # base recipes: kind 'auto' is gpt2 when the files are given.
    base = load_config(f"{TEXT}:base_v2", {"tokenizer.dict": files["dict"],
                                                       "tokenizer.encoder_json": files["encoder_json"],
                                                       "tokenizer.vocab_bpe": files["vocab_bpe"]})
    assert base.tokenizer.kind == "auto" and tk.resolve_kind(base) == "gpt2"
    assert tk.load(base).encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_bad_files_name_the_file_and_line(files, tmp_path):
    enc, bpe = files["encoder_json"], files["vocab_bpe"]
    bad = write_text(tmp_path / "bad_dict.txt", "13 500\nnot-a-count\n")
    with pytest.raises(ValueError, match=r"bad_dict\.txt:2: 'not-a-count' is not '<symbol> <count>'"):
        Gpt2Tokenizer.from_files(enc, bpe, bad)
    dup = write_text(tmp_path / "dup.txt", "13 5\n13 4\n")
    with pytest.raises(ValueError, match=r"dup\.txt:2: symbol '13' appears twice"):
        Gpt2Tokenizer.from_files(enc, bpe, dup)
    words = write_text(tmp_path / "words.txt", "13 5\nhello 4\n")  # not a GPT-2 dictionary
    with pytest.raises(ValueError, match=r"words\.txt:2: symbol 'hello' is not a GPT-2 token id"):
        Gpt2Tokenizer.from_files(enc, bpe, words)
    big = write_text(tmp_path / "big.txt", "13 5\n99999 4\n")  # an id encoder.json lacks
    with pytest.raises(ValueError, match=r"big\.txt:2: symbol '99999' is not a GPT-2 token id"):
        Gpt2Tokenizer.from_files(enc, bpe, big)
    merges = write_text(tmp_path / "vocab.bpe", "#version: 0.2\nq zzzz\n")
    with pytest.raises(ValueError, match=r"vocab\.bpe:2: the merge 'q zzzz' .* not one GPT-2 BPE"):
        Gpt2Tokenizer.from_files(enc, merges, files["dict"])
    with pytest.raises(ValueError, match="encoder_json and config.tokenizer.vocab_bpe go together"):
        Gpt2Tokenizer(files["dict"], enc, "")
    dict_only = Gpt2Tokenizer(files["dict"])  # preprocessed data needs no BPE files
    assert dict_only.vocab_size == Gpt2Tokenizer.from_files(enc, bpe, files["dict"]).vocab_size
    with pytest.raises(ValueError, match="cannot encode text"):
        dict_only.encode("hello")


def test_config_checks_and_a_mismatched_saved_tokenizer(files, tmp_path):
    with pytest.raises(ValueError, match="config.tokenizer.encoder_json"):
        validate(load_config(f"{TEXT}:tiny_v2", {"tokenizer.kind": "gpt2",
                                                 "tokenizer.encoder_json": files["encoder_json"]}))
    with pytest.raises(ValueError, match="set tokenizer.kind='gpt2'"):
        validate(load_config(f"{TEXT}:tiny_v2", {"tokenizer.dict": files["dict"]}))
    gpt2 = {**TINY_TEXT, "tokenizer.kind": "gpt2", "tokenizer.dict": files["dict"],
            "tokenizer.encoder_json": files["encoder_json"], "tokenizer.vocab_bpe": files["vocab_bpe"]}
    workdir = str(tmp_path / "run")
    text_data.prepare(load_config(f"{TEXT}:tiny_v2", gpt2), workdir)
    other = write_text(tmp_path / "other.txt", "".join(
        line for line in open(files["dict"]) if not line.startswith("13 ")))
    with pytest.raises(ValueError, match="is not the dictionary of the tokenizer the run saved"):
        text_data.prepare(load_config(f"{TEXT}:tiny_v2", {**gpt2, "tokenizer.dict": other}), workdir)
    # A converted checkpoint's vocabulary (model.vocab_size) must be the files'.
    with pytest.raises(ValueError, match=r"model.vocab_size=50265 but the tokenizer .* has "
                                         r"\d+ tokens"):
        text_data.prepare(load_config(f"{TEXT}:tiny_v2", {**gpt2, "model.vocab_size": 50265}),
                          str(tmp_path / "run2"))
    np.testing.assert_array_equal(tk.load(load_config(f"{TEXT}:tiny_v2", gpt2)).encode_batch(["a b"])[0],
                                  Gpt2Tokenizer.from_files(files["encoder_json"], files["vocab_bpe"],
                                                           files["dict"]).encode("a b"))


def test_a_converted_checkpoint_takes_its_vocabulary_files(files, tmp_path):
    """A converted fairseq text checkpoint (tokenizer.kind gpt2, the dictionary's
    vocab_size): `prepare --tokenizer_for` checks the files against it and
    saves them beside it; fine-tuning (prepare_backbone) then finds them."""
    tok = Gpt2Tokenizer.from_files(files["encoder_json"], files["vocab_bpe"], files["dict"])
    converted = load_config(f"{TEXT}:tiny_v2", {**TINY_TEXT, "tokenizer.kind": "gpt2",
                                                "model.vocab_size": tok.vocab_size})
    run = str(tmp_path / "converted")
    save_checkpoint(run, init_state(converted, jax.random.PRNGKey(0)), converted)
    with pytest.raises(FileNotFoundError) as e:
        text_data.prepare_backbone(load_config(f"{TEXT}:tiny_v2", {
            **TINY_TEXT, "tokenizer.kind": "gpt2", "model.vocab_size": tok.vocab_size}), run, None)
    assert "--tokenizer_for" in e.value.hint
    with_files = load_config(f"{TEXT}:tiny_v2", {"tokenizer.kind": "gpt2",
                                                 "tokenizer.encoder_json": files["encoder_json"],
                                                 "tokenizer.vocab_bpe": files["vocab_bpe"]})
    short = write_text(tmp_path / "short.txt", "".join(open(files["dict"]).readlines()[:-3]))
    with_files.tokenizer.dict = short
    with pytest.raises(ValueError, match=rf"give {tok.vocab_size - 3} ids .* converted with "
                                         rf"{tok.vocab_size}: not the checkpoint's dictionary"):
        attach_tokenizer(with_files, run)
    with_files.tokenizer.dict = files["dict"]
    saved = attach_tokenizer(with_files, run)
    bconfig = text_data.prepare_backbone(load_config(f"{TEXT}:tiny_v2", {
        **TINY_TEXT, "tokenizer.kind": "gpt2", "model.vocab_size": tok.vocab_size}), run, None)
    assert bconfig.tokenizer.path == saved
    assert tk.tokenizer_for(bconfig).encode(TEXTS[1]) == tok.encode(TEXTS[1])
