"""Corpora as shards: `python -m d2v_jax.prepare` (modalities/text/prepare.py)
writes fairseq-format shards in parallel; `data.source='fairseq'` reads them
(and fairseq-preprocess output) row by row. Trained from shards, a run sees
exactly the rows and batches of the same corpus read into memory; processes
read disjoint rows whose union is the 1-process batch; the iterator resumes
exactly; bad input names the file and line and leaves nothing behind."""

import json
import os

import numpy as np
import pytest

from d2v_jax.config import load_config
from d2v_jax.data.fairseq_bin import IndexedTokens
from d2v_jax.modalities.text import data as text_data
from d2v_jax.modalities.text import prepare as text_prepare
from d2v_jax.modalities.text.corpus import python_docs_corpus
from d2v_jax.modalities.text.gpt2 import Gpt2Tokenizer

from gpt2_helpers import write_gpt2_files
from helpers import TEXT, TINY_TEXT, pretrain_dataset, run_cli, write_text

CHUNK_MB = 4096 / (1 << 20)  # 4 kB of input per shard: many shards from a small file


def _corpus_file(path, num_docs=60) -> str:
    """RoBERTa's layout: a sentence per line, a blank line after each document."""
    paras = python_docs_corpus().texts[100:100 + num_docs]
    docs = ["\n".join(s.strip() for s in p.replace("\n", " ").split(". ") if s.strip())
            for p in paras]
    return write_text(path, "\n\n".join(docs) + "\n")


def _config(path, arg="tiny_v1", **over):
    return load_config(f"{TEXT}:{arg}", {**TINY_TEXT, "data.source": "text", "data.path": path,
                                         "data.doc_sep": "fairseq", "data.packing": "complete_doc",
                                         "data.too_long": "split", "data.batch_size": 4, **over})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    path = _corpus_file(str(root / "corpus.txt"))
    out = str(root / "shards")
    meta = text_prepare.prepare_shards(_config(path), out, workers=2, chunk_mb=CHUNK_MB,
                                       progress=False)
    return path, out, meta


def _pair(corpus, tmp_path, arg="tiny_v1", **over):
    """(in-memory config, shards config), each prepared in its own work dir."""
    path, out, _ = corpus
    memory = text_data.prepare(_config(path, arg, **over), str(tmp_path / "memory"))
    shard = text_data.prepare(_config(path, arg, **{**over, "data.source": "fairseq",
                                                    "data.path": out}), str(tmp_path / "shard"))
    return memory, shard


def test_shards_hold_the_runs_records(corpus, tmp_path):
    path, out, meta = corpus
    lines = open(path).read().split("\n")[:-1]
    train = meta["splits"]["train"]
    assert train["files"] > 3 and train["records"] == len(lines)  # a record per line, blank included
    assert train["documents"] == sum(1 for line in lines if line.strip())
    assert sorted(os.listdir(out))[:3] == ["d2v_shards.json", "tokenizer", "train.bin"]
    memory, shard = _pair(corpus, tmp_path)
    assert json.load(open(os.path.join(out, "d2v_shards.json")))["tokenizer"]["fingerprint"] == \
        text_data.tokenizer_for(shard).fingerprint()
    for packing in ("complete_doc", "stream", "doc"):
        memory.data.packing = shard.data.packing = packing
        a = text_data.make_source(memory, text_data.tokenizer_for(memory))
        b = text_data.make_source(shard, text_data.tokenizer_for(shard))
        assert len(a) == len(b) > 10
        for i in range(len(a)):
            np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])


def test_batches_processes_and_resume(corpus, tmp_path):
    memory, shard = _pair(corpus, tmp_path)
    kw = {"num_threads": 1, "prefetch_buffer_size": 1}
    ref = pretrain_dataset(memory, **kw).__iter__()
    one = iter(pretrain_dataset(shard, **kw))
    two = [iter(pretrain_dataset(shard, process_index=p, process_count=2, **kw)) for p in (0, 1)]
    for _ in range(3):
        want, got = next(ref), next(one)
        halves = [next(it) for it in two]
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])  # shards == in-memory, masks too
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), want[key])
    state = one.get_state()
    after = [next(one) for _ in range(2)]
    again = iter(pretrain_dataset(shard, **kw))
    again.set_state(state)
    for a in after:
        b = next(again)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_token_budget_from_shards_splits_over_processes(corpus, tmp_path):
    budget = {"data.max_tokens": 24 * 8, "data.buckets": (12, 24), "data.batch_size": 4}
    _, shard = _pair(corpus, tmp_path, **budget)
    kw = {"num_threads": 1, "prefetch_buffer_size": 1}
    one = iter(pretrain_dataset(shard, **kw))
    two = [iter(pretrain_dataset(shard, process_index=p, process_count=2, **kw)) for p in (0, 1)]
    shapes = set()
    for _ in range(6):
        want = next(one)
        halves = [next(it) for it in two]
        t = want["tokens"].shape[1]
        shapes.add(t)
        assert want["tokens"].shape[0] * t <= 24 * 8 and want["tokens"].shape[0] % 4 == 0
        for key in want:
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), want[key])
    assert shapes <= {12, 24}


def test_gpt2_shards_are_a_fairseq_data_directory(tmp_path):
    files = write_gpt2_files(str(tmp_path / "gpt2"))
    path = _corpus_file(str(tmp_path / "c.txt"), num_docs=12)
    gpt2 = {"tokenizer.kind": "gpt2", "tokenizer.encoder_json": files["encoder_json"],
            "tokenizer.vocab_bpe": files["vocab_bpe"], "tokenizer.dict": files["dict"]}
    out = str(tmp_path / "bin")
    text_prepare.prepare_shards(_config(path, **gpt2), out, workers=1, progress=False)
    assert open(os.path.join(out, "dict.txt")).read() == open(files["dict"]).read()
    tok = Gpt2Tokenizer.from_files(files["encoder_json"], files["vocab_bpe"], files["dict"])
    lines = [line.strip() for line in open(path).read().split("\n")[:-1]]
    records = IndexedTokens(os.path.join(out, "train"))
    for i in (0, 1, 5):  # fairseq-preprocess: each line's dictionary ids, then </s> (2)
        assert records[i].tolist() == tok.encode(lines[i]) + [2]
    # Read as fairseq-preprocess output: only dict.txt, no BPE files needed.
    os.remove(os.path.join(out, "d2v_shards.json"))
    config = text_data.prepare(load_config(f"{TEXT}:tiny_v1", {
        **TINY_TEXT, "tokenizer.kind": "gpt2", "data.source": "fairseq", "data.path": out,
        "data.packing": "doc", "data.too_long": "crop"}), str(tmp_path / "run"))
    assert config.model.vocab_size == tok.vocab_size
    src, _ = text_data.pretrain_parts(config)
    assert src[0]["tokens"].tolist() == [0] + tok.encode(lines[0]) + [2]


def test_bad_input_names_file_and_line_and_writes_nothing(corpus, tmp_path):
    path, out, _ = corpus
    text = open(path, "rb").read()
    lines = text.split(b"\n")
    at = len(lines) * 4 // 5  # in a later chunk, read by a worker
    lines[at] = b"caf\xe9 latin-1"
    bad = str(tmp_path / "bad.txt")
    open(bad, "wb").write(b"\n".join(lines))
    target = str(tmp_path / "never")
    with pytest.raises(ValueError, match=rf"bad\.txt:{at + 1}: not valid UTF-8"):
        text_prepare.prepare_shards(_config(bad, **{"tokenizer.path": os.path.join(out, "tokenizer")}),
                                    target, workers=2, chunk_mb=CHUNK_MB, progress=False)
    assert not os.path.exists(target) and not [f for f in os.listdir(tmp_path) if "never" in f]
    with pytest.raises(Exception, match="exists and is not an empty folder"):
        text_prepare.prepare_shards(_config(path), out, workers=1, progress=False)
    # Shards of another tokenizer than the run's saved one.
    other = text_data.prepare(_config(path, **{"tokenizer.vocab_size": 280}), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="the shards come from another tokenizer"):
        text_data.prepare(_config(path, **{"data.source": "fairseq", "data.path": out,
                                           "tokenizer.path": other.tokenizer.path}),
                          str(tmp_path / "o2"))
    with pytest.raises(FileNotFoundError, match="not a fairseq data directory"):
        text_data.prepare(_config(path, **{"data.source": "fairseq", "data.path": str(tmp_path)}),
                          str(tmp_path / "o3"))


@pytest.mark.slow
def test_cli_help_and_one_error_line(tmp_path):
    res = run_cli("prepare", "--help")
    assert res.returncode == 0
    for name in ("--out", "--workers", "--chunk_mb", "--tokenizer_for", "train.bin",
                 "d2v_shards.json", "dict.txt", "tokenizer/"):
        assert name in res.stdout
    bad = write_text(tmp_path / "bad.txt", b"fine\n\xff\n")
    res = run_cli("prepare", f"--config={TEXT}:tiny_v2", "--config.data.source=text",
                  f"--config.data.path={bad}", f"--out={tmp_path / 'o'}")
    assert res.returncode == 2 and not os.path.exists(tmp_path / "o")
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {bad}:2: not valid UTF-8 (invalid start byte at byte 0 of the line)"]
