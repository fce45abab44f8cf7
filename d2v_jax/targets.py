"""Teacher targets for data2vec (SPEC section 2).

The teacher's per-block tensors for the top K blocks are each normalized
(``layer_norm``), averaged, and normalized once more (``final_norm``). Everything
here is a pure function of arrays with static shapes, so it jits as one fused
computation; the K per-layer normalizations run vectorized over a stacked
[K, B, T, D] array.

Padding: when a ``padding_mask`` ([B, T] bool, True = padded) is given, padded
positions are excluded from the instance/batch statistics and every output is 0
there. fairseq includes padded frames in its instance-norm statistics; SPEC 2 keeps
the cleaner choice, and a caller gets fairseq's behaviour by passing no mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

LAYER_NORMS = ("instance", "layer", "batch", "none")
FINAL_NORMS = ("instance", "layer", "none")


def _valid(padding_mask: jax.Array | None) -> jax.Array | None:
    """[B, T, 1] bool, True where a position is real (not padding)."""
    if padding_mask is None:
        return None
    return jnp.logical_not(jnp.asarray(padding_mask, bool))[..., None]


def _masked_moments(x: jax.Array, valid: jax.Array | None,
                    axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance of ``x`` over ``axes``, counting only valid positions.

    Two-pass (mean first, then centred squares) for float32 accuracy. Invalid
    positions are selected away with ``where`` rather than multiplied by 0, so a
    NaN/inf in padding cannot reach the statistics.
    """
    if valid is None:
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        return mean, var
    valid = jnp.broadcast_to(valid, x.shape)
    # max(count, 1): an all-padded row gets mean 0 / var 0 instead of 0/0.
    count = jnp.maximum(jnp.sum(valid, axis=axes, keepdims=True, dtype=x.dtype), 1.0)
    mean = jnp.sum(jnp.where(valid, x, 0.0), axis=axes, keepdims=True) / count
    sq = jnp.where(valid, jnp.square(x - mean), 0.0)
    var = jnp.sum(sq, axis=axes, keepdims=True) / count
    return mean, var


def _zero_padded(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    return x if valid is None else jnp.where(valid, x, 0.0)


def instance_norm(x: jax.Array, padding_mask: jax.Array | None = None,
                  eps: float = 1e-5) -> jax.Array:
    """Instance norm over time (SPEC 2, ``instance``).

    Per sample and per channel over the time axis T of ``x`` [..., B, T, D]:
    ``(x - mean_T) / sqrt(var_T + eps)``, biased variance, no affine (torch
    ``F.instance_norm`` on a [B, D, T] tensor). Any leading axes (e.g. a stacked K)
    are treated independently. With ``padding_mask`` [B, T] (True = padded), padded
    positions are excluded from the statistics and output 0.
    """
    x = jnp.asarray(x, jnp.float32)
    valid = _valid(padding_mask)
    mean, var = _masked_moments(x, valid, (-2,))
    return _zero_padded((x - mean) * jax.lax.rsqrt(var + eps), valid)


def layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Parameter-free LayerNorm over the channel axis D (SPEC 2, ``layer``).

    ``(x - mean_D) / sqrt(var_D + eps)``, biased variance (torch ``F.layer_norm``
    without weight/bias). Positions are independent, so padding needs no special
    handling here; ``make_targets`` zeroes padded outputs at the end.
    """
    x = jnp.asarray(x, jnp.float32)
    mean, var = _masked_moments(x, None, (-1,))
    return (x - mean) * jax.lax.rsqrt(var + eps)


def batch_norm(x: jax.Array, padding_mask: jax.Array | None = None,
               eps: float = 1e-5) -> jax.Array:
    """Batch norm without running stats or affine (SPEC 2, ``batch``).

    Per channel over batch and time together of ``x`` [..., B, T, D], biased
    variance (torch ``F.batch_norm(training=True)`` on [B, D, T]). Leading axes are
    independent. With ``padding_mask`` [B, T] (True = padded), padded positions are
    excluded from the statistics and output 0.
    """
    x = jnp.asarray(x, jnp.float32)
    valid = _valid(padding_mask)
    mean, var = _masked_moments(x, valid, (-3, -2))
    return _zero_padded((x - mean) * jax.lax.rsqrt(var + eps), valid)


def _normalize(x: jax.Array, name: str, padding_mask: jax.Array | None,
               eps: float) -> jax.Array:
    if name == "instance":
        return instance_norm(x, padding_mask, eps)
    if name == "layer":
        return layer_norm(x, eps)
    if name == "batch":
        return batch_norm(x, padding_mask, eps)
    return x  # "none"; names are validated by the caller


def _stack_top_k(layer_outputs: Sequence[jax.Array] | jax.Array, top_k: int) -> jax.Array:
    """The last ``top_k`` blocks as one float32 [K, B, T, D] array."""
    if isinstance(layer_outputs, (list, tuple)):
        num = len(layer_outputs)
        if num == 0:
            raise ValueError("make_targets: layer_outputs is an empty sequence")
        shapes = {tuple(jnp.shape(t)) for t in layer_outputs}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError("make_targets: layer_outputs must be L arrays of one shape "
                             f"[B, T, D]; got shapes {[tuple(jnp.shape(t)) for t in layer_outputs]}")
    else:
        layer_outputs = jnp.asarray(layer_outputs)
        if layer_outputs.ndim != 4:
            raise ValueError("make_targets: a stacked layer_outputs must be [L, B, T, D]; "
                             f"got shape {layer_outputs.shape}")
        num = layer_outputs.shape[0]
    if not 1 <= top_k <= num:
        raise ValueError(f"make_targets: top_k={top_k} must be in [1, {num}] "
                         f"(the number of blocks L={num})")
    if isinstance(layer_outputs, (list, tuple)):
        stacked = jnp.stack([jnp.asarray(t, jnp.float32) for t in layer_outputs[num - top_k:]])
    else:
        stacked = layer_outputs[num - top_k:].astype(jnp.float32)
    return stacked


def make_targets(layer_outputs: Sequence[jax.Array] | jax.Array, *, top_k: int,
                 layer_norm: str, final_norm: str,
                 padding_mask: jax.Array | None = None, eps: float = 1e-5) -> jax.Array:
    """Contextualized targets from the teacher's block outputs (SPEC 2).

    Args:
      layer_outputs: L per-block arrays [B, T, D] in block order, or one [L, B, T, D].
      top_k: K; blocks L-K .. L-1 are used.
      layer_norm: per-block norm, one of ``LAYER_NORMS``.
      final_norm: norm of the average, one of ``FINAL_NORMS``.
      padding_mask: optional [B, T] bool, True = padded; padded positions are left out
        of instance/batch statistics and are 0 in the output.
      eps: epsilon of every norm (SPEC 2: 1e-5 for audio/text, 1e-6 for vision).

    Returns:
      float32 [B, T, D]: ``final_norm(mean_k layer_norm(block_k))``.
    """
    if layer_norm not in LAYER_NORMS:
        raise ValueError(f"make_targets: layer_norm={layer_norm!r}; expected one of {LAYER_NORMS}")
    if final_norm not in FINAL_NORMS:
        raise ValueError(f"make_targets: final_norm={final_norm!r}; expected one of {FINAL_NORMS}")
    y = _stack_top_k(layer_outputs, top_k)
    if padding_mask is not None and tuple(jnp.shape(padding_mask)) != y.shape[1:3]:
        raise ValueError(f"make_targets: padding_mask shape {tuple(jnp.shape(padding_mask))} "
                         f"!= [B, T] = {y.shape[1:3]} of layer_outputs")
    # All K norms at once: the norms treat the leading K axis as independent.
    y = jnp.mean(_normalize(y, layer_norm, padding_mask, eps), axis=0)
    y = _normalize(y, final_norm, padding_mask, eps)
    return _zero_padded(y, _valid(padding_mask))


def position_center(y: jax.Array, padding_mask: jax.Array | None = None, *,
                    axis_name: str | None = None) -> jax.Array:
    """Targets less their per-position mean over the batch (``target.position_center``).

    Not in the papers: a guard against the positional collapse of small runs
    (docs/label_efficiency.md). With learned absolute positions that the
    teacher shares with the student (SPEC 4, fairseq ``ema_encoder_only``),
    the student gains by making positions loud: the teacher's targets follow
    at once and become predictable from position alone, a loop in which the
    loss falls while the features lose their content. Removing the
    component that position alone explains (the R^2 part that
    ``losses.position_share`` measures) leaves nothing to gain from it.

    ``y`` [B, T, D]; ``padding_mask`` [B, T], True = padded (left out of the
    means, 0 in the output). With ``axis_name`` the means are over the global
    batch (``psum``), so any device count centres alike.
    """
    y = jnp.asarray(y, jnp.float32)
    mean, _, valid = per_position_mean(y, padding_mask, axis_name=axis_name)
    return jnp.where(valid, y - mean[None], 0.0)


def per_position_mean(y: jax.Array, padding_mask: jax.Array | None = None, *,
                      axis_name: str | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean [T, D], count [T, 1], valid [B, T, 1]): each position's mean over the
    batch's real (unpadded) rows, how many there were, and which rows are real.
    With ``axis_name`` the sums are ``psum``-ed (the global batch). Shared by
    ``position_center`` and ``losses.position_share``, which must agree on it."""
    valid = (jnp.ones(y.shape[:2] + (1,), bool) if padding_mask is None
             else _valid(padding_mask))
    count = jnp.sum(valid, axis=0, dtype=jnp.float32)  # [T, 1]
    total = jnp.sum(jnp.where(valid, y, 0.0), axis=0)  # [T, D]
    if axis_name is not None:
        count, total = jax.lax.psum((count, total), axis_name)
    return total / jnp.maximum(count, 1.0), count, valid
