"""Tests for d2v_jax.losses (SPEC section 3) against independent numpy loops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax import losses
from d2v_jax.losses import compute_var, regression_loss, regression_loss_terms

B, T, D = 4, 6, 8


def ref_loss(pred, target, mask, beta=0.0, scale=None):
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    scale = 1.0 / math.sqrt(pred.shape[-1]) if scale is None else scale
    total, count = 0.0, 0
    for idx in np.ndindex(*mask.shape):
        if not mask[idx]:
            continue
        s = 0.0
        for p, y in zip(pred[idx], target[idx]):
            d = p - y
            if beta == 0:
                s += d * d
            elif abs(d) < beta:
                s += 0.5 * d * d / beta
            else:
                s += abs(d) - 0.5 * beta
        total += s * scale
        count += 1
    return total / max(count, 1)


def _data(seed=0, shape=(B, T, D)):
    rng = np.random.default_rng(seed)
    pred = (rng.normal(size=shape) * 2).astype(np.float32)
    target = rng.normal(size=shape).astype(np.float32)
    mask = rng.random(shape[:-1]) < 0.5
    mask.flat[0] = True
    return pred, target, mask


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0, 4.0])
@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
def test_loss_matches_numpy(beta, scale):
    pred, target, mask = _data()
    got = regression_loss(pred, target, mask, beta=beta, scale=scale)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_loss(pred, target, mask, beta, scale), rtol=1e-6, atol=1e-6)


def test_smooth_l1_uses_both_branches():
    # |d| straddles beta so both pieces of the definition are exercised.
    pred = np.array([[0.5, -1.0, 3.0, -7.0]], np.float32)
    target = np.zeros_like(pred)
    got = regression_loss(pred, target, np.array([True]), beta=2.0, scale=1.0)
    want = 0.5 * 0.25 / 2 + 0.5 * 1.0 / 2 + (3.0 - 1.0) + (7.0 - 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_default_scale_is_inverse_sqrt_d():
    pred, target, mask = _data()
    np.testing.assert_allclose(regression_loss(pred, target, mask),
                               regression_loss(pred, target, mask, scale=1 / math.sqrt(D)), rtol=1e-6)
    np.testing.assert_allclose(regression_loss(pred, target, mask, scale=1.0),
                               math.sqrt(D) * regression_loss(pred, target, mask), rtol=1e-6)


def test_terms_match_numpy():
    pred, target, _ = _data()
    terms = regression_loss_terms(pred, target, beta=0.0, scale=None)
    assert terms.shape == (B, T)
    want = ((pred.astype(np.float64) - target) ** 2).sum(-1) / math.sqrt(D)
    np.testing.assert_allclose(terms, want, rtol=1e-6)
    terms = regression_loss_terms(pred, target, beta=1.0, scale=2.0)
    d = np.abs(pred.astype(np.float64) - target)
    want = 2.0 * np.where(d < 1.0, 0.5 * d * d, d - 0.5).sum(-1)
    np.testing.assert_allclose(terms, want, rtol=1e-6)


def test_unmasked_positions_do_not_change_the_loss():
    pred, target, mask = _data()
    p2, t2 = pred.copy(), target.copy()
    p2[~mask] = 1e4
    t2[~mask] = np.nan
    for beta in (0.0, 2.0):
        np.testing.assert_array_equal(regression_loss(pred, target, mask, beta=beta),
                                      regression_loss(p2, t2, mask, beta=beta))


def test_all_false_mask_gives_zero():
    pred, target, mask = _data()
    got = regression_loss(pred, target, np.zeros_like(mask))
    assert float(got) == 0.0
    g = jax.grad(lambda p: regression_loss(p, target, np.zeros_like(mask)))(pred)
    assert np.all(np.asarray(g) == 0.0)


def test_bf16_inputs_computed_in_float32():
    pred, target, mask = _data()
    pb, tb = jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16)
    got = regression_loss(pb, tb, mask)
    assert got.dtype == jnp.float32
    want = ref_loss(np.asarray(pb.astype(jnp.float32)), np.asarray(tb.astype(jnp.float32)), mask)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_axis_name_gives_the_global_mean():
    # 3 "devices" with different masked counts: psum of numerator and count must
    # give the mean over the concatenated batch, not the mean of per-device means.
    pred, target, mask = _data(3, shape=(6, T, D))
    mask[:2] = True
    mask[4:] = False
    mask[4, 0] = True
    shard = lambda a: a.reshape(3, 2, *a.shape[1:])
    f = jax.vmap(lambda p, y, m: regression_loss(p, y, m, beta=2.0, axis_name="b"), axis_name="b")
    per_dev = np.asarray(f(shard(pred), shard(target), shard(mask)))
    want = ref_loss(pred, target, mask, beta=2.0)
    np.testing.assert_allclose(per_dev, want, rtol=1e-6)
    np.testing.assert_allclose(regression_loss(pred, target, mask, beta=2.0), want, rtol=1e-6)
    local_means = [ref_loss(pred[i:i + 2], target[i:i + 2], mask[i:i + 2], beta=2.0) for i in (0, 2, 4)]
    assert not np.isclose(np.mean(local_means), want)


def test_loss_jits_and_shape_errors():
    pred, target, mask = _data()
    f = jax.jit(lambda p, y, m: regression_loss(p, y, m, beta=0.0))
    np.testing.assert_allclose(f(pred, target, mask), ref_loss(pred, target, mask), rtol=1e-6)
    with pytest.raises(ValueError, match="mask shape"):
        regression_loss(pred, target, mask[:, :-1])
    with pytest.raises(ValueError, match="target shape"):
        regression_loss(pred, target[..., :-1], mask)
    with pytest.raises(ValueError, match="beta=-1"):
        regression_loss(pred, target, mask, beta=-1.0)


# ---- compute_var -----------------------------------------------------------------

def ref_var(x, mask=None):
    rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows[np.asarray(mask).reshape(-1)]
    return np.mean(np.sqrt(np.var(rows, axis=0, ddof=1) + 1e-6))


def test_compute_var_matches_numpy():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(B, T, D)) * rng.uniform(0.01, 3, size=D) + 5).astype(np.float32)
    mask = rng.random((B, T)) < 0.4
    np.testing.assert_allclose(compute_var(x), ref_var(x), rtol=1e-6)
    np.testing.assert_allclose(compute_var(x, mask), ref_var(x, mask), rtol=1e-6)
    x2 = x.copy()
    x2[~mask] = np.nan  # rows outside the mask never count
    np.testing.assert_allclose(compute_var(x2, mask), ref_var(x, mask), rtol=1e-6)


def test_compute_var_of_a_collapsed_batch_is_tiny():
    x = np.ones((B, T, D), np.float32) * 3.0
    np.testing.assert_allclose(compute_var(x), math.sqrt(1e-6), rtol=1e-6)
    # Fewer than two rows: variance taken as 0, no NaN.
    one = np.zeros((B, T), bool)
    one[0, 0] = True
    np.testing.assert_allclose(compute_var(np.random.rand(B, T, D), one), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(compute_var(np.random.rand(B, T, D), np.zeros((B, T), bool)),
                               1e-3, rtol=1e-6)


def test_compute_var_axis_name_matches_global():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(6, T, D)) * 2 + 1).astype(np.float32)
    mask = rng.random((6, T)) < 0.5
    f = jax.vmap(lambda a, m: compute_var(a, m, axis_name="b"), axis_name="b")
    got = np.asarray(f(x.reshape(3, 2, T, D), mask.reshape(3, 2, T)))
    np.testing.assert_allclose(got, ref_var(x, mask), rtol=1e-6)
    g = jax.vmap(lambda a: compute_var(a, axis_name="b"), axis_name="b")
    np.testing.assert_allclose(g(x.reshape(3, 2, T, D)), ref_var(x), rtol=1e-6)


def test_compute_var_mask_shape_error():
    with pytest.raises(ValueError, match="mask shape"):
        compute_var(np.zeros((B, T, D)), np.zeros((B, T + 1), bool))


def _position_share_numpy(y, padding_mask=None):
    """ANOVA R^2 of position, written out with loops over positions."""
    b, t, d = y.shape
    valid = np.ones((b, t), bool) if padding_mask is None else ~padding_mask
    rows = y[valid]  # [n, D]
    grand = rows.mean(0)
    total = ((rows - grand) ** 2).sum()
    between = 0.0
    for j in range(t):
        col = y[valid[:, j], j]
        if len(col):
            between += len(col) * ((col.mean(0) - grand) ** 2).sum()
    return between / total


def test_position_share_matches_numpy_and_detects_positional_targets():
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(1, 6, 5))
    noise = rng.normal(size=(8, 6, 5))
    pad = rng.random((8, 6)) < 0.3
    for y in (noise, pos + 0.1 * noise, noise + pos):
        for mask in (None, pad):
            got = float(losses.position_share(jnp.asarray(y), None if mask is None else jnp.asarray(mask)))
            np.testing.assert_allclose(got, _position_share_numpy(y, mask), rtol=1e-5)
    # Targets that are position plus a little content read near 1; pure noise near 1/B-ish.
    assert float(losses.position_share(jnp.asarray(pos + 0.1 * noise))) > 0.95
    assert float(losses.position_share(jnp.asarray(noise))) < 0.35
    # Over a named axis: two halves of the batch give the whole batch's value.
    halves = jnp.asarray(np.stack([noise[:4] + pos, noise[4:] + pos]))
    both = jax.vmap(lambda h: losses.position_share(h, axis_name="d"), axis_name="d")(halves)
    np.testing.assert_allclose(np.asarray(both), _position_share_numpy(noise + pos), rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, T, D\], got shape \(8, 6\)"):
        losses.position_share(jnp.zeros((8, 6)))


def fairseq_cls_share(cls_pred, cls_target, masked_per_row, gpus, weight):
    """The CLS part of fairseq's data2vec 2.0 update (SPEC 6), by hand: GPU g's
    loss adds weight * (its masked count S_g) * sum over its rows of the
    per-row term (sum over D of (p - y)^2 / sqrt(D)); the trainer sums the GPUs'
    gradients and divides by the global masked count sum_g S_g."""
    pred, target = np.asarray(cls_pred, np.float64), np.asarray(cls_target, np.float64)
    per_row = ((pred - target) ** 2).sum(-1) / math.sqrt(pred.shape[-1])
    shards = np.split(per_row, gpus)
    s_local = [len(sh) * masked_per_row for sh in shards]
    return sum(weight * s * sh.sum() for s, sh in zip(s_local, shards)) / sum(s_local)


@pytest.mark.parametrize("our_devices", [1, 8])
def test_cls_loss_reproduces_fairseq_effective_weight_at_any_device_count(our_devices):
    # The official run: 4 GPUs x 6 student rows; ours: the same 24 rows on 1 or
    # 8 devices (a named vmap: the same psum as shard_map / pmap over devices).
    rng = np.random.default_rng(0)
    rows, gpus, d, w = 24, 4, 16, 0.01
    pred = rng.normal(size=(rows, d)).astype(np.float32)
    target = rng.normal(size=(rows, d)).astype(np.float32)
    want = fairseq_cls_share(pred, target, masked_per_row=157, gpus=gpus, weight=w)

    def share(p, t, axis_name=None):
        total = jnp.float32(p.shape[0])
        if axis_name is not None:
            total = jax.lax.psum(total, axis_name)
        out = losses.cls_loss(p, t, weight=w, reduction="ref_rows", total_rows=total,
                              ref_rows=rows // gpus)
        return out if axis_name is None else jax.lax.psum(out, axis_name)

    if our_devices == 1:
        got = share(pred, target)
    else:
        split = lambda x: x.reshape(our_devices, rows // our_devices, d)
        got = jax.vmap(lambda p, t: share(p, t, "devices"), axis_name="devices")(
            split(pred), split(target))[0]
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # The global sum (fairseq's weight only when one GPU holds the whole batch)
    # is gpus x stronger; the mean is rows-per-GPU x weaker.
    total = jnp.float32(rows)
    s = losses.cls_loss(pred, target, weight=w, reduction="sum", total_rows=total)
    m = losses.cls_loss(pred, target, weight=w, reduction="mean", total_rows=total)
    np.testing.assert_allclose(float(s), gpus * want, rtol=1e-5)
    np.testing.assert_allclose(float(m), want / (rows // gpus), rtol=1e-5)


def test_cls_loss_config_errors():
    x = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="loss.cls_reduction='max'"):
        losses.cls_loss(x, x, weight=0.01, reduction="max", total_rows=2.0)
    with pytest.raises(ValueError, match="loss.cls_ref_rows=None"):
        losses.cls_loss(x, x, weight=0.01, reduction="ref_rows", total_rows=2.0)
