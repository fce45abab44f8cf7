"""Speech recognition pieces: the letter vocabulary, the CTC loss with padding
masks, greedy decoding, word / character error rates and the fine-tuning
time / channel masks (wav2vec 2.0, data2vec audio fine-tuning).

Pure functions; the fine-tune model, steps and loop use them for `task='ctc'`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The vocabulary lives with the data (the audio readers use it); re-exported here.
from d2v_jax.data.letters import (  # noqa: F401
    BOUNDARY,
    DEFAULT_TOKENS,
    FAIRSEQ_SPECIALS,
    LETTERS,
    Vocab,
    letter_units,
    normalize_words,
    read_fairseq_dict,
    vocab_for,
)

# --- the loss -------------------------------------------------------------------

def min_frames(labels: jax.Array, label_paddings: jax.Array) -> jax.Array:
    """Frames a CTC alignment of each label row needs: its length plus one
    blank between every pair of equal neighbours. [B]"""
    valid = label_paddings < 0.5
    repeats = (labels[:, 1:] == labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    return jnp.sum(valid, axis=1) + jnp.sum(repeats, axis=1)


def ctc_loss(logits: jax.Array, logit_paddings: jax.Array, labels: jax.Array,
             label_paddings: jax.Array, *, blank: int = 0, weights: jax.Array | None = None,
             reduction: str = "sentence", zero_infinity: bool = True) -> jax.Array:
    """Mean CTC negative log-likelihood (optax.ctc_loss) over a padded batch.

    logits [B, T, V]; logit_paddings [B, T] (1 = padded frame, from the conv
    frame arithmetic); labels [B, L] with label_paddings [B, L] (1 = padding).
    `reduction='sentence'` divides the sum by the (weighted) number of rows
    (fairseq `sentence_avg: true`, the wav2vec 2.0 / data2vec fine-tuning
    configs), 'token' by the number of label tokens. `zero_infinity` drops rows
    whose labels cannot fit their frames (torch / fairseq `zero_infinity`).
    `weights` [B] (0 = a filler row) scales each row.
    """
    if reduction not in ("sentence", "token"):
        raise ValueError(f"loss.ctc_reduction={reduction!r}; expected 'sentence' or 'token'")
    per_row = optax.ctc_loss(logits.astype(jnp.float32), logit_paddings.astype(jnp.float32),
                             labels, label_paddings.astype(jnp.float32), blank_id=blank)
    w = jnp.ones(per_row.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    if zero_infinity:
        frames = jnp.sum(logit_paddings < 0.5, axis=1)
        w = w * (min_frames(labels, label_paddings) <= frames)
    total = jnp.sum(jnp.where(w > 0, per_row, 0.0) * w)
    if reduction == "sentence":
        return total / jnp.maximum(jnp.sum(w), 1.0)
    tokens = jnp.sum((label_paddings < 0.5) * w[:, None])
    return total / jnp.maximum(tokens, 1.0)


# --- decoding and error rates ---------------------------------------------------

def greedy_ids(logits: jax.Array, logit_paddings: jax.Array | None, blank: int = 0) -> jax.Array:
    """Best unit per frame [B, T], the blank at padded frames (on device)."""
    ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if logit_paddings is None:
        return ids
    return jnp.where(logit_paddings > 0.5, blank, ids)


def collapse(ids: Sequence[int], blank: int = 0) -> list[int]:
    """CTC's many-to-one map: merge runs of equal units, then drop blanks."""
    out, prev = [], None
    for i in np.asarray(ids).tolist():
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions, cost 1 each)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    """Corpus error rate: total edit distance / total reference length."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    edits = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    return edits / max(sum(len(r) for r in refs), 1)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate over whitespace-separated words."""
    return error_rate([r.split() for r in refs], [h.split() for h in hyps])


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate over the normalized strings, a space counting as one
    character (fairseq's unit error rate counts the `|` units the same way)."""
    return error_rate([" ".join(r.split()) for r in refs], [" ".join(h.split()) for h in hyps])


# --- fine-tuning masks (wav2vec 2.0 apply_mask) -----------------------------------

def span_mask(key: jax.Array, shape: tuple[int, int], prob: float, length: int,
              padding: jax.Array | None = None) -> jax.Array:
    """bool [B, N]: spans of `length` positions starting at each position with
    probability prob / length (so about prob * N / length spans per row, as
    fairseq's `compute_mask_indices` with mask_prob; overlaps merge, spans are
    cut at the row's end). Starts never fall on `padding` [B, N]. Static shapes."""
    b, n = shape
    length = int(min(max(length, 1), n))
    starts = jax.random.bernoulli(key, min(prob / length, 1.0), (b, n))
    if padding is not None:
        starts = starts & ~padding
    # Position t is masked iff a span started in (t - length, t].
    c = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    before = jnp.pad(c, ((0, 0), (length, 0)))[:, :n]
    return (c - before) > 0
