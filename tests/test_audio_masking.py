"""1-D maskers for speech (SPEC 5) against plain numpy references."""

import numpy as np
import pytest

from d2v_jax.modalities.audio import masking


def _span_reference(seed, num_frames, num_valid, prob, span, min_masks):
    """fairseq compute_mask_indices for one row, written as loops, same draws."""
    rng = np.random.default_rng(seed)
    out = np.zeros(num_frames, bool)
    if num_valid == 0:
        return out, 0
    num = max(min_masks, int(prob * num_valid / float(span) + rng.random()))
    if num == 0:
        return out, 0
    lo = span
    if num_valid - lo <= num:
        lo = num_valid - num - 1
    starts = rng.choice(num_valid - lo, num, replace=False)
    for s in starts:
        for o in range(span):
            if s + o < num_valid:
                out[s + o] = True
    return out, num


@pytest.mark.parametrize("num_frames,num_valid,prob,span,min_masks", [
    (49, 49, 0.65, 10, 2), (99, 60, 0.65, 10, 2), (500, 500, 0.65, 10, 2),
    (12, 12, 0.65, 10, 2), (30, 25, 0.3, 4, 0), (8, 3, 0.9, 5, 2), (49, 49, 0.05, 10, 1),
])
def test_span_mask_matches_reference(num_frames, num_valid, prob, span, min_masks):
    for seed in range(30):
        got = masking.span_mask(np.random.default_rng(seed), num_frames, num_valid, prob, span,
                                min_masks=min_masks)
        want, num = _span_reference(seed, num_frames, num_valid, prob, span, min_masks)
        np.testing.assert_array_equal(got, want)
        assert not got[num_valid:].any()  # padding is never masked
        # every masked run is a union of whole spans cut only at the valid end
        if num and num_valid > span + num:
            runs = np.diff(np.flatnonzero(np.diff(np.r_[0, got[:num_valid], 0])))[::2]
            assert runs.min() >= min(span, num_valid - np.flatnonzero(got).max())


def test_span_mask_fraction_is_wav2vec_like():
    # 0.65 / 10 on long sequences: ~49% masked (SPEC 5).
    rng = np.random.default_rng(0)
    frac = np.mean([masking.span_mask(rng, 1000, 1000, 0.65, 10).mean() for _ in range(200)])
    assert 0.46 < frac < 0.52, frac


def test_same_count_trims_rows_to_min():
    rng = np.random.default_rng(1)
    masks = np.stack([masking.span_mask(rng, 80, n, 0.65, 10) for n in (80, 70, 50, 80)])
    out = masking.same_count(np.random.default_rng(2), masks)
    counts = out.sum(1)
    assert (counts == masks.sum(1).min()).all()
    assert not (out & ~masks).any()  # only removes masked positions


@pytest.mark.parametrize("num_frames,num_valid", [(49, 49), (99, 60), (200, 137), (10, 3), (5, 0)])
def test_block_mask_1d_exact_count(num_frames, num_valid):
    for seed in range(30):
        rng = np.random.default_rng(seed)
        got = masking.block_mask_1d(rng, num_frames, num_valid, 0.5, block_len=5, prob_adjust=0.05)
        assert got.shape == (num_frames,) and got.dtype == bool
        assert got.sum() == int(0.5 * num_valid) == masking.num_masked_1d(num_valid, 0.5)
        assert not got[num_valid:].any()


def _fairseq_block_mask_1d(rng, length, mask_prob, mask_length, adjust):
    """fairseq data_utils.compute_block_mask_1d for one row (overlapping blocks,
    require_same_masks), written from its description: centres uniform in
    [0, L) (with replacement), offsets -len//2 .. len - len//2 - 1 clamped to
    [0, L - 1], then a random subset unmasked / masked to int(L * mask_prob)."""
    mask = np.zeros(length, bool)
    centres = rng.integers(0, length, int(length * ((mask_prob + adjust) / mask_length)))
    for c in centres:
        for i in range(mask_length):
            mask[min(max(c + i - mask_length // 2, 0), length - 1)] = True
    final = int(length * mask_prob)
    on, off = np.flatnonzero(mask), np.flatnonzero(~mask)
    if len(on) > final:
        mask[rng.permutation(on)[:len(on) - final]] = False
    elif len(on) < final:
        mask[rng.permutation(off)[:final - len(on)]] = True
    return mask


def test_block_mask_1d_frequencies_match_fairseq_per_position():
    n, t, draws = 50, 64, 4000
    got = np.stack([masking.block_mask_1d(np.random.default_rng(s), t, n, 0.5)
                    for s in range(draws)])
    ref_rng = np.random.default_rng(12345)
    ref = np.stack([_fairseq_block_mask_1d(ref_rng, n, 0.5, 5, 0.05) for _ in range(draws)])
    assert (got.sum(1) == 25).all() and not got[:, n:].any()
    freq, ref_freq = got[:, :n].mean(0), ref.mean(0)
    # Per position, within sampling noise (std <= 0.008 per frequency here).
    np.testing.assert_allclose(freq, ref_freq, atol=0.04)
    # Edge frames: clamped offsets mask them about as often as the middle (the
    # start-based draw of before gave 0.22 at the edges vs ~0.5 inside).
    assert freq[0] > 0.3 and freq[-1] > 0.3, (freq[0], freq[-1])
    # Blocks, not i.i.d. frames: masked runs average well above 1 frame.
    edges = np.diff(np.c_[np.zeros(draws), got[:, :n], np.zeros(draws)].astype(int), axis=1)
    assert (edges == -1).sum() * 3 < got.sum()


def test_sequence_masks_config():
    cfg = {"kind": "block_1d", "num_clones": 3, "ratio": 0.5, "span": 5, "prob_adjust": 0.05}
    m = masking.sequence_masks(np.random.default_rng(0), 60, 40, cfg)
    assert m.shape == (3, 60) and (m.sum(1) == 20).all()
    assert not (m[0] == m[1]).all()  # independent clones
    with pytest.raises(ValueError, match="unknown sequence masking kind 'bogus'"):
        masking.sequence_masks(np.random.default_rng(0), 60, 40, dict(cfg, kind="bogus"))
    with pytest.raises(ValueError, match="num_valid must be in"):
        masking.span_mask(np.random.default_rng(0), 10, 11, 0.65, 10)
