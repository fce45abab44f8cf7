"""Tests for d2v_jax.masking (SPEC section 5): independent numpy checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from d2v_jax.modalities.image import masking
from d2v_jax.modalities.image.masking import (
    MASKERS,
    block_mask,
    image_masks,
    inverse_block_mask,
    num_masked_inverse,
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _clamped_square(r: int, c: int, grid: tuple[int, int], bs: int = 3):
    """Row and column indices of the bs x bs square at centre (r, c), clamped to grid."""
    h, w = grid
    off = np.arange(bs) - bs // 2
    return np.clip(r + off, 0, h - 1), np.clip(c + off, 0, w - 1)


def _covered_by_full_squares(kept: np.ndarray, bs: int = 3) -> np.ndarray:
    """Union of every clamped square (any centre) that lies entirely inside ``kept``."""
    grid = kept.shape
    cover = np.zeros_like(kept)
    for r in range(grid[0]):
        for c in range(grid[1]):
            rr, cc = _clamped_square(r, c, grid, bs)
            if kept[np.ix_(rr, cc)].all():
                cover[np.ix_(rr, cc)] = True
    return cover


# ------------------------------------------------------------------ inverse blocks


@pytest.mark.parametrize(
    "grid, ratio, expected",
    [
        ((14, 14), 0.8, 157),  # 196 - int(196 * 0.19999999999999996) = 196 - 39
        ((8, 8), 0.8, 52),  # 64 - int(12.8)
        ((7, 9), 0.8, 51),  # 63 - int(12.6), non-square
        ((14, 14), 0.5, 98),
        ((5, 3), 0.0, 0),
        ((5, 3), 1.0, 15),
    ],
)
def test_inverse_exact_count(grid, ratio, expected):
    assert num_masked_inverse(grid, ratio) == expected
    for seed in range(100):
        m = inverse_block_mask(_rng(seed), grid, ratio)
        assert m.shape == grid and m.dtype == np.bool_
        assert int(m.sum()) == expected


@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (7, 9), (2, 5), (1, 1)])
def test_pre_adjustment_kept_set_is_union_of_clamped_squares(grid):
    # Before the count adjustment, the kept set must equal the union of the clamped 3x3
    # squares that fit entirely inside it (i.e. it is a union of such squares).
    for seed in range(50):
        kept = masking._kept_blocks(_rng(seed), grid, 1 - 0.8, 3, 0.07)
        assert kept.shape == grid and kept.dtype == np.bool_
        np.testing.assert_array_equal(_covered_by_full_squares(kept), kept)


def test_pre_adjustment_matches_loop_reference():
    # Same centre draws, grown with an explicit loop over clamped offsets (fairseq's rule).
    grid, bs = (7, 9), 3
    n = grid[0] * grid[1]
    for seed in range(50):
        kept = masking._kept_blocks(_rng(seed), grid, 0.5, bs, 0.07)
        num_centres = int(n * ((0.5 + 0.07) / bs**2))
        centres = _rng(seed).integers(0, n, size=num_centres)
        ref = np.zeros(grid, dtype=bool)
        for ctr in centres:
            r0, c0 = divmod(int(ctr), grid[1])
            for dr in range(bs):
                for dc in range(bs):
                    r = min(max(r0 + dr - bs // 2, 0), grid[0] - 1)
                    c = min(max(c0 + dc - bs // 2, 0), grid[1] - 1)
                    ref[r, c] = True
        np.testing.assert_array_equal(kept, ref)


@pytest.mark.parametrize("grid, min_mean", [((14, 14), 0.7), ((8, 8), 0.5), ((7, 9), 0.5)])
def test_inverse_kept_patches_mostly_form_blocks(grid, min_mean):
    # Fraction of kept patches lying in a fully kept clamped 3x3 square, averaged over 200
    # seeds. Measured: 0.82 (14x14), 0.63 (8x8, 7x9); a uniformly random kept set of the
    # same size gives ~0.001, so this separates block structure from noise.
    fracs = []
    for seed in range(200):
        kept = ~inverse_block_mask(_rng(seed), grid, 0.8)
        fracs.append((_covered_by_full_squares(kept) & kept).sum() / kept.sum())
    assert np.mean(fracs) > min_mean


def test_inverse_clones_and_determinism():
    a = inverse_block_mask(_rng(0), (14, 14), 0.8)
    np.testing.assert_array_equal(a, inverse_block_mask(_rng(0), (14, 14), 0.8))
    assert not np.array_equal(a, inverse_block_mask(_rng(1), (14, 14), 0.8))


# ---------------------------------------------------------------------- BEiT blocks


def test_block_shape_dtype_and_bound():
    for seed in range(50):
        m = block_mask(_rng(seed), (14, 14), 120)
        assert m.shape == (14, 14) and m.dtype == np.bool_
        assert int(m.sum()) <= 120
    m = block_mask(_rng(0), (6, 10), 20, min_num_patches=4)
    assert m.shape == (6, 10) and int(m.sum()) <= 20


def test_block_mean_count():
    # Measured over 20k draws: mean 119.53, std 0.97, min 106; the mean of 200 draws
    # ranged over [119.36, 119.71] across 100 disjoint batches (s.e.m. ~0.07), so
    # [119.0, 120.0] is a tight but safe band for BEiT's "120 of 196" (~61%).
    counts = np.array([block_mask(_rng(s), (14, 14), 120).sum() for s in range(200)])
    assert 119.0 <= counts.mean() <= 120.0
    assert counts.max() <= 120
    # Most draws hit the target exactly.
    assert np.mean(counts == 120) > 0.5


def test_block_zero_and_determinism():
    assert not block_mask(_rng(0), (14, 14), 0).any()
    a = block_mask(_rng(3), (14, 14), 120)
    np.testing.assert_array_equal(a, block_mask(_rng(3), (14, 14), 120))
    assert not np.array_equal(a, block_mask(_rng(4), (14, 14), 120))


def test_block_single_rectangle_aspect():
    # num_masked == min_num_patches == A forces the first block's target area to A; if
    # nothing else is added the mask is exactly one rectangle (mask == its bounding box).
    # Its h/w must then lie in [0.3, 1/0.3] widened by rounding of h and w by 0.5.
    area, grid = 100, (32, 32)
    lo = (math.sqrt(area * 0.3) - 0.5) / (math.sqrt(area / 0.3) + 0.5)
    aspects = []
    for seed in range(300):
        m = block_mask(_rng(seed), grid, area, min_num_patches=area)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        bh, bw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        if m.sum() == bh * bw:
            assert bh < grid[0] and bw < grid[1]
            aspects.append(bh / bw)
    # Measured: 276/300 single rectangles, aspects in [0.28, 3.6], median log-aspect 0.
    assert len(aspects) > 200
    aspects = np.array(aspects)
    assert aspects.min() >= lo and aspects.max() <= 1 / lo
    # Log-uniform aspect: both tall and wide blocks occur, roughly symmetric.
    assert (aspects < 0.6).any() and (aspects > 1 / 0.6).any()
    assert abs(np.median(np.log(aspects))) < 0.3


def test_block_custom_aspect_range():
    # Fixed aspect 1 -> only squares (up to rounding, h == w exactly here).
    for seed in range(50):
        m = block_mask(
            _rng(seed), (20, 20), 49, min_num_patches=49, min_aspect=1.0, max_aspect=1.0
        )
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        bh, bw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        if m.sum() == bh * bw:
            assert bh == bw


# ---------------------------------------------------------------------- image_masks


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_image_masks_inverse_shapes_and_clones():
    cfg = _Cfg(kind="inverse_block", num_clones=16, ratio=0.8, block_size=3, prob_adjust=0.07)
    m = image_masks(_rng(0), (14, 14), cfg)
    assert m.shape == (16, 196) and m.dtype == np.bool_
    assert (m.sum(1) == 157).all()
    assert len({row.tobytes() for row in m}) == 16  # independent clones differ
    np.testing.assert_array_equal(m, image_masks(_rng(0), (14, 14), cfg))
    # Row-major flattening of the per-clone 2-D mask.
    first = inverse_block_mask(_rng(0), (14, 14), 0.8)
    np.testing.assert_array_equal(m[0], first.reshape(-1))


def test_image_masks_block_and_dict():
    cfg = dict(
        kind="block", num_clones=4, num_masked=None, ratio=0.6, min_num_patches=16, min_aspect=0.3
    )
    m = image_masks(_rng(1), (14, 14), cfg)
    assert m.shape == (4, 196) and m.dtype == np.bool_
    assert (m.sum(1) <= int(0.6 * 196)).all()
    assert len({row.tobytes() for row in m}) == 4
    cfg["num_masked"] = 120
    assert (image_masks(_rng(1), (14, 14), cfg).sum(1) <= 120).all()


def test_maskers_registry():
    assert MASKERS == {"block": block_mask, "inverse_block": inverse_block_mask}


# ---------------------------------------------------------------------- bad args


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: block_mask(_rng(0), (14, 14), 197), "num_masked"),
        (lambda: block_mask(_rng(0), (14, 14), -1), "num_masked"),
        (lambda: block_mask(_rng(0), (14, 14), 10, min_num_patches=0), "min_num_patches"),
        (lambda: block_mask(_rng(0), (14, 14), 10, max_num_patches=0), "max_num_patches"),
        (lambda: block_mask(_rng(0), (14, 14), 10, min_aspect=0.0), "min_aspect"),
        (lambda: block_mask(_rng(0), (14, 14), 10, min_aspect=2.0, max_aspect=1.0), "max_aspect"),
        (lambda: block_mask(_rng(0), (0, 14), 0), "grid"),
        (lambda: block_mask(_rng(0), 14, 0), "grid"),
        (lambda: block_mask(0, (14, 14), 0), "rng"),
        (lambda: inverse_block_mask(_rng(0), (14, 14), 1.5), "mask_ratio"),
        (lambda: inverse_block_mask(_rng(0), (14, 14), 0.8, block_size=0), "block_size"),
        (
            lambda: inverse_block_mask(_rng(0), (14, 14), 0.8, prob_adjust=float("nan")),
            "prob_adjust",
        ),
        (lambda: num_masked_inverse((14, 14), -0.1), "mask_ratio"),
        (lambda: image_masks(_rng(0), (14, 14), _Cfg(kind="random", num_clones=2)), "random"),
        (
            lambda: image_masks(_rng(0), (14, 14), _Cfg(kind="block", num_clones=0, num_masked=10)),
            "num_clones",
        ),
        (lambda: image_masks(_rng(0), (14, 14), _Cfg(kind="inverse_block", num_clones=1)), "ratio"),
    ],
)
def test_bad_args(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_unknown_kind_lists_registry():
    with pytest.raises(ValueError, match="inverse_block"):
        image_masks(_rng(0), (14, 14), {"kind": "nope"})
