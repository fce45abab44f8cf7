"""1-D (audio) masking for data2vec pretraining (SPEC section 5).

Pure numpy, seeded per example in the input pipeline; True means *masked*.

- ``span_mask``: wav2vec 2.0 span masking of one sequence (data2vec 1.0 audio), with
  ``same_count`` to trim the rows of a batch to one count.
- ``block_mask_1d``: 1-D block masking with an exact count (data2vec 2.0 audio).
- ``sequence_masks``: the M masks of one sequence from a masking config.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from d2v_jax.masking import check_float, check_int, check_ratio, check_rng, get_field
from d2v_jax.modalities.audio.frames import config_frame_count

__all__ = ["SEQUENCE_MASKERS", "block_mask_1d", "num_masked_1d", "same_count", "sequence_masks",
           "span_mask"]



def _check_lengths(num_frames: Any, num_valid: Any) -> tuple[int, int]:
    num_frames = check_int("num_frames", num_frames, 1)
    num_valid = check_int("num_valid", num_valid, 0, num_frames)
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
    rng = check_rng(rng)
    num_frames, n = _check_lengths(num_frames, num_valid)
    span = check_int("span", span, 1)
    mask_prob = check_ratio(mask_prob)
    min_masks = check_int("min_masks", min_masks, 0)
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
    rng = check_rng(rng)
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
    num_frames = check_int("num_frames", num_frames, 0)
    return int(check_ratio(mask_ratio) * num_frames)


def block_mask_1d(
    rng: np.random.Generator,
    num_frames: int,
    num_valid: int,
    mask_ratio: float,
    *,
    block_len: int = 5,
    prob_adjust: float = 0.05,
) -> np.ndarray:
    """1-D block masking with an exact count, data2vec 2.0 audio (SPEC 5, 7).

    fairseq ``compute_block_mask_1d`` (``fairseq/data/data_utils.py``; overlapping
    blocks, ``require_same_masks``) on the n = ``num_valid`` real frames:
    ``int(n * ((mask_ratio + prob_adjust) / block_len))`` block *centres* are drawn
    uniformly with replacement from ``[0, n)`` (a repeated centre is one block);
    each masks the frames centre + k for k in ``[-block_len // 2, block_len -
    block_len // 2)``, clamped into ``[0, n - 1]``, so the first and last frames
    are masked about as often as inner ones. Then a uniform random subset of the
    masked frames is unmasked, or of the unmasked ones masked, so that exactly
    ``num_masked_1d(n, mask_ratio)`` real frames are masked. Padding frames
    (``>= num_valid``) are never masked.

    Returns:
        bool [num_frames], True = masked.
    """
    rng = check_rng(rng)
    num_frames, n = _check_lengths(num_frames, num_valid)
    block_len = check_int("block_len", block_len, 1)
    mask_ratio = check_ratio(mask_ratio)
    prob_adjust = check_float("prob_adjust", prob_adjust)
    target = num_masked_1d(n, mask_ratio)
    mask = np.zeros(num_frames, dtype=bool)
    valid = mask[:n]  # a view: writes go to `mask`
    num_centres = max(0, int(n * ((mask_ratio + prob_adjust) / block_len)))
    if num_centres and n:
        centres = rng.integers(0, n, size=num_centres)
        offsets = np.arange(block_len) - block_len // 2
        valid[np.clip(centres[:, None] + offsets[None, :], 0, n - 1).reshape(-1)] = True
    count = int(valid.sum())
    if count > target:
        valid[rng.choice(np.flatnonzero(valid), count - target, replace=False)] = False
    elif count < target:
        valid[rng.choice(np.flatnonzero(~valid), target - count, replace=False)] = True
    return mask


def _block_masks_1d(rng: np.random.Generator, num_frames: int, n: int, mask_ratio: float,
                    block_len: int, prob_adjust: float, count: int) -> np.ndarray:
    """`count` draws of `block_mask_1d` (checked arguments) [count, num_frames]:
    the same calls on `rng` in the same order, so the same masks, with the
    per-clone checks and set-up hoisted and the clamp a table look-up (the
    clones' masks are most of the audio pipeline's per-clip CPU time)."""
    target = num_masked_1d(n, mask_ratio)
    num_centres = max(0, int(n * ((mask_ratio + prob_adjust) / block_len)))
    lo = block_len // 2
    # clamp[v + lo] = clip(v, 0, n - 1) for v = centre + offset in [-lo, n - 1 + block_len - lo).
    clamp = np.clip(np.arange(-lo, n + block_len), 0, max(n - 1, 0))
    steps = np.arange(block_len)  # offset + lo
    out = np.zeros((count, num_frames), dtype=bool)
    for i in range(count):
        valid = out[i, :n]  # a view: padding frames stay False
        if num_centres and n:
            valid[clamp[rng.integers(0, n, size=num_centres)[:, None] + steps].reshape(-1)] = True
        masked = int(np.count_nonzero(valid))
        if masked > target:
            valid[rng.choice(np.flatnonzero(valid), masked - target, replace=False)] = False
        elif masked < target:
            valid[rng.choice(np.flatnonzero(~valid), target - masked, replace=False)] = True
    return out


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
    rng = check_rng(rng)
    kind = get_field(masking_cfg, "kind")
    if kind not in SEQUENCE_MASKERS:
        raise ValueError(f"unknown sequence masking kind {kind!r}; expected one of "
                         f"{list(SEQUENCE_MASKERS)}")
    num_clones = check_int("num_clones", get_field(masking_cfg, "num_clones", 1), 1)
    ratio, span = get_field(masking_cfg, "ratio"), get_field(masking_cfg, "span")
    if kind == "block_1d":
        frames, n = _check_lengths(num_frames, num_valid)
        return _block_masks_1d(rng, frames, n, check_ratio(ratio), check_int("block_len", span, 1),
                               check_float("prob_adjust", get_field(masking_cfg, "prob_adjust", 0.05)),
                               num_clones)
    out = np.empty((num_clones, int(num_frames)), dtype=bool)
    for i in range(num_clones):
        if kind == "span":
            out[i] = span_mask(rng, num_frames, num_valid, ratio, span,
                               min_masks=get_field(masking_cfg, "min_masks", 0))
        else:
            out[i] = block_mask_1d(rng, num_frames, num_valid, ratio, block_len=span,
                                   prob_adjust=get_field(masking_cfg, "prob_adjust", 0.05))
    return out


def num_keep_frames(num_frames: int, mask_ratio: float) -> int:
    """Frames the 2.0 student encodes per row of `num_frames` (a bucket's
    length): all but the `num_masked_1d` that every row removes."""
    return num_frames - num_masked_1d(num_frames, mask_ratio)


def num_keep(config: Any, num_frames: int | None = None) -> int:
    """Frames the student encoder sees per row (SPEC 5, 6), for a batch of
    `num_frames` (default: the largest bucket's): `num_keep_frames` for 2.0,
    all of them for 1.0. The one count the model, `dummy_batch` and the FLOP
    counter share."""
    t = config_frame_count(config, int(config.data.max_sample_size)) if num_frames is None \
        else int(num_frames)
    if config.version == "v2":
        return num_keep_frames(t, config.masking.ratio)
    return t
