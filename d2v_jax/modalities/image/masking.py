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
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from d2v_jax.masking import check_float, check_int, check_ratio, check_rng, get_field, uniform

__all__ = ["MASKERS", "block_mask", "image_masks", "inverse_block_mask", "num_masked_inverse"]

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
    rng = check_rng(rng)
    h, w = _check_grid(grid)
    num_masked = check_int("num_masked", num_masked, 0, h * w)
    min_num_patches = check_int("min_num_patches", min_num_patches, 1)
    if max_num_patches is not None:
        max_num_patches = check_int("max_num_patches", max_num_patches, 1)
    min_aspect = check_float("min_aspect", min_aspect)
    if min_aspect <= 0:
        raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
    max_aspect = 1.0 / min_aspect if max_aspect is None else check_float("max_aspect", max_aspect)
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
            area = uniform(rng, min_num_patches, budget)
            aspect = math.exp(uniform(rng, log_lo, log_hi))
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
    mask_ratio = check_ratio(mask_ratio)
    n = h * w
    return n - int(n * _keep_prob(mask_ratio))



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
    rng = check_rng(rng)
    h, w = _check_grid(grid)
    mask_ratio = check_ratio(mask_ratio)
    block_size = check_int("block_size", block_size, 1)
    prob_adjust = check_float("prob_adjust", prob_adjust)

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


def _inverse_block_masks(rng: np.random.Generator, grid: tuple[int, int], mask_ratio: float,
                         block_size: int, prob_adjust: float, count: int) -> np.ndarray:
    """`count` draws of `inverse_block_mask` (checked arguments), flattened
    [count, h * w]: the same calls on `rng` in the same order, so the same
    masks bit for bit, with the per-clone checks and array set-up hoisted out
    of the loop (16 clones per image are the pipeline's biggest cost after
    decode and resize: ~1.6 ms -> see docs/performance.md)."""
    h, w = grid
    n = h * w
    keep_prob = _keep_prob(mask_ratio)
    target = int(n * keep_prob)
    num_centres = max(0, int(n * ((keep_prob + prob_adjust) / block_size**2)))
    lo = block_size // 2
    offsets = np.arange(block_size) - lo
    # Clamping as table look-ups (np.clip's per-call overhead is most of a clone's time):
    # index v + lo of these is clip(v, 0, side - 1) for v in [-lo, side - 1 + block_size - lo).
    clamp_r = np.clip(np.arange(-lo, h + block_size), 0, h - 1) * w
    clamp_c = np.clip(np.arange(-lo, w + block_size), 0, w - 1)
    kept = np.zeros((count, n), dtype=bool)
    for i in range(count):
        row = kept[i]
        if num_centres:
            rows, cols = np.divmod(rng.integers(0, n, size=num_centres), w)
            r = clamp_r[rows[:, None] + (offsets + lo)]
            c = clamp_c[cols[:, None] + (offsets + lo)]
            row[(r[:, :, None] + c[:, None, :]).ravel()] = True
        num_kept = int(np.count_nonzero(row))
        if num_kept > target:
            row[rng.choice(np.flatnonzero(row), num_kept - target, replace=False)] = False
        elif num_kept < target:
            row[rng.choice(np.flatnonzero(~row), target - num_kept, replace=False)] = True
    return ~kept


MASKERS: dict[str, Callable[..., np.ndarray]] = {
    "block": block_mask,
    "inverse_block": inverse_block_mask,
}


# ------------------------------------------------------------------- config-driven




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
    rng = check_rng(rng)
    h, w = _check_grid(grid)
    kind = get_field(masking_cfg, "kind")
    if not isinstance(kind, str) or kind not in MASKERS:
        raise ValueError(f"unknown masking kind {kind!r}; expected one of {sorted(MASKERS)}")
    num_clones = check_int("num_clones", get_field(masking_cfg, "num_clones", 1), 1)

    if kind == "block":
        num_masked = get_field(masking_cfg, "num_masked", None)
        if num_masked is None:
            ratio = check_ratio(get_field(masking_cfg, "ratio"))
            num_masked = int(ratio * h * w)
        kwargs = dict(
            num_masked=num_masked,
            min_num_patches=get_field(masking_cfg, "min_num_patches", 16),
            max_num_patches=get_field(masking_cfg, "max_num_patches", None),
            min_aspect=get_field(masking_cfg, "min_aspect", 0.3),
            max_aspect=get_field(masking_cfg, "max_aspect", None),
        )
    else:
        kwargs = dict(
            mask_ratio=get_field(masking_cfg, "ratio"),
            block_size=get_field(masking_cfg, "block_size", 3),
            prob_adjust=get_field(masking_cfg, "prob_adjust", 0.07),
        )

    if kind == "inverse_block":
        return _inverse_block_masks(rng, (h, w), check_ratio(kwargs["mask_ratio"]),
                                    check_int("block_size", kwargs["block_size"], 1),
                                    check_float("prob_adjust", kwargs["prob_adjust"]), num_clones)
    masker = MASKERS[kind]
    out = np.empty((num_clones, h * w), dtype=bool)
    for i in range(num_clones):
        out[i] = masker(rng, (h, w), **kwargs).reshape(-1)
    return out


def grid_of(config: Any) -> tuple[int, int]:
    """The patch grid (h, w) of `config.model` (square images)."""
    m = config.model
    return (m.image_size // m.patch_size,) * 2


def num_keep(config: Any) -> int:
    """Patches the student encoder sees per row (SPEC 5, 6): for 2.0 the
    N - `num_masked_inverse` visible ones (inverse block masking masks exactly
    that many in every row); for 1.0 all N (masked ones carry the mask token).
    The one count the pipeline, the model and the FLOP counter share."""
    grid = grid_of(config)
    n = grid[0] * grid[1]
    if config.version == "v2":
        return n - num_masked_inverse(grid, config.masking.ratio)
    return n
