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
    (12, 12, 0.65, 10, 2), (30, 25, 0.3, 4, 0), (8, 3, 0.9, 5, 2),
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


def _block_reference(seed, n, t, ratio, block_len, adjust):
    rng = np.random.default_rng(seed)
    out = np.zeros(t, bool)
    target = int(ratio * n)
    num_starts = int(n * (ratio + adjust) / block_len)
    if num_starts and n:
        for s in rng.integers(0, max(n - block_len, 0) + 1, size=num_starts):
            out[s:min(s + block_len, n)] = True
    count = out[:n].sum()
    if count > target:
        out[rng.choice(np.flatnonzero(out[:n]), count - target, replace=False)] = False
    elif count < target:
        out[rng.choice(np.flatnonzero(~out[:n]), target - count, replace=False)] = True
    return out


def test_block_mask_1d_matches_reference_and_is_blocky():
    runs = []
    for seed in range(40):
        got = masking.block_mask_1d(np.random.default_rng(seed), 120, 100, 0.5)
        np.testing.assert_array_equal(got, _block_reference(seed, 100, 120, 0.5, 5, 0.05))
        edges = np.diff(np.r_[0, got.astype(int), 0])
        runs.extend(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    # blocks of 5 that merge: the mean masked run is well above 1 (not i.i.d.)
    assert np.mean(runs) > 4.0, np.mean(runs)


def test_sequence_masks_config():
    cfg = {"kind": "block_1d", "num_clones": 3, "ratio": 0.5, "span": 5, "prob_adjust": 0.05}
    m = masking.sequence_masks(np.random.default_rng(0), 60, 40, cfg)
    assert m.shape == (3, 60) and (m.sum(1) == 20).all()
    assert not (m[0] == m[1]).all()  # independent clones
    with pytest.raises(ValueError, match="unknown sequence masking kind 'bogus'"):
        masking.sequence_masks(np.random.default_rng(0), 60, 40, dict(cfg, kind="bogus"))
    with pytest.raises(ValueError, match="num_valid must be in"):
        masking.span_mask(np.random.default_rng(0), 10, 11, 0.65, 10)
