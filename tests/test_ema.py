"""Tests for d2v_jax.ema (SPEC section 4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax.ema import decay_at, update

START, END, N = 0.999, 0.9999, 30_000


def ref_decay(step, start=START, end=END, n=N):
    if n <= 0 or step >= n:
        return end
    return end - (end - start) * (1 - step / n)


@pytest.mark.parametrize("step", [0, 1, 7_500, 15_000, 29_999, 30_000, 30_001, 10**6])
def test_decay_at_matches_hand_values(step):
    got = decay_at(step, start=START, end=END, anneal_steps=N)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, ref_decay(step), rtol=1e-7, atol=0)


def test_decay_at_hand_values():
    kw = dict(start=START, end=END, anneal_steps=N)
    np.testing.assert_allclose(decay_at(0, **kw), 0.999, rtol=1e-7)
    np.testing.assert_allclose(decay_at(15_000, **kw), 0.99945, rtol=1e-7)
    np.testing.assert_allclose(decay_at(N, **kw), 0.9999, rtol=1e-7)
    np.testing.assert_allclose(decay_at(N + 5, **kw), 0.9999, rtol=1e-7)
    assert float(decay_at(0, **kw)) == float(np.float32(START))  # exact at step 0


@pytest.mark.parametrize("anneal", [0, -1])
def test_no_anneal_means_end(anneal):
    for step in (0, 10, 10**6):
        assert float(decay_at(step, start=0.9, end=0.9998, anneal_steps=anneal)) == float(np.float32(0.9998))


def test_decay_at_under_jit_with_traced_step():
    f = jax.jit(lambda s: decay_at(s, start=START, end=END, anneal_steps=N))
    for step in (0, 12_345, N, N + 1):
        got = f(jnp.asarray(step, jnp.int32))
        np.testing.assert_allclose(got, ref_decay(step), rtol=1e-7)
    g = jax.jit(decay_at, static_argnames=("start", "end"))
    np.testing.assert_allclose(g(jnp.int32(100), start=START, end=END, anneal_steps=jnp.int32(N)),
                               ref_decay(100), rtol=1e-7)
    np.testing.assert_allclose(g(jnp.int32(100), start=START, end=END, anneal_steps=jnp.int32(0)),
                               END, rtol=1e-7)


def test_update_matches_numpy_and_keeps_float32_with_bf16_params():
    rng = np.random.default_rng(0)
    ema = {"w": rng.normal(size=(4, 3)).astype(np.float32),
           "sub": {"b": rng.normal(size=(3,)).astype(np.float32)}}
    params = jax.tree.map(lambda a: jnp.asarray(a + rng.normal(size=a.shape), jnp.bfloat16), ema)
    tau = 0.99
    new = update(jax.tree.map(jnp.asarray, ema), params, tau)
    for got, e, p in zip(jax.tree.leaves(new), jax.tree.leaves(ema), jax.tree.leaves(params)):
        assert got.dtype == jnp.float32
        p32 = np.asarray(p.astype(jnp.float32), np.float64)
        want = tau * e.astype(np.float64) + (1 - tau) * p32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert jax.tree.structure(new) == jax.tree.structure(ema)


def test_update_under_jit_with_traced_decay():
    ema = {"w": jnp.ones((2, 2)), "v": jnp.zeros((3,))}
    params = {"w": jnp.zeros((2, 2)), "v": jnp.full((3,), 2.0)}
    tau = decay_at(jnp.int32(0), start=0.9, end=0.99, anneal_steps=10)
    new = jax.jit(update)(ema, params, tau)
    np.testing.assert_allclose(new["w"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(new["v"], 0.2, rtol=1e-5)
    # decay 1 keeps the teacher, decay 0 copies the student.
    np.testing.assert_array_equal(update(ema, params, 1.0)["w"], ema["w"])
    np.testing.assert_array_equal(update(ema, params, 0.0)["v"], params["v"])


def test_update_mismatched_trees():
    with pytest.raises(ValueError, match="ema_params and params trees differ"):
        update({"a": jnp.ones(2)}, {"b": jnp.ones(2)}, 0.9)
    with pytest.raises(ValueError, match="ema_params and params trees differ"):
        update({"a": jnp.ones(2)}, {"a": jnp.ones(2), "b": jnp.ones(2)}, 0.9)
