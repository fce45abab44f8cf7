"""Token masking for text, SMILES and protein sequences (SPEC section 5).

Pure numpy, no jax and no I/O, like `d2v_jax.masking` for images: the input
pipeline draws masks per example from a seeded Generator, so shapes are static
under jit. Every masker takes `rng` first and a bool `maskable` [T] (False at
padding and special tokens, which are never masked); True in a result means
*masked*.

- `bert_positions`: data2vec 1.0 / BERT: `int(p * n + U[0,1))` of the n maskable
  positions, without replacement (fairseq `MaskTokensDataset`), p = 0.15.
- `span_positions`: the released fairseq 1.0 text config: `int(p * n / L + U)`
  span starts, each grown to L positions (p = 0.35, L = 4); spans may overlap and
  stop at non-maskable positions, so the realised rate is a little below p.
- `random_positions`: data2vec 2.0: MAE's `random_masking` (fairseq
  `modalities/base.py`): keep `int(n_real * (1 - p))` positions, mask the other
  `num_masked_random(n_real, p)` (p = 0.48), n_real counting every non-padding
  position. The 2.0 student encodes only the visible tokens, and this count is
  what makes that a static shape (see `num_keep_random`).

Special tokens (`<s>`, `</s>`): fairseq masks them like any token, in 1.0
(`MaskTokensDataset` draws over all `len(item)` positions) and 2.0
(`random_masking` over all L); `masking.mask_specials = True` (the default of
both recipes) does the same, False keeps them always visible.
- `corrupt`: BERT's 80/10/10 replacement of the masked positions; the 1.0 loss
  counts only positions that received the mask token.
- `text_masks`: the M per-example masks (and 1.0 student inputs) from a config.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "KINDS",
    "bert_positions",
    "corrupt",
    "num_keep_random",
    "num_masked_random",
    "random_positions",
    "span_positions",
    "text_masks",
]

KINDS = ("bert", "span", "random")


def _check(maskable: np.ndarray, prob: float) -> np.ndarray:
    maskable = np.asarray(maskable)
    if maskable.dtype != bool or maskable.ndim != 1:
        raise ValueError(f"maskable must be a bool [T] array, got {maskable.dtype} {maskable.shape}")
    if not 0.0 < prob < 1.0:
        raise ValueError(f"mask probability must be in (0, 1), got {prob}")
    return maskable


def bert_positions(rng: np.random.Generator, maskable: np.ndarray, prob: float) -> np.ndarray:
    """BERT / data2vec 1.0: `int(prob * n + U[0,1))` maskable positions, uniformly
    without replacement (the count is `prob * n` in expectation)."""
    maskable = _check(maskable, prob)
    candidates = np.flatnonzero(maskable)
    num = min(int(prob * candidates.size + rng.random()), candidates.size)
    out = np.zeros(maskable.shape, bool)
    out[rng.choice(candidates, num, replace=False)] = True
    return out


def span_positions(rng: np.random.Generator, maskable: np.ndarray, prob: float,
                   span: int) -> np.ndarray:
    """fairseq's `mask_multiple_length` masking: `int(prob * n / span + U)` starts
    among the maskable positions, each covering `span` positions (clipped to the
    sequence and to maskable positions)."""
    maskable = _check(maskable, prob)
    if span < 1:
        raise ValueError(f"span length must be >= 1, got {span}")
    candidates = np.flatnonzero(maskable)
    num = min(int(prob * candidates.size / span + rng.random()), candidates.size)
    starts = rng.choice(candidates, num, replace=False)
    idx = (starts[:, None] + np.arange(span)[None, :]).reshape(-1)
    idx = idx[idx < maskable.size]
    out = np.zeros(maskable.shape, bool)
    out[idx] = True
    return out & maskable


def num_masked_random(num_real: int, prob: float) -> int:
    """The 2.0 masked count for a sequence of `num_real` non-padding tokens:
    all but the `int(num_real * (1 - prob))` that MAE's `random_masking` keeps
    (SPEC 5; 512 tokens at 0.48: 266 kept, 246 masked). At least one token of a
    non-empty row stays visible (MAE would keep none of a 1-token row at 0.15:
    an encoder row without any key)."""
    if num_real < 1:
        return 0
    return num_real - max(1, int(num_real * (1 - prob)))


def num_keep_random(length: int, prob: float) -> int:
    """Static number of positions the 2.0 student encodes for sequences of `length`.

    A row with n <= length real tokens keeps int(n * (1 - prob)) visible ones,
    which is non-decreasing in n, so it never exceeds this; shorter rows fill the
    rest with padding positions (masked out as attention keys).
    """
    return max(1, int(length * (1 - prob)))


def random_positions(rng: np.random.Generator, maskable: np.ndarray, prob: float,
                     num_real: int) -> np.ndarray:
    """data2vec 2.0: exactly `num_masked_random(num_real, prob)` maskable positions.

    `num_real` counts the non-padding positions (special tokens included), so every
    packed block of the same length gets the same count. Raises when fewer
    positions are maskable than that count (specials kept out of a short row).
    """
    maskable = _check(maskable, prob)
    candidates = np.flatnonzero(maskable)
    num = num_masked_random(num_real, prob)
    if num > candidates.size:
        raise ValueError(f"random masking: {num} of {num_real} tokens must be masked but only "
                         f"{candidates.size} are not special tokens")
    out = np.zeros(maskable.shape, bool)
    out[rng.choice(candidates, num, replace=False)] = True
    return out


def corrupt(rng: np.random.Generator, tokens: np.ndarray, masked: np.ndarray, *, mask_id: int,
            random_low: int, vocab_size: int, leave_unmasked_prob: float,
            random_token_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """BERT's replacement of the masked positions (SPEC 5).

    Each masked position independently keeps its token (prob `leave_unmasked_prob`),
    gets a uniform random token from [random_low, vocab_size) (prob
    `random_token_prob`, never a special token), or else the mask token.
    Returns (student input tokens, bool positions that got the mask token).
    """
    if leave_unmasked_prob < 0 or random_token_prob < 0 or leave_unmasked_prob + random_token_prob > 1:
        raise ValueError(f"leave_unmasked_prob={leave_unmasked_prob} and random_token_prob="
                         f"{random_token_prob} must be >= 0 and sum to <= 1")
    if not 0 <= random_low < vocab_size:
        raise ValueError(f"random tokens come from [{random_low}, {vocab_size}): empty range")
    u = rng.random(tokens.shape)
    keep = masked & (u < leave_unmasked_prob)
    rand = masked & (u >= leave_unmasked_prob) & (u < leave_unmasked_prob + random_token_prob)
    replaced = masked & ~keep & ~rand
    inputs = np.where(replaced, mask_id, tokens)
    inputs = np.where(rand, rng.integers(random_low, vocab_size, tokens.shape), inputs)
    return inputs.astype(tokens.dtype), replaced


def _get(cfg: Any, name: str) -> Any:
    if name not in cfg:
        raise KeyError(f"masking config has no field {name!r}")
    return cfg[name]  # a dict or an ml_collections.ConfigDict


def text_masks(rng: np.random.Generator, tokens: np.ndarray, maskable: np.ndarray,
               num_real: int, masking_cfg: Any, *, mask_id: int, random_low: int,
               vocab_size: int) -> dict[str, np.ndarray]:
    """The M masks of one example from `config.masking`.

    Returns {"mask": bool [M, T], the positions the loss counts; and for 1.0
    (kind bert/span) "inputs": int32 [M, T], the corrupted student input}. With
    `loss_on == "mask_token"` (SPEC 5) the loss counts only positions that received
    the mask token; with "all" every chosen position.
    """
    kind = _get(masking_cfg, "kind")
    prob = float(_get(masking_cfg, "ratio"))
    clones = int(_get(masking_cfg, "num_clones"))
    masks, inputs = [], []
    for _ in range(clones):
        if kind == "random":
            masks.append(random_positions(rng, maskable, prob, num_real))
            continue
        if kind == "bert":
            chosen = bert_positions(rng, maskable, prob)
        elif kind == "span":
            chosen = span_positions(rng, maskable, prob, int(_get(masking_cfg, "span")))
        else:
            raise ValueError(f"masking.kind={kind!r}; expected one of {KINDS}")
        inp, replaced = corrupt(
            rng, tokens, chosen, mask_id=mask_id, random_low=random_low, vocab_size=vocab_size,
            leave_unmasked_prob=float(_get(masking_cfg, "leave_unmasked_prob")),
            random_token_prob=float(_get(masking_cfg, "random_token_prob")))
        loss_on = _get(masking_cfg, "loss_on")
        if loss_on not in ("mask_token", "all"):
            raise ValueError(f"masking.loss_on={loss_on!r}; expected 'mask_token' or 'all'")
        masks.append(replaced if loss_on == "mask_token" else chosen)
        inputs.append(inp)
    out = {"mask": np.stack(masks)}
    if inputs:
        out["inputs"] = np.stack(inputs).astype(np.int32)
    return out


def num_keep(config: Any) -> int:
    """Positions the student encoder sees per row (SPEC 5, 6): for 2.0
    `num_keep_random(data.max_len, ratio)` (rows with fewer real tokens fill
    the rest with padding positions); for 1.0 all `data.max_len`. The one count
    the pipeline, the model and the FLOP counter share."""
    length = int(config.data.max_len)
    if config.version == "v2":
        return num_keep_random(length, config.masking.ratio)
    return length
