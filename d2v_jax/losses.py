"""The data2vec regression loss and the collapse-guard statistic (SPEC section 3).

Pure functions with static shapes. Masks are bool arrays in which True means the
position counts. Reductions are masked sums, so an ``axis_name`` (inside ``pmap`` /
``shard_map`` / a named ``vmap``) only needs ``psum`` of those sums to turn a
per-device value into the global-batch one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from d2v_jax.targets import per_position_mean


def _psum(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def regression_loss_terms(pred: jax.Array, target: jax.Array, *, beta: float = 0.0,
                          scale: float | None = None) -> jax.Array:
    """Per-position regression loss [...] for pred/target [..., D] (SPEC 3).

    ``beta == 0``: squared error summed over D; otherwise PyTorch's smooth-L1
    (``0.5 * d**2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 * beta``) summed over D.
    Multiplied by ``scale``, or by ``1 / sqrt(D)`` when ``scale`` is None. float32.
    ``beta`` and ``scale`` are static (Python numbers from the config).
    """
    if jnp.shape(pred) != jnp.shape(target):
        raise ValueError(f"regression_loss: pred shape {jnp.shape(pred)} != target shape "
                         f"{jnp.shape(target)}")
    if beta < 0:
        raise ValueError(f"regression_loss: beta={beta} must be >= 0")
    d = jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32)
    if beta == 0:
        per = jnp.square(d)
    else:
        ad = jnp.abs(d)
        # Both branches are finite everywhere, so the where has clean gradients.
        per = jnp.where(ad < beta, 0.5 * jnp.square(d) / beta, ad - 0.5 * beta)
    if scale is None:
        scale = 1.0 / math.sqrt(d.shape[-1])
    return jnp.sum(per, axis=-1) * jnp.float32(scale)


def regression_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, *,
                    beta: float = 0.0, scale: float | None = None,
                    axis_name: str | None = None) -> jax.Array:
    """Masked-mean regression loss, a float32 scalar (SPEC 3).

    ``sum(terms * mask) / max(count, 1)`` with ``terms = regression_loss_terms(...)``
    and ``count = sum(mask)``; an all-False mask gives 0. With ``axis_name`` the
    numerator and the count are ``psum``-ed first, so the value is the mean over the
    masked positions of the *global* batch (SPEC 3: data-parallel == one device).
    """
    terms = regression_loss_terms(pred, target, beta=beta, scale=scale)
    if jnp.shape(mask) != terms.shape:
        raise ValueError(f"regression_loss: mask shape {jnp.shape(mask)} != pred.shape[:-1] "
                         f"{terms.shape}")
    mask = jnp.asarray(mask, bool)
    # where, not multiply: a NaN/inf at a position that does not count stays out.
    num = _psum(jnp.sum(jnp.where(mask, terms, 0.0)), axis_name)
    count = _psum(jnp.sum(mask, dtype=jnp.float32), axis_name)
    return num / jnp.maximum(count, 1.0)


CLS_REDUCTIONS = ("ref_rows", "sum", "mean")


def cls_loss(cls_pred: jax.Array, cls_target: jax.Array, *, weight: float, reduction: str,
             total_rows: jax.Array, ref_rows: int | None = None, beta: float = 0.0,
             scale: float | None = None) -> jax.Array:
    """This batch's share of the data2vec 2.0 CLS loss (SPEC 6), a float32 scalar.

    ``cls_pred`` / ``cls_target`` [R, D] are the student's CLS outputs and the mean
    over positions of the final targets (repeated per clone); ``total_rows`` is
    the number of student rows of the whole (global) batch, so the shares of
    micro-batches and devices add up. With ``c_r`` =
    ``regression_loss_terms(pred_r, target_r)`` and ``C = sum_r c_r`` over the
    global batch:

    - ``ref_rows``: ``weight * ref_rows * C / total_rows``. fairseq multiplies the
      CLS term of each GPU by its *local* masked count and divides the summed
      loss by the *global* one; every row has the same masked count, so that is
      ``weight * (rows per GPU) * mean_r c_r``. ``ref_rows`` = the official rows
      per GPU (image base: 16 images x 16 clones = 256) gives the official
      effective weight at any device count and batch.
    - ``sum``: ``weight * C`` (the official weight only on one official GPU's batch).
    - ``mean``: ``weight * C / total_rows``.
    """
    if reduction not in CLS_REDUCTIONS:
        raise ValueError(f"loss.cls_reduction={reduction!r}; expected one of {CLS_REDUCTIONS}")
    per = regression_loss_terms(cls_pred, cls_target, beta=beta, scale=scale)
    total = jnp.sum(per)
    if reduction == "sum":
        return jnp.float32(weight) * total
    if reduction == "mean":
        return jnp.float32(weight) * total / total_rows
    if ref_rows is None or ref_rows < 1:
        raise ValueError(f"loss.cls_ref_rows={ref_rows!r}: cls_reduction='ref_rows' needs the "
                         "official student rows per device (an integer >= 1)")
    return jnp.float32(weight * ref_rows) * total / total_rows


def compute_var(x: jax.Array, mask: jax.Array | None = None, *,
                axis_name: str | None = None) -> jax.Array:
    """Collapse-guard statistic, as fairseq data2vec's ``compute_var`` (SPEC 3).

    ``x`` [..., D] is flattened to rows [N, D] (only rows where ``mask`` [...] is True
    when given); per channel the *unbiased* variance over rows; then
    ``mean_D(sqrt(var + 1e-6))``. Despite the name this is a mean per-channel std,
    not a variance: we keep fairseq's quantity because the SPEC 3 thresholds
    (target < 0.1, prediction < 0.01) were set for it.

    Masked sums keep shapes static. With ``axis_name`` the count and the sums are
    ``psum``-ed, giving the statistic of the global batch. Two passes (mean, then
    centred squares) rather than fairseq's ``sum(x^2) - sum(x)^2/n``, which loses
    precision in float32; the value is the same. With fewer than two rows the
    variance is taken as 0 (fairseq would divide by zero), giving ``sqrt(1e-6)``.
    """
    x = jnp.asarray(x, jnp.float32)
    if mask is not None and tuple(jnp.shape(mask)) != x.shape[:-1]:
        raise ValueError(f"compute_var: mask shape {tuple(jnp.shape(mask))} != x.shape[:-1] "
                         f"{x.shape[:-1]}")
    x = x.reshape(-1, x.shape[-1])
    if mask is None:
        valid = jnp.ones((x.shape[0], 1), bool)
    else:
        valid = jnp.asarray(mask, bool).reshape(-1, 1)
    count = _psum(jnp.sum(valid, dtype=jnp.float32), axis_name)
    total = _psum(jnp.sum(jnp.where(valid, x, 0.0), axis=0), axis_name)
    mean = total / jnp.maximum(count, 1.0)
    css = _psum(jnp.sum(jnp.where(valid, jnp.square(x - mean), 0.0), axis=0), axis_name)
    var = css / jnp.maximum(count - 1.0, 1.0)
    return jnp.mean(jnp.sqrt(var + 1e-6))


def position_share(y: jax.Array, padding_mask: jax.Array | None = None, *,
                   axis_name: str | None = None) -> jax.Array:
    """Share of the targets' variance that position alone explains (R^2 of a
    per-position mean over the batch), in [0, 1].

    A collapse that ``compute_var`` (SPEC 3) cannot see: final-normed targets
    keep unit variance even when the teacher's outputs carry nothing but their
    position (e.g. on images that are mostly blank background, whose patches
    differ only in their position embedding), and the student then predicts
    them from the mask layout alone. ``y`` [B, T, D]; ``padding_mask`` [B, T],
    True = padded (left out). Between-position sum of squares over the total
    one. With no position effect the expected share is about 1/B, so small
    batches read high. With ``axis_name`` the sums are ``psum``-ed (the global
    batch).
    """
    y = jnp.asarray(y, jnp.float32)
    if y.ndim != 3:
        raise ValueError(f"position_share: y must be [B, T, D], got shape {y.shape}")
    mean_t, count_t, valid = per_position_mean(y, padding_mask, axis_name=axis_name)
    grand = jnp.sum(count_t * mean_t, axis=0) / jnp.maximum(jnp.sum(count_t), 1.0)  # [D]
    between = jnp.sum(count_t * jnp.square(mean_t - grand))
    total = _psum(jnp.sum(jnp.where(valid, jnp.square(y - grand), 0.0)), axis_name)
    return between / jnp.maximum(total, 1e-12)
