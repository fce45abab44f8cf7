"""Tests for d2v_jax.ema (SPEC section 4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax.ema import decay_at, ema_update_count, update

START, END, N = 0.999, 0.9999, 30_000


def fairseq_decay(num_updates, start=START, end=END, anneal=N):
    """fairseq `set_num_updates(num_updates)` of data2vec_audio.py / data2vec2.py,
    written from that code: the trainer increments its counter after the
    optimizer step and then calls set_num_updates with the new count; the decay
    is `end` once num_updates >= anneal_end_step, else get_annealed_rate:
    end - (end - start) * (1 - num_updates / anneal); start == end: constant."""
    if start == end:
        return start
    if num_updates >= anneal:
        return end
    return end - (end - start) * (1 - num_updates / anneal)


def fairseq_trajectory(student_values, start, end, anneal):
    """fairseq's EMA over a run: teacher = copy of the initial student; after
    the optimizer update that leaves the student at student_values[u-1] (the
    u-th update, u = 1, 2, ...), one EMA step with fairseq_decay(u)."""
    teacher = student_values[0] * 0 + INIT
    out = []
    for u, p in enumerate(student_values, start=1):
        d = fairseq_decay(u, start, end, anneal)
        teacher = d * teacher + (1 - d) * p
        out.append(teacher)
    return np.asarray(out)


INIT = 0.5


@pytest.mark.parametrize("step", [0, 1, 7_499, 15_000, 29_998, 29_999, 30_000, 10**6])
def test_decay_of_the_update_at_step_is_fairseqs_post_increment_decay(step):
    """The train step at state.step = s makes update number s + 1 (SPEC 4)."""
    got = decay_at(ema_update_count(step), start=START, end=END, anneal_steps=N)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, fairseq_decay(step + 1), rtol=1e-7, atol=0)


def test_first_update_is_already_annealed_and_the_end_is_reached_one_update_early():
    kw = dict(start=START, end=END, anneal_steps=N)
    first = float(decay_at(ema_update_count(0), **kw))
    assert first > np.float32(START)  # n = 1, not 0
    np.testing.assert_allclose(first, END - (END - START) * (1 - 1 / N), rtol=1e-7)
    # fairseq reaches `end` at num_updates = N, i.e. the update made at step N - 1
    assert float(decay_at(ema_update_count(N - 1), **kw)) == float(np.float32(END))
    assert float(decay_at(ema_update_count(N - 2), **kw)) < float(np.float32(END))


def test_ema_trajectory_matches_fairseq_loop():
    """Our step loop (decay of ema_update_count(step), then update) against the
    fairseq loop above, over 6 updates of a short anneal."""
    start, end, anneal = 0.5, 0.9, 4
    rng = np.random.default_rng(0)
    students = rng.normal(size=(6, 3))
    want = fairseq_trajectory(students, start, end, anneal)
    teacher = {"w": jnp.full((3,), INIT, jnp.float32)}
    step = jax.jit(lambda t, p, s: update(t, p, decay_at(ema_update_count(s), start=start,
                                                           end=end, anneal_steps=anneal)))
    for s, p in enumerate(students):  # state.step = s before the update
        teacher = step(teacher, {"w": jnp.asarray(p, jnp.float32)}, jnp.int32(s))
        np.testing.assert_allclose(teacher["w"], want[s], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("anneal", [0, -1])
def test_no_anneal_means_end(anneal):
    for n in (0, 10, 10**6):
        assert float(decay_at(n, start=0.9, end=0.9998, anneal_steps=anneal)) == float(np.float32(0.9998))


def test_decay_at_under_jit_with_traced_count():
    f = jax.jit(lambda s: decay_at(ema_update_count(s), start=START, end=END, anneal_steps=N))
    for step in (0, 12_345, N - 1, N, N + 1):
        np.testing.assert_allclose(f(jnp.asarray(step, jnp.int32)), fairseq_decay(step + 1),
                                   rtol=1e-7)
    g = jax.jit(decay_at, static_argnames=("start", "end"))
    np.testing.assert_allclose(g(jnp.int32(100), start=START, end=END, anneal_steps=jnp.int32(N)),
                               fairseq_decay(100), rtol=1e-7)
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
