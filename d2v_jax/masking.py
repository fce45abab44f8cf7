"""Image masking for data2vec pretraining (SPEC section 5).

Pure numpy, no jax and no I/O: masks are drawn in the input pipeline, seeded per
example, so that every shape seen by ``jit`` is static (SPEC section 5).

Every masker takes an explicit ``rng: np.random.Generator`` first and returns a bool
array in which True means *masked*.

- ``block_mask``: BEiT block masking, used by data2vec 1.0 for images.
- ``inverse_block_mask``: data2vec 2.0 inverse block masking (fairseq
  ``compute_block_mask_2d`` with ``inverse_mask=True, require_same_masks=True``,
  no mask dropout, overlapping blocks), generalised to non-square grids.
- ``image_masks``: the M per-example masks (data2vec 2.0 multi-mask, SPEC section 6)
  built from a masking config.
- ``span_mask``: wav2vec 2.0 span masking of one sequence (data2vec 1.0 audio), with
  ``same_count`` to trim the rows of a batch to one count.
- ``block_mask_1d``: 1-D block masking with an exact count (data2vec 2.0 audio).
- ``sequence_masks``: the M masks of one sequence from a masking config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

__all__ = [
    "MASKERS",
    "block_mask",
    "image_masks",
    "inverse_block_mask",
    "num_masked_inverse",
    "SEQUENCE_MASKERS",
    "block_mask_1d",
    "same_count",
    "sequence_masks",
    "span_mask",
]

# BEiT tries this many rectangles per block before giving up on the round.
_MAX_ATTEMPTS = 10


# --------------------------------------------------------------------------- checks


def _check_grid(grid: Any) -> tuple[int, int]:
    """Returns ``grid`` as ``(h, w)`` positive Python ints or raises ValueError."""
    try:
        h, w = grid
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (h, w) of positive ints, got {grid!r}") from None
    for name, v in (("h", h), ("w", w)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(
                f"grid must be a pair (h, w) of positive ints, got {grid!r} ({name}={v!r})"
            )
    return int(h), int(w)


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return int(value)


def _check_float(name: str, value: Any) -> float:
    real = (int, float, np.integer, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _uniform(rng: np.random.Generator, a: float, b: float) -> float:
    # Python's random.uniform(a, b) semantics (as BEiT relies on): a + (b - a) * U[0, 1),
    # well defined even when a > b (e.g. remaining budget below min_num_patches).
    return a + (b - a) * float(rng.random())


# ----------------------------------------------------------------- BEiT block masking


def block_mask(
    rng: np.random.Generator,
    grid: tuple[int, int],
    num_masked: int,
    *,
    min_num_patches: int = 16,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> np.ndarray:
    """BEiT block masking, data2vec 1.0 images (SPEC section 5).

    Rectangles are added until ``num_masked`` patches are masked or a round of up to
    10 attempts adds nothing. Each attempt draws a target area ~ U[min_num_patches,
    remaining] (remaining = patches still to mask, capped by ``max_num_patches``) and a
    log-uniform aspect ratio in [min_aspect, max_aspect]; a rectangle that fits
    strictly inside the grid is placed at a uniform top-left corner and accepted only if
    it masks between 1 and ``remaining`` new patches. As in BEiT the final count is
    at most ``num_masked``, not exactly it.

    Args:
        rng: numpy Generator, the only source of randomness.
        grid: (h, w) patch grid.
        num_masked: target number of masked patches, in [0, h * w].
        min_num_patches: smallest target block area (>= 1).
        max_num_patches: largest target block area (>= 1); None means ``num_masked``.
        min_aspect: smallest h/w aspect ratio (> 0).
        max_aspect: largest aspect ratio; None means ``1 / min_aspect``.

    Returns:
        bool array [h, w], True = masked.
    """
    rng = _check_rng(rng)
    h, w = _check_grid(grid)
    num_masked = _check_int("num_masked", num_masked, 0, h * w)
    min_num_patches = _check_int("min_num_patches", min_num_patches, 1)
    if max_num_patches is not None:
        max_num_patches = _check_int("max_num_patches", max_num_patches, 1)
    min_aspect = _check_float("min_aspect", min_aspect)
    if min_aspect <= 0:
        raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
    max_aspect = 1.0 / min_aspect if max_aspect is None else _check_float("max_aspect", max_aspect)
    if max_aspect < min_aspect:
        raise ValueError(f"max_aspect must be >= min_aspect ({min_aspect}), got {max_aspect}")
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)

    mask = np.zeros((h, w), dtype=bool)
    count = 0
    while count < num_masked:
        budget = num_masked - count
        if max_num_patches is not None:
            budget = min(budget, max_num_patches)
        added = 0
        for _ in range(_MAX_ATTEMPTS):
            area = _uniform(rng, min_num_patches, budget)
            aspect = math.exp(_uniform(rng, log_lo, log_hi))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            # Strict inequality as in BEiT: a block never spans a whole side.
            if not (bh < h and bw < w):
                continue
            top = int(rng.integers(0, h - bh + 1))
            left = int(rng.integers(0, w - bw + 1))
            window = mask[top : top + bh, left : left + bw]
            new = bh * bw - int(window.sum())
            # Overlap is allowed, but the block must add something and not overshoot.
            if 0 < new <= budget:
                window[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


# ------------------------------------------------------- data2vec 2.0 inverse blocks


def _keep_prob(mask_ratio: float) -> float:
    # Same float expression as fairseq (mask_prob = 1 - mask_prob), so that counts agree
    # bit for bit: 1 - 0.8 = 0.19999999999999996 and int(196 * that) = 39.
    return 1.0 - mask_ratio


def num_masked_inverse(grid: tuple[int, int], mask_ratio: float) -> int:
    """Exact number of masked patches produced by ``inverse_block_mask`` (SPEC section 5).

    ``N - int(N * (1 - mask_ratio))`` with N = h * w, e.g. 157 for a 14x14 grid at 0.8.
    Used to build static shapes (visible-token counts) elsewhere.
    """
    h, w = _check_grid(grid)
    mask_ratio = _check_ratio(mask_ratio)
    n = h * w
    return n - int(n * _keep_prob(mask_ratio))


def _check_ratio(mask_ratio: Any) -> float:
    mask_ratio = _check_float("mask_ratio", mask_ratio)
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    return mask_ratio


def _kept_blocks(
    rng: np.random.Generator,
    grid: tuple[int, int],
    keep_prob: float,
    block_size: int,
    prob_adjust: float,
) -> np.ndarray:
    """Pre-adjustment kept set of inverse block masking: a union of clamped squares.

    Draws ``int(N * ((keep_prob + prob_adjust) / block_size**2))`` centres uniformly
    with replacement and grows each into a block_size x block_size square with offsets
    ``-(block_size // 2) .. block_size - 1 - block_size // 2``, clamped to the grid
    edges (fairseq clamps the indices, so an edge block is cut, not shifted).

    Returns bool [h, w], True = kept.
    """
    h, w = grid
    n = h * w
    # Same evaluation order as fairseq so the centre count matches exactly.
    num_centres = max(0, int(n * ((keep_prob + prob_adjust) / block_size**2)))
    kept = np.zeros((h, w), dtype=bool)
    if num_centres == 0:
        return kept
    centres = rng.integers(0, n, size=num_centres)
    rows, cols = np.divmod(centres, w)
    offsets = np.arange(block_size) - block_size // 2
    r = np.clip(rows[:, None] + offsets[None, :], 0, h - 1)  # [C, bs]
    c = np.clip(cols[:, None] + offsets[None, :], 0, w - 1)  # [C, bs]
    kept[r[:, :, None], c[:, None, :]] = True
    return kept


def inverse_block_mask(
    rng: np.random.Generator,
    grid: tuple[int, int],
    mask_ratio: float,
    *,
    block_size: int = 3,
    prob_adjust: float = 0.07,
) -> np.ndarray:
    """data2vec 2.0 inverse block masking for one image (SPEC section 5).

    Grows random centres into block_size x block_size squares of *kept* patches
    (``_kept_blocks``), then adjusts to exactly ``int(N * (1 - mask_ratio))`` kept
    patches, dropping a uniform random subset of kept patches if there are too many or
    keeping a uniform random subset of the others if too few, and inverts. The masked
    count is therefore exactly ``num_masked_inverse(grid, mask_ratio)`` for every draw,
    which is what makes the student's visible-token shape static.

    Args:
        rng: numpy Generator, the only source of randomness.
        grid: (h, w) patch grid; need not be square.
        mask_ratio: fraction of patches to mask, in [0, 1].
        block_size: side of the kept squares (>= 1).
        prob_adjust: added to the keep probability when choosing the number of centres,
            to compensate for overlapping squares.

    Returns:
        bool array [h, w], True = masked.
    """
    rng = _check_rng(rng)
    h, w = _check_grid(grid)
    mask_ratio = _check_ratio(mask_ratio)
    block_size = _check_int("block_size", block_size, 1)
    prob_adjust = _check_float("prob_adjust", prob_adjust)

    n = h * w
    keep_prob = _keep_prob(mask_ratio)
    target = int(n * keep_prob)
    kept = _kept_blocks(rng, (h, w), keep_prob, block_size, prob_adjust).reshape(-1)
    num_kept = int(kept.sum())
    if num_kept > target:
        drop = rng.choice(np.flatnonzero(kept), num_kept - target, replace=False)
        kept[drop] = False
    elif num_kept < target:
        add = rng.choice(np.flatnonzero(~kept), target - num_kept, replace=False)
        kept[add] = True
    return ~kept.reshape(h, w)


MASKERS: dict[str, Callable[..., np.ndarray]] = {
    "block": block_mask,
    "inverse_block": inverse_block_mask,
}


# ------------------------------------------------------------------- config-driven


_MISSING = object()


def _get(cfg: Any, name: str, default: Any = _MISSING) -> Any:
    """Reads ``name`` from a ConfigDict-like object or a plain mapping."""
    if isinstance(cfg, Mapping):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default)
    if value is _MISSING:
        raise ValueError(f"masking config is missing required field {name!r}")
    return value


def image_masks(rng: np.random.Generator, grid: tuple[int, int], masking_cfg: Any) -> np.ndarray:
    """The M = ``num_clones`` masks of one image, flattened row-major (SPEC sections 5, 6).

    ``masking_cfg`` (ConfigDict or dict) fields: ``kind`` ("block" or "inverse_block"),
    ``num_clones`` (default 1), ``ratio``; for "block" also ``num_masked`` (None means
    ``int(ratio * N)``), ``min_num_patches``, ``min_aspect`` and optionally
    ``max_num_patches``, ``max_aspect``; for "inverse_block" also ``block_size`` and
    ``prob_adjust``. Every clone is an independent draw from ``rng``.

    Returns:
        bool array [M, h * w], True = masked.
    """
    rng = _check_rng(rng)
    h, w = _check_grid(grid)
    kind = _get(masking_cfg, "kind")
    if not isinstance(kind, str) or kind not in MASKERS:
        raise ValueError(f"unknown masking kind {kind!r}; expected one of {sorted(MASKERS)}")
    num_clones = _check_int("num_clones", _get(masking_cfg, "num_clones", 1), 1)

    if kind == "block":
        num_masked = _get(masking_cfg, "num_masked", None)
        if num_masked is None:
            ratio = _check_ratio(_get(masking_cfg, "ratio"))
            num_masked = int(ratio * h * w)
        kwargs = dict(
            num_masked=num_masked,
            min_num_patches=_get(masking_cfg, "min_num_patches", 16),
            max_num_patches=_get(masking_cfg, "max_num_patches", None),
            min_aspect=_get(masking_cfg, "min_aspect", 0.3),
            max_aspect=_get(masking_cfg, "max_aspect", None),
        )
    else:
        kwargs = dict(
            mask_ratio=_get(masking_cfg, "ratio"),
            block_size=_get(masking_cfg, "block_size", 3),
            prob_adjust=_get(masking_cfg, "prob_adjust", 0.07),
        )

    masker = MASKERS[kind]
    out = np.empty((num_clones, h * w), dtype=bool)
    for i in range(num_clones):
        out[i] = masker(rng, (h, w), **kwargs).reshape(-1)
    return out


# ------------------------------------------------------------- 1-D (audio) maskers


def _check_lengths(num_frames: Any, num_valid: Any) -> tuple[int, int]:
    num_frames = _check_int("num_frames", num_frames, 1)
    num_valid = _check_int("num_valid", num_valid, 0, num_frames)
    return num_frames, num_valid


def span_mask(
    rng: np.random.Generator,
    num_frames: int,
    num_valid: int,
    mask_prob: float,
    span: int,
    *,
    min_masks: int = 0,
) -> np.ndarray:
    """wav2vec 2.0 span masking of one sequence, data2vec 1.0 audio (SPEC section 5).

    fairseq ``compute_mask_indices(mask_type="static", no_overlap=False)`` for one
    row: with n = ``num_valid`` real frames, ``max(min_masks, int(mask_prob * n / span
    + U[0, 1)))`` distinct start frames are drawn without replacement from
    ``[0, n - span)`` and each masks ``span`` frames; spans may overlap, so about
    ``1 - (1 - mask_prob / span) ** span`` (49% at 0.65 / 10) of the frames end up
    masked. Frames ``>= num_valid`` (padding) are never masked.

    Returns:
        bool [num_frames], True = masked.
    """
    rng = _check_rng(rng)
    num_frames, n = _check_lengths(num_frames, num_valid)
    span = _check_int("span", span, 1)
    mask_prob = _check_ratio(mask_prob)
    min_masks = _check_int("min_masks", min_masks, 0)
    mask = np.zeros(num_frames, dtype=bool)
    if n == 0:
        return mask
    num = max(min_masks, int(mask_prob * n / float(span) + rng.random()))
    if num == 0:
        return mask
    # fairseq shrinks the start range when the spans would not fit: n - lo > num.
    lo = span if n - span > num else n - num - 1
    starts = rng.choice(n - lo, num, replace=False)
    idx = (starts[:, None] + np.arange(span)[None, :]).reshape(-1)
    mask[idx[idx < n]] = True
    return mask


def same_count(rng: np.random.Generator, masks: np.ndarray) -> np.ndarray:
    """Trims every row of ``masks`` [R, T] to the smallest row count (SPEC section 5).

    fairseq ``require_same_masks=True``: a row with more masked positions keeps a
    uniform random subset (without replacement) of them. Returns a new array.
    """
    rng = _check_rng(rng)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2:
        raise ValueError(f"same_count: masks must be [rows, T], got shape {masks.shape}")
    counts = masks.sum(axis=1)
    target = int(counts.min()) if len(counts) else 0
    out = masks.copy()
    for r in np.flatnonzero(counts > target):
        keep = rng.choice(np.flatnonzero(masks[r]), target, replace=False)
        out[r] = False
        out[r, keep] = True
    return out


def num_masked_1d(num_frames: int, mask_ratio: float) -> int:
    """``int(mask_ratio * num_frames)``: the exact count of ``block_mask_1d``."""
    num_frames = _check_int("num_frames", num_frames, 0)
    return int(_check_ratio(mask_ratio) * num_frames)


def block_mask_1d(
    rng: np.random.Generator,
    num_frames: int,
    num_valid: int,
    mask_ratio: float,
    *,
    block_len: int = 5,
    prob_adjust: float = 0.05,
) -> np.ndarray:
    """1-D block masking with an exact count, data2vec 2.0 audio (SPEC section 5).

    With n = ``num_valid`` real frames: ``int(n * (mask_ratio + prob_adjust) /
    block_len)`` block starts are drawn uniformly (with replacement) from
    ``[0, n - block_len]``, each masks ``block_len`` frames (blocks may overlap, and
    ``prob_adjust`` makes up for the overlap as fairseq's ``mask_prob_adjust``), then
    a uniform random subset of frames is unmasked, or of unmasked frames masked, so
    that exactly ``num_masked_1d(n, mask_ratio)`` real frames are masked. Padding
    frames (``>= num_valid``) are never masked.

    Returns:
        bool [num_frames], True = masked.
    """
    rng = _check_rng(rng)
    num_frames, n = _check_lengths(num_frames, num_valid)
    block_len = _check_int("block_len", block_len, 1)
    mask_ratio = _check_ratio(mask_ratio)
    prob_adjust = _check_float("prob_adjust", prob_adjust)
    target = num_masked_1d(n, mask_ratio)
    mask = np.zeros(num_frames, dtype=bool)
    valid = mask[:n]  # a view: writes go to `mask`
    num_starts = max(0, int(n * (mask_ratio + prob_adjust) / block_len))
    if num_starts and n:
        starts = rng.integers(0, max(n - block_len, 0) + 1, size=num_starts)
        idx = (starts[:, None] + np.arange(block_len)[None, :]).reshape(-1)
        valid[idx[idx < n]] = True
    count = int(valid.sum())
    if count > target:
        valid[rng.choice(np.flatnonzero(valid), count - target, replace=False)] = False
    elif count < target:
        valid[rng.choice(np.flatnonzero(~valid), target - count, replace=False)] = True
    return mask


SEQUENCE_MASKERS = ("span", "block_1d")


def sequence_masks(rng: np.random.Generator, num_frames: int, num_valid: int,
                   masking_cfg: Any) -> np.ndarray:
    """The M = ``num_clones`` masks of one sequence (SPEC sections 5, 6).

    ``masking_cfg`` fields: ``kind`` ("span" or "block_1d"), ``num_clones``,
    ``ratio`` (span: fairseq ``mask_prob``; block_1d: the exact masked fraction),
    ``span`` (span length / block length), and ``min_masks`` (span) or
    ``prob_adjust`` (block_1d). Clones are independent draws from ``rng``.

    Returns:
        bool [M, num_frames], True = masked; padding frames are never masked.
    """
    rng = _check_rng(rng)
    kind = _get(masking_cfg, "kind")
    if kind not in SEQUENCE_MASKERS:
        raise ValueError(f"unknown sequence masking kind {kind!r}; expected one of "
                         f"{list(SEQUENCE_MASKERS)}")
    num_clones = _check_int("num_clones", _get(masking_cfg, "num_clones", 1), 1)
    ratio, span = _get(masking_cfg, "ratio"), _get(masking_cfg, "span")
    out = np.empty((num_clones, int(num_frames)), dtype=bool)
    for i in range(num_clones):
        if kind == "span":
            out[i] = span_mask(rng, num_frames, num_valid, ratio, span,
                               min_masks=_get(masking_cfg, "min_masks", 0))
        else:
            out[i] = block_mask_1d(rng, num_frames, num_valid, ratio, block_len=span,
                                   prob_adjust=_get(masking_cfg, "prob_adjust", 0.05))
    return out
