"""Sequence data: readers and their errors, packing, the grain pipeline, the tokenizer
saved beside the run."""

import os

import numpy as np
import pytest

from d2v_jax.modalities.text import data
from d2v_jax.config import load_config, validate
from d2v_jax.modalities.text import data as text
from d2v_jax.modalities.text import corpus as text_corpus
from d2v_jax.modalities.text.tokenizer import BOS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID

from helpers import MOLECULES, TEXT, pretrain_dataset, write_text


def test_text_files_line_and_blank_documents(tmp_path):
    p = write_text(tmp_path / "a.txt", "first doc\nsecond doc\n\nthird\n  \nfourth\nstill fourth\n")
    assert text_corpus.read_text_files([p], "line").texts == [
        "first doc", "second doc", "third", "fourth", "still fourth"]
    blank = text_corpus.read_text_files([p], "blank")
    assert blank.texts == ["first doc\nsecond doc", "third", "fourth\nstill fourth"]
    assert blank.origins == [f"{p}:1", f"{p}:4", f"{p}:6"]


def test_non_utf8_line_is_named(tmp_path):
    p = write_text(tmp_path / "bad.txt", b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: not valid UTF-8"):
        text_corpus.read_text_files([p], "line")


def test_empty_corpus_is_an_error(tmp_path):
    p = write_text(tmp_path / "empty.txt", "\n\n")
    text_corpus._read_corpus.cache_clear()
    with pytest.raises(ValueError, match="empty corpus: no documents in data.source='text'"):
        text_corpus._read_corpus("text", p, "line", "smiles", "skip", True)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        text_corpus._read_corpus("text", str(tmp_path / "nope*.txt"), "line", "smiles", "skip", True)


def test_smiles_csv_invalid_rows_skip_and_count_or_stop(tmp_path):
    p = write_text(tmp_path / "mols.csv",
                   "id,smiles,label\n1,CCO,0.5\n2,C1CC,1.0\n3,C C,0\n4,c1ccccc1Cl,2\n")
    corpus = text_corpus.read_smiles_files([p], "smiles", "skip", parse=True)
    assert corpus.texts == ["CCO", "c1ccccc1Cl"] and corpus.skipped == 2
    assert corpus.origins == [f"{p}:2", f"{p}:5"]
    with pytest.raises(ValueError, match=r"mols\.csv:3: RDKit cannot parse SMILES 'C1CC'"):
        text_corpus.read_smiles_files([p], "smiles", "error", parse=True)
    with pytest.raises(ValueError, match=r"no column 'smi'.*\['id', 'smiles', 'label'\]"):
        text_corpus.read_smiles_files([p], "smi", "skip", parse=True)
    tsv = write_text(tmp_path / "mols.tsv", "smiles\tlabel\nCCN\t1\n")
    assert text_corpus.read_smiles_files([tsv], "smiles", "error", parse=True).texts == ["CCN"]


def test_fasta_records(tmp_path):
    p = write_text(tmp_path / "p.fasta", ">a desc\nMKV\nLA*\n>b\nACD\n>c\nAJK\n")
    corpus = text_corpus.read_fasta_files([p], "skip")
    assert corpus.texts == ["MKVLA", "ACD"] and corpus.skipped == 1
    with pytest.raises(ValueError, match=r"p\.fasta:6 \(c\): .*'J' at position 1"):
        text_corpus.read_fasta_files([p], "error")
    packaged = text_corpus.read_fasta_files([text_corpus.proteome_path()], "error")
    assert len(packaged) == 2100


def _docs(lengths, start=NUM_SPECIAL):
    out, v = [], start
    for n in lengths:
        out.append(np.arange(v, v + n, dtype=np.int32))
        v += n
    return out


def test_stream_packing_is_the_concatenation():
    docs = _docs([5, 9, 3, 12])
    rows = text.build_sequences(docs, 8, "stream", "error")
    assert all(r[0] == BOS_ID and r.size <= 8 for r in rows)
    stream = np.concatenate([np.append(d, EOS_ID) for d in docs])
    np.testing.assert_array_equal(np.concatenate([r[1:] for r in rows]), stream)
    assert all(r.size == 8 for r in rows[:-1])


def test_complete_doc_never_splits_and_too_long_policies():
    docs = _docs([3, 2, 4, 1, 6])
    rows = text.build_sequences(docs, 8, "complete_doc", "error")
    got = []
    for r in rows:
        assert r[0] == BOS_ID and r[-1] == EOS_ID and r.size <= 8
        parts = np.split(r[1:], np.flatnonzero(r[1:] == EOS_ID) + 1)[:-1]
        got += [p[:-1] for p in parts]
    assert [g.tolist() for g in got] == [d.tolist() for d in docs]

    long_docs = _docs([3, 10])
    with pytest.raises(ValueError, match=r"document 1 \(f:2\) has 10 tokens, 12 with <s> and "
                                         r"</s>, more than data.max_len=8"):
        text.build_sequences(long_docs, 8, "doc", "error", origins=["f:1", "f:2"])
    assert len(text.build_sequences(long_docs, 8, "doc", "skip")) == 1
    # split: the document and its </s> in consecutive blocks of max_len - 1, each after <s>
    split = text.build_sequences(long_docs, 8, "doc", "split")
    assert [r.size for r in split] == [5, 8, 5]
    assert all(r[0] == BOS_ID for r in split)
    np.testing.assert_array_equal(np.concatenate([r[1:] for r in split[1:]]),
                                  np.append(long_docs[1], EOS_ID))
    crop = text.build_sequences(long_docs, 8, "doc", "crop")
    assert crop[1].size == 12  # cut to a window per epoch by the transform


def _tiny(spec, **over):
    base = {"model.depth": 2, "target.top_k": 2, "data.batch_size": 4}
    return load_config(spec, {**base, **over})


def test_pipeline_batches_and_tokenizer_beside_the_run(tmp_path):
    workdir = str(tmp_path / "run")
    # RDKit parsing of the 4.6k SMILES is left out here (tested above) to keep it quick.
    config = _tiny(f"{MOLECULES}:tiny_v1", **{"data.validate_smiles": False})
    validate(config)
    config = data.prepare(config, workdir)
    tok_dir = os.path.join(workdir, "tokenizer")
    assert config.tokenizer.path == tok_dir and os.path.isfile(os.path.join(tok_dir, "vocab.json"))
    vocab = config.model.vocab_size
    assert vocab > NUM_SPECIAL + 20  # from the ChEMBL corpus, not a constant

    batch = next(iter(pretrain_dataset(config, num_threads=1, prefetch_buffer_size=1)))
    t = config.data.max_len
    assert batch["tokens"].shape == (4, t) and batch["tokens"].dtype == np.int32
    assert batch["mask"].shape == (4, 1, t) and batch["inputs"].shape == (4, 1, t)
    np.testing.assert_array_equal(batch["padding_mask"], batch["tokens"] == PAD_ID)
    padding = batch["padding_mask"]
    assert not batch["mask"][:, 0][padding].any()
    changed = batch["inputs"][:, 0] != batch["tokens"]
    assert not changed[padding].any()  # padding is never corrupted (specials may be: fairseq)
    np.testing.assert_array_equal(batch["mask"][:, 0], batch["inputs"][:, 0] == MASK_ID)
    assert (batch["tokens"][:, 0] == BOS_ID).all()

    # A second run in the same workdir reloads the tokenizer instead of training one.
    mtime = os.path.getmtime(os.path.join(tok_dir, "vocab.json"))
    again = data.prepare(_tiny(f"{MOLECULES}:tiny_v1", **{"data.validate_smiles": False}), workdir)
    assert again.model.vocab_size == vocab
    assert os.path.getmtime(os.path.join(tok_dir, "vocab.json")) == mtime
    with pytest.raises(ValueError, match="holds a 'smiles' tokenizer"):
        data.prepare(_tiny(f"{MOLECULES}:tiny_v1_protein"), workdir)
    with pytest.raises(ValueError, match="leave model.vocab_size unset"):
        data.prepare(_tiny(f"{MOLECULES}:tiny_v1", **{"model.vocab_size": 7}), workdir)


def test_crop_window_and_v2_exact_counts(tmp_path):
    config = _tiny(f"{MOLECULES}:tiny_v2_protein", **{"data.max_len": 32})
    config = data.prepare(config, str(tmp_path / "p"))
    src, transform = text.pretrain_parts(config)
    index = next(i for i in range(len(src)) if src[i]["tokens"].size > 40)
    row = src[index]["tokens"]
    a = transform({"tokens": row, "index": index}, epoch=0)
    b = transform({"tokens": row, "index": index}, epoch=1)
    for out in (a, b):  # a contiguous window of the row, redrawn per epoch
        start = int(np.flatnonzero(np.lib.stride_tricks.sliding_window_view(row, 32)
                                   .__eq__(out["tokens"]).all(1))[0])
        np.testing.assert_array_equal(row[start:start + 32], out["tokens"])
        assert not out["padding_mask"].any()
        # MAE random_masking: int(32 * 0.52) = 16 kept, 16 masked
        assert (out["mask"].sum(1) == 16).all() and "inputs" not in out
    assert not np.array_equal(a["tokens"], b["tokens"]) or not np.array_equal(a["mask"], b["mask"])
    # masking.mask_specials=False keeps <s> / </s> visible (fairseq masks them).
    config = _tiny(f"{MOLECULES}:tiny_v2_protein", **{"data.max_len": 32,
                                                      "masking.mask_specials": False})
    config = data.prepare(config, str(tmp_path / "q"))
    src, transform = text.pretrain_parts(config)
    first = src[0]["tokens"]
    row = np.r_[first[:19], first[-1]]  # <s>, 18 residues, </s>
    assert row[0] < NUM_SPECIAL and row[-1] < NUM_SPECIAL
    masks = np.concatenate([transform({"tokens": row, "index": 0}, epoch=e)["mask"]
                            for e in range(20)])
    assert not masks[:, :20][:, row < NUM_SPECIAL].any() and not masks[:, 20:].any()
    assert (masks.sum(1) == 20 - int(20 * 0.52)).all()


def test_sequence_longer_than_positions_is_a_config_error():
    config = load_config(f"{TEXT}:tiny_v2", {"data.max_len": 65})
    with pytest.raises(ValueError, match=r"config.data.max_len: 65 must be in \[3, "
                                         r"model.max_positions=64\]"):
        validate(config)
    with pytest.raises(ValueError, match="config.masking.kind"):
        validate(load_config(f"{TEXT}:tiny_v2", {"masking.kind": "bert"}))
