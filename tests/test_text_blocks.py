"""Rows as fairseq's TokenBlockDataset cuts them (modalities/text/blocks.py),
and fairseq's token-budget batching (modalities/text/batching.py).

The reference below is written from `token_block_utils_fast.pyx`'s
description of `_get_slice_indices_fast` (none / complete / complete_doc /
eos, document_sep_len 1), not from our code."""

import numpy as np
import pytest

from d2v_jax.config import load_config, validate
from d2v_jax.modalities.text import batching, blocks

from helpers import TEXT


def reference_slices(sizes, mode, block):
    """(start, end) token offsets of fairseq's blocks."""
    if mode == "none":
        total = int(sum(sizes))
        return [(i, min(i + block, total)) for i in range(0, total, block)]
    if mode == "eos":
        ends = np.cumsum(sizes)
        return [(int(e - s), int(e)) for s, e in zip(sizes, ends)]
    out, tok, curr, i = [], 0, 0, 0
    while i < len(sizes):
        is_sep = mode == "complete_doc" and sizes[i] == 1
        if (curr + sizes[i] <= block or curr == 0) and not is_sep:
            curr += sizes[i]
            i += 1
            continue
        if curr > (1 if mode == "complete_doc" else 0):
            out.append((tok, tok + curr))
        tok += curr
        curr = 0
        if is_sep:
            tok += 1
            i += 1
    if curr > (1 if mode == "complete_doc" else 0):
        out.append((tok, tok + curr))
    return out


MODES = {"stream": "none", "complete": "complete", "complete_doc": "complete_doc", "doc": "eos"}


@pytest.mark.parametrize("packing", list(MODES))
def test_rows_are_fairseqs_blocks(packing, monkeypatch):
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 14, 400)
    sizes[rng.random(400) < 0.15] = 1  # empty lines: document boundaries
    sizes[:3] = 1  # the corpus starts with empty lines
    monkeypatch.setattr(blocks, "WINDOW", 37)  # cross many windows of the greedy packer
    records = [np.arange(s) + 10 * k for k, s in enumerate(sizes)]
    tokens = blocks.MemoryTokens(records)
    max_len = 16  # blocks of 15 tokens, <s> first
    rows = blocks.rows_of(tokens, packing, max_len, "crop")  # crop: every block kept as is
    want = reference_slices(sizes, MODES[packing], max_len - 1)
    got = [(s, s + n) for s, n in (rows[j] for j in range(len(rows)))]
    assert got == want
    src = blocks.RowSource(tokens, rows, bos_id=0)
    stream = np.concatenate(records)
    for j in (0, len(src) // 2, len(src) - 1):
        s, e = want[j]
        np.testing.assert_array_equal(src[j]["tokens"], np.r_[0, stream[s:e]])


def test_too_long_blocks():
    sizes = np.array([3, 20, 4, 1, 2])  # record 1 is longer than a block of 7
    table = blocks.greedy_blocks(sizes, 7, doc_breaks=True)
    assert table[:, :2].tolist() == [[0, 3], [3, 20], [23, 4], [28, 2]]
    with pytest.raises(ValueError, match=r"document 1 \(b\.txt:2\) has 19 tokens, 21 with <s> "
                                         r"and </s>, more than data.max_len=8"):
        blocks.apply_too_long(table, 7, "error", "x", ["a.txt:1", "b.txt:2", "c", "d", "e"])
    assert blocks.apply_too_long(table, 7, "skip", "x").tolist() == [[0, 3], [23, 4], [28, 2]]
    assert blocks.apply_too_long(table, 7, "split", "x").tolist() == [
        [0, 3], [3, 7], [10, 7], [17, 6], [23, 4], [28, 2]]
    assert blocks.apply_too_long(table, 7, "crop", "x")[1].tolist() == [3, 20]


def _budget_config(**over):
    return load_config(f"{TEXT}:base_v1", {"data.max_tokens": 4096, "data.batch_size": 4,
                                          "data.buckets": (8, 16, 32), "data.max_len": 32,
                                          "model.max_positions": 32, **over})


def test_token_budget_batches():
    config = _budget_config()
    validate(config)
    lengths = np.random.default_rng(0).integers(3, 33, 3000)
    plan = batching.BudgetPlan(config, lengths)
    assert plan.rows == (512, 256, 128)  # (4096 // S) // 4 * 4
    seen = []
    for k in range(plan.num_batches):
        epoch, idx, size = plan.batch(k)
        assert epoch == 0 and len(idx) == plan.rows[plan.buckets.index(size)]
        assert lengths[idx].max() <= size and len(idx) * size <= 4096
        smaller = [b for b in plan.buckets if b < size]
        assert not smaller or lengths[idx].min() > smaller[-1]  # the smallest bucket that holds it
        seen += idx.tolist()
    assert len(seen) == len(set(seen))  # each row at most once per epoch
    assert plan.batch(plan.num_batches)[0] == 1  # then the next epoch, reshuffled
    assert not np.array_equal(plan.batch(0)[1], plan.batch(plan.num_batches)[1])
    with pytest.raises(ValueError, match="config.data.buckets"):
        validate(_budget_config(**{"data.buckets": (16, 8, 32)}))
    with pytest.raises(ValueError, match=r"config.data.max_tokens: 64 holds fewer than"):
        validate(_budget_config(**{"data.max_tokens": 64}))
    with pytest.raises(ValueError, match="config.data.max_tokens.*2.0's student"):
        validate(load_config(f"{TEXT}:base_v2", {"data.max_tokens": 4096}))
