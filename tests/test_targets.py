"""Tests for d2v_jax.targets (SPEC section 2) against independent numpy loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax import targets
from d2v_jax.targets import batch_norm, instance_norm, layer_norm, make_targets

EPS = 1e-5
B, T, D, L = 3, 7, 5, 6


# ---- numpy references (float64, plain loops) ------------------------------------

def ref_instance(x, pad=None, eps=EPS):
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        keep = np.ones(x.shape[1], bool) if pad is None else ~pad[b]
        for d in range(x.shape[2]):
            v = x[b, keep, d]
            mu = v.mean() if v.size else 0.0
            var = ((v - mu) ** 2).mean() if v.size else 0.0
            out[b, keep, d] = (v - mu) / np.sqrt(var + eps)
    return out


def ref_layer(x, eps=EPS):
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[b, t]
            out[b, t] = (v - v.mean()) / np.sqrt(v.var() + eps)
    return out


def ref_batch(x, pad=None, eps=EPS):
    x = np.asarray(x, np.float64)
    keep = np.ones(x.shape[:2], bool) if pad is None else ~pad
    out = np.zeros_like(x)
    for d in range(x.shape[2]):
        v = x[:, :, d][keep]
        out[:, :, d][keep] = (v - v.mean()) / np.sqrt(v.var() + eps)
    return out


def ref_targets(layers, top_k, ln, fn, pad=None, eps=EPS):
    norm = {"instance": lambda a: ref_instance(a, pad, eps), "layer": lambda a: ref_layer(a, eps),
            "batch": lambda a: ref_batch(a, pad, eps), "none": lambda a: np.asarray(a, np.float64)}
    taken = [norm[ln](layers[i]) for i in range(len(layers) - top_k, len(layers))]
    y = norm[fn](sum(taken) / top_k)
    if pad is not None:
        y = np.where(pad[..., None], 0.0, y)
    return y


def _layers(seed=0, shape=(L, B, T, D)):
    rng = np.random.default_rng(seed)
    # Per-channel offsets and scales so every norm does real work.
    return (rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=shape[-1])
            + rng.normal(size=shape[-1]) * 2).astype(np.float32)


def _pad(seed=1):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T, size=B)
    lengths[0] = T  # one unpadded row
    return np.arange(T)[None, :] >= lengths[:, None]


# ---- the norms -------------------------------------------------------------------

def test_instance_norm_matches_numpy():
    x = _layers()[0]
    np.testing.assert_allclose(instance_norm(x), ref_instance(x), atol=1e-5, rtol=1e-5)


def test_instance_norm_with_padding_matches_numpy_and_zeroes_padding():
    x, pad = _layers()[0], _pad()
    out = np.asarray(instance_norm(x, pad))
    np.testing.assert_allclose(out, ref_instance(x, pad), atol=1e-5, rtol=1e-5)
    assert np.all(out[pad] == 0.0)
    # Unpadded statistics really differ from the fairseq-style (pad-included) ones.
    assert not np.allclose(out[~pad], np.asarray(instance_norm(x))[~pad], atol=1e-3)


def test_instance_norm_ignores_values_at_padded_positions():
    x, pad = _layers()[0], _pad()
    x2 = x.copy()
    x2[pad] = np.random.default_rng(5).normal(size=x2[pad].shape) * 1e3
    x3 = x.copy()
    x3[pad] = np.nan  # cannot leak through the masked sums either
    a, b, c = (np.asarray(instance_norm(v, pad)) for v in (x, x2, x3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_instance_norm_stats_are_over_time_per_channel():
    x = np.asarray(instance_norm(_layers()[0]), np.float64)
    np.testing.assert_allclose(x.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(x.var(axis=1), 1.0, atol=1e-3)


def test_layer_norm_matches_numpy():
    x = _layers()[0]
    np.testing.assert_allclose(layer_norm(x), ref_layer(x), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(layer_norm(x, eps=1e-6), ref_layer(x, 1e-6), atol=1e-5, rtol=1e-5)


def test_batch_norm_matches_numpy():
    x, pad = _layers()[0], _pad()
    np.testing.assert_allclose(batch_norm(x), ref_batch(x), atol=1e-5, rtol=1e-5)
    out = np.asarray(batch_norm(x, pad))
    np.testing.assert_allclose(out, ref_batch(x, pad), atol=1e-5, rtol=1e-5)
    assert np.all(out[pad] == 0.0)


def test_norms_vectorize_over_a_leading_axis():
    x, pad = _layers(), _pad()
    for fn in (lambda a: instance_norm(a, pad), layer_norm, lambda a: batch_norm(a, pad)):
        stacked = np.asarray(fn(x))
        for k in range(L):
            np.testing.assert_allclose(stacked[k], fn(x[k]), atol=1e-6, rtol=1e-6)


# ---- make_targets ----------------------------------------------------------------

@pytest.mark.parametrize("ln,fn", [("instance", "none"), ("layer", "none"), ("layer", "layer"),
                                   ("instance", "layer"), ("batch", "instance"),
                                   ("none", "instance"), ("none", "none")])
@pytest.mark.parametrize("top_k", [1, 3, L])
def test_make_targets_matches_numpy(ln, fn, top_k):
    x = _layers()
    y = make_targets(x, top_k=top_k, layer_norm=ln, final_norm=fn)
    assert y.shape == (B, T, D) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref_targets(x, top_k, ln, fn), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ln,fn", [("instance", "none"), ("instance", "layer"),
                                   ("batch", "instance"), ("layer", "instance"),
                                   ("none", "layer")])
def test_make_targets_with_padding_matches_numpy(ln, fn):
    x, pad = _layers(), _pad()
    y = np.asarray(make_targets(x, top_k=4, layer_norm=ln, final_norm=fn, padding_mask=pad))
    np.testing.assert_allclose(y, ref_targets(x, 4, ln, fn, pad), atol=1e-5, rtol=1e-5)
    assert np.all(y[pad] == 0.0)


@pytest.mark.parametrize("ln,fn", [("instance", "layer"), ("layer", "instance"),
                                   ("batch", "none"), ("none", "none")])
def test_make_targets_padded_values_change_nothing(ln, fn):
    x, pad = _layers(), _pad()
    x2 = x.copy()
    x2[:, pad] = np.random.default_rng(9).normal(size=x2[:, pad].shape) * 100 + 50
    kw = dict(top_k=3, layer_norm=ln, final_norm=fn, padding_mask=pad)
    np.testing.assert_array_equal(make_targets(x, **kw), make_targets(x2, **kw))


def test_make_targets_takes_the_last_k_blocks():
    x = _layers()
    y = make_targets(x, top_k=2, layer_norm="none", final_norm="none")
    np.testing.assert_allclose(y, (x[L - 2] + x[L - 1]) / 2, atol=1e-6, rtol=1e-6)
    # Changing an early block changes nothing; changing block L-2 does.
    x2 = x.copy()
    x2[: L - 2] = 0.0
    np.testing.assert_array_equal(y, make_targets(x2, top_k=2, layer_norm="none", final_norm="none"))
    x2[L - 2] += 1.0
    assert not np.allclose(y, make_targets(x2, top_k=2, layer_norm="none", final_norm="none"))


def test_list_and_stacked_inputs_agree_and_bf16_is_cast():
    x, pad = _layers(), _pad()
    kw = dict(top_k=4, layer_norm="instance", final_norm="layer", padding_mask=pad)
    np.testing.assert_array_equal(make_targets(x, **kw), make_targets(list(x), **kw))
    np.testing.assert_array_equal(make_targets(x, **kw), make_targets(tuple(jnp.asarray(x)), **kw))
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = make_targets(xb, **kw)
    assert yb.dtype == jnp.float32
    ref = ref_targets(np.asarray(xb.astype(jnp.float32)), 4, "instance", "layer", pad)
    np.testing.assert_allclose(yb, ref, atol=1e-5, rtol=1e-5)


def test_make_targets_jits():
    x, pad = _layers(), _pad()
    f = jax.jit(lambda a, p: make_targets(a, top_k=5, layer_norm="instance",
                                          final_norm="none", padding_mask=p))
    np.testing.assert_allclose(f(x, pad), ref_targets(x, 5, "instance", "none", pad),
                               atol=1e-5, rtol=1e-5)


def test_eps_is_used():
    x = _layers()
    kw = dict(top_k=2, layer_norm="layer", final_norm="layer")
    np.testing.assert_allclose(make_targets(x, eps=1e-6, **kw), ref_targets(x, 2, "layer", "layer", eps=1e-6),
                               atol=1e-5, rtol=1e-5)
    # A huge eps makes the difference visible.
    c = np.full((1, B, T, D), 0.0, np.float32)
    c[0, :, :, 0] = 1.0
    y = make_targets(c, top_k=1, layer_norm="layer", final_norm="none", eps=1.0)
    np.testing.assert_allclose(y, ref_layer(c[0], 1.0), atol=1e-6)


@pytest.mark.parametrize("top_k", [0, -1, L + 1])
def test_bad_top_k(top_k):
    with pytest.raises(ValueError, match=rf"top_k={top_k}.*\[1, {L}\]"):
        make_targets(_layers(), top_k=top_k, layer_norm="none", final_norm="none")
    with pytest.raises(ValueError, match=rf"top_k={top_k}"):
        make_targets(list(_layers()), top_k=top_k, layer_norm="none", final_norm="none")


def test_bad_norm_names():
    x = _layers()
    with pytest.raises(ValueError, match=r"layer_norm='group'.*'instance'.*'layer'.*'batch'.*'none'"):
        make_targets(x, top_k=2, layer_norm="group", final_norm="none")
    # batch is a per-layer norm only.
    with pytest.raises(ValueError, match=r"final_norm='batch'.*'instance'.*'layer'.*'none'"):
        make_targets(x, top_k=2, layer_norm="none", final_norm="batch")
    assert targets.FINAL_NORMS == ("instance", "layer", "none")


def test_bad_shapes():
    x = _layers()
    with pytest.raises(ValueError, match=r"\[L, B, T, D\].*\(3, 7, 5\)"):
        make_targets(x[0], top_k=1, layer_norm="none", final_norm="none")
    with pytest.raises(ValueError, match="one shape"):
        make_targets([x[0], x[1, :, :4]], top_k=1, layer_norm="none", final_norm="none")
    with pytest.raises(ValueError, match="padding_mask shape"):
        make_targets(x, top_k=1, layer_norm="none", final_norm="none",
                     padding_mask=np.zeros((B, T + 1), bool))


def test_position_center_removes_the_per_position_batch_mean_of_valid_rows():
    rng = np.random.default_rng(7)
    y = rng.normal(size=(4, 5, 3)).astype(np.float32) + np.arange(5)[None, :, None]
    pad = np.zeros((4, 5), bool)
    pad[0, 3:] = True  # row 0 is padded from position 3 on
    out = np.asarray(targets.position_center(y, pad))
    for t in range(5):
        rows = [b for b in range(4) if not pad[b, t]]
        ref = y[rows, t] - y[rows, t].mean(axis=0)  # mean over the valid rows only
        np.testing.assert_allclose(out[rows, t], ref, atol=1e-6)
    assert np.all(out[pad] == 0.0)
    # What is left has no per-position component: position explains none of it.
    from d2v_jax import losses
    assert float(losses.position_share(out, pad)) < 1e-10


def test_position_center_over_devices_uses_the_global_batch():
    rng = np.random.default_rng(8)
    y = rng.normal(size=(6, 4, 2)).astype(np.float32) + np.arange(4)[None, :, None]
    pad = rng.random((6, 4)) < 0.3
    whole = np.asarray(targets.position_center(y, pad))
    # 3 "devices" of 2 rows each (a named vmap stands in for the data axis).
    split = jax.vmap(lambda a, p: targets.position_center(a, p, axis_name="data"),
                     axis_name="data")(y.reshape(3, 2, 4, 2), pad.reshape(3, 2, 4))
    np.testing.assert_allclose(np.asarray(split).reshape(6, 4, 2), whole, atol=1e-6)
