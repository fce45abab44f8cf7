"""CTC loss, greedy decoding, WER / CER, the fine-tuning span mask and the conv
front-end's frame arithmetic on padded input (d2v_jax/finetune/ctc.py)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax.errors import DataError
from d2v_jax.finetune import ctc
from d2v_jax.modalities.audio.frames import frame_count
from d2v_jax.modalities.audio.model import FeatureExtractor

# One compile per reduction (optax.ctc_loss is a scan; eager calls would trace it each time).
_loss = jax.jit(ctc.ctc_loss, static_argnames=("reduction", "blank", "zero_infinity"))


def brute_force_ctc_nll(probs: np.ndarray, label: list[int], blank: int = 0) -> float:
    """-log sum over every frame-level path (V^T of them) whose collapse (merge
    repeats, drop blanks) is `label` of the product of its per-frame probabilities
    (the CTC definition, Graves et al. 2006)."""
    t, v = probs.shape
    total = 0.0
    for path in itertools.product(range(v), repeat=t):
        merged = [p for i, p in enumerate(path) if i == 0 or p != path[i - 1]]
        if [p for p in merged if p != blank] == list(label):
            total += float(np.prod([probs[i, p] for i, p in enumerate(path)]))
    return -np.log(total)


def test_ctc_loss_matches_enumerated_alignments_with_padding():
    rng = np.random.default_rng(0)
    b, t, v, l = 3, 5, 3, 3
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    # Row 0: 5 frames, label [1, 2]; row 1: 4 frames + 1 padded, label [1, 1]
    # (needs a blank between); row 2: 3 frames + 2 padded, label [2, 1, 2].
    lengths, labels = [5, 4, 3], [[1, 2], [1, 1], [2, 1, 2]]
    logit_pad = np.array([[i >= n for i in range(t)] for n in lengths], np.float32)
    lab = np.zeros((b, l), np.int32)
    lab_pad = np.ones((b, l), np.float32)
    for i, y in enumerate(labels):
        lab[i, :len(y)] = y
        lab_pad[i, :len(y)] = 0
    probs = np.exp(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    want = [brute_force_ctc_nll(probs[i, :n].astype(np.float64), y)
            for i, (n, y) in enumerate(zip(lengths, labels))]
    for i in range(b):
        w = np.eye(b, dtype=np.float32)[i]
        got = _loss(logits, logit_pad, lab, lab_pad, weights=w)
        np.testing.assert_allclose(float(got), want[i], rtol=1e-4)
    # Sentence average = mean of the rows; token average = sum / label tokens.
    np.testing.assert_allclose(float(_loss(logits, logit_pad, lab, lab_pad, weights=np.ones(b, np.float32))),
                               np.mean(want), rtol=1e-4)
    np.testing.assert_allclose(
        float(_loss(logits, logit_pad, lab, lab_pad, weights=np.ones(b, np.float32),
                    reduction="token")),
        np.sum(want) / 7, rtol=1e-4)


def test_ctc_zero_infinity_drops_rows_that_cannot_align():
    logits = jnp.zeros((2, 3, 3))
    pad = jnp.array([[0, 0, 0], [0, 0, 1]], jnp.float32)  # 3 and 2 real frames
    labels = jnp.array([[1, 1], [1, 2]], jnp.int32)  # [1, 1] needs 3, [1, 2] needs 2 frames
    lab_pad = jnp.zeros((2, 2))
    np.testing.assert_array_equal(jax.jit(ctc.min_frames)(labels, lab_pad), [3, 2])
    tight = jnp.array([[0, 0, 1], [0, 1, 1]], jnp.float32)  # 2 and 1 frames: neither fits
    assert float(_loss(logits, tight, labels, lab_pad, weights=jnp.ones(2))) == 0.0
    # Uniform logits over 3 units and 3 frames: [1, 1] has exactly one path (1 0 1).
    only = _loss(logits, pad, labels, lab_pad, weights=jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(float(only), 3 * np.log(3), rtol=1e-5)
    with pytest.raises(ValueError, match="ctc_reduction"):
        ctc.ctc_loss(logits, pad, labels, lab_pad, reduction="mean")


def test_greedy_decoding_collapses_repeats_then_drops_blanks():
    vocab = ctc.Vocab()
    h, i, bar = (vocab.tokens.index(c) for c in "HI|")
    frames = [h, h, 0, i, i, bar, 0, 0, h, 0, h, i, bar]
    logits = jax.nn.one_hot(jnp.array([frames + [i, i]]), len(vocab)) * 5
    pad = jnp.array([[0] * len(frames) + [1, 1]], jnp.float32)
    ids = np.asarray(ctc.greedy_ids(logits, pad))[0]
    assert ids[-2:].tolist() == [0, 0]  # padded frames decode to the blank
    assert ctc.collapse(ids) == [h, i, bar, h, h, i, bar]
    assert vocab.decode(ctc.collapse(ids)) == "HI HHI"


def test_vocab_letters_boundaries_and_fairseq_dict(tmp_path):
    vocab = ctc.Vocab()
    assert len(vocab) == 32 and vocab.tokens[0] == "<pad>" and vocab.tokens[4] == "|"
    assert ctc.letter_units("Don't stop, now-ish.") == list("DON'T|STOP|NOW|ISH|")
    ids = vocab.encode("hello world")
    assert vocab.decode(ctc.collapse(ids)) == "HELO WORLD"  # (collapse merges the LL)
    assert vocab.decode(ids.tolist()) == "HELLO WORLD"
    with pytest.raises(DataError, match=r"clip7.*\['7'\]"):
        vocab.encode("route 7", origin="clip7.txt")
    d = tmp_path / "dict.ltr.txt"
    d.write_text("| 10\nE 5\nA 3\n")
    fs = ctc.read_fairseq_dict(str(d))
    assert fs.tokens == ("<s>", "<pad>", "</s>", "<unk>", "|", "E", "A") and fs.blank == 0
    assert ctc.vocab_for(str(tmp_path)).tokens == fs.tokens
    assert ctc.vocab_for(None) == vocab


@functools.lru_cache(maxsize=None)
def _reference_distance(a: tuple, b: tuple) -> int:
    """Levenshtein distance by its recursive definition."""
    if not a or not b:
        return len(a) + len(b)
    return min(_reference_distance(a[1:], b) + 1, _reference_distance(a, b[1:]) + 1,
               _reference_distance(a[1:], b[1:]) + (a[0] != b[0]))


def test_wer_cer_against_a_reference_edit_distance():
    assert ctc.edit_distance("kitten", "sitting") == 3
    assert ctc.edit_distance([], "abc") == 3 and ctc.edit_distance("abc", "") == 3
    rng = np.random.default_rng(1)
    words = ["A", "AN", "THE", "CAT", "SAT"]
    refs, hyps = [], []
    for _ in range(20):
        refs.append(" ".join(rng.choice(words, rng.integers(1, 6))))
        hyps.append(" ".join(rng.choice(words, rng.integers(0, 6))))
    for r, h in zip(refs, hyps):
        assert ctc.edit_distance(r, h) == _reference_distance(tuple(r), tuple(h))
        assert ctc.edit_distance(r.split(), h.split()) == _reference_distance(
            tuple(r.split()), tuple(h.split()))
    want_wer = (sum(_reference_distance(tuple(r.split()), tuple(h.split())) for r, h in zip(refs, hyps))
                / sum(len(r.split()) for r in refs))
    want_cer = (sum(_reference_distance(tuple(r), tuple(h)) for r, h in zip(refs, hyps))
                / sum(len(r) for r in refs))
    assert ctc.wer(refs, hyps) == pytest.approx(want_wer)
    assert ctc.cer(refs, hyps) == pytest.approx(want_cer)
    assert ctc.wer(["THE CAT SAT"], ["THE BAT"]) == pytest.approx(2 / 3)
    assert ctc.cer(["THE CAT"], ["THE  CAT "]) == 0.0


def test_span_mask_spans_rate_and_padding():
    pad = jnp.arange(400)[None, :] >= jnp.array([400, 250, 100])[:, None]
    m = np.asarray(ctc.span_mask(jax.random.PRNGKey(0), (3, 400), 0.65, 10, pad))
    # Expected masked fraction of a long row: 1 - (1 - p / L)^L.
    assert abs(m[0].mean() - (1 - (1 - 0.065) ** 10)) < 0.08
    for row, n in zip(m, [400, 250, 100]):
        edges = np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))
        starts, ends = edges[::2], edges[1::2]
        inside = ends < len(row)  # a run cut by the row's end may be shorter
        assert ((ends - starts)[inside] >= 10).all()  # merged spans are never shorter than one
        # A span starts only at a real frame, so masking reaches at most L - 1 past it.
        assert not row[n + 9:].any()
    assert not np.asarray(ctc.span_mask(jax.random.PRNGKey(0), (2, 50), 0.0, 10)).any()


def test_frame_lengths_of_padded_input_match_the_conv_front_end():
    kernels, strides = (10, 3, 2), (5, 2, 2)
    fe = FeatureExtractor((4,) * 3, kernels, strides, dim=4)
    lengths = [400, 173]
    total = 400
    wav = np.random.default_rng(0).normal(size=(len(lengths), total)).astype(np.float32)
    padded = wav * (np.arange(total)[None] < np.array(lengths)[:, None])
    params = jax.jit(fe.init)(jax.random.PRNGKey(0), wav[:1])
    apply = jax.jit(fe.apply)  # one compile per input length
    full = np.asarray(apply(params, padded))
    unpadded = np.asarray(apply(params, wav))
    for row, n in enumerate(lengths):
        frames = frame_count(n, kernels, strides)
        alone = np.asarray(apply(params, wav[row:row + 1, :n]))[0]
        assert alone.shape[0] == frames  # the arithmetic = the real front-end's output length
        # The first `frames` frames of the padded row read only real samples ...
        np.testing.assert_allclose(full[row, :frames], alone, atol=1e-5)
        # ... and the next one reads padding.
        if frames < full.shape[1]:
            assert not np.allclose(full[row, frames], unpadded[row, frames], atol=1e-4)
    assert frame_count(total, kernels, strides) == full.shape[1]
    np.testing.assert_array_equal(frame_count(jnp.array(lengths), kernels, strides),
                                  [frame_count(n, kernels, strides) for n in lengths])
