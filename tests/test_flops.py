"""The analytic FLOP count (d2v_jax/flops.py) against XLA's own count of the
compiled train step, and one compilation over 5 steps of the same shapes."""

import jax
import numpy as np
import pytest

import d2v_jax
from d2v_jax import flops, modalities
from d2v_jax.train_step import make_train_step


def small(spec: str, **model):
    """A 2-block, 64-wide (unless `model` says otherwise) version of an experiment config (seconds to compile)."""
    config = d2v_jax.load_config(spec)
    with config.unlocked():
        config.model.update({"dim": 64, "depth": 2, "num_heads": 2, **model})
        config.target.top_k = config.model.depth
        if config.version == "v2":
            config.decoder.update(dim=16, layers=2, groups=4)
        if config.modality == "text":
            config.model.vocab_size = 50
    return config


def abstract_state(config):
    return jax.eval_shape(lambda: d2v_jax.create_train_state(config, jax.random.PRNGKey(0)))


# XLA counts element-wise work too (norms, GELU, softmax, loss, AdamW, EMA),
# which the analytic count leaves out: a few % above at these widths, never below.
@pytest.mark.slow
def test_analytic_flops_match_xla_cost_analysis():
    # tiny_v2: encoder on visible patches x 4 clones, and the conv decoder with
    # decoder.conv_impl = dense, so XLA executes 4x the grouped conv's FLOPs.
    config = small("experiments/image.py:tiny_v2")
    b = 2
    batch = modalities.dummy_batch(config, b)
    count = flops.step_flops(config, b)
    with flops.unrolled_scans():
        xla = flops.xla_flops(make_train_step(config), abstract_state(config), batch,
                              jax.random.PRNGKey(0))
    assert 1.0 <= xla / count.executed < 1.25, (xla, count.executed, count.parts)
    dec_model, dec_executed = count.parts["decoder/conv"]
    assert dec_model < dec_executed < 4 * dec_model  # only the convs are inflated, not proj


def test_flops_closed_form_vit_base():
    """ViT-B/16 1.0 teacher forward = 12 blocks x 197 tokens of
    (24 D^2 per token + 4 T D attention) + the patch embedding; batch-linear."""
    config = d2v_jax.load_config("experiments/image.py:base_v1")
    one = flops.step_flops(config, 1)
    d, t = 768, 197
    expect = 12 * (t * 24 * d * d + 4 * t * t * d) + 2 * 196 * 768 * 768
    np.testing.assert_allclose(one.parts["teacher/encoder"][0] + one.parts["teacher/patch_embed"][0],
                               expect, rtol=1e-12)
    np.testing.assert_allclose(flops.step_flops(config, 8).model, 8 * one.model, rtol=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        flops.step_flops(config, 0)


@pytest.mark.slow
def test_train_step_compiles_once_over_five_steps():
    config = small("experiments/image.py:tiny_v1", dim=32, depth=1)
    compiles = []
    listener = lambda name, *a, **k: compiles.append(name) if name.endswith(
        "backend_compile_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:  # counted from here: the first step's compilations, then none
        state = jax.jit(lambda k: d2v_jax.create_train_state(config, k))(jax.random.PRNGKey(0))
        step = make_train_step(config)
        batch = modalities.dummy_batch(config, 2)
        n0 = len(compiles)
        for i in range(5):
            state, metrics = step(state, batch, jax.random.PRNGKey(0))
            if i == 0:
                n1 = len(compiles)
        jax.block_until_ready(metrics)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert n1 - n0 >= 1 and len(compiles) == n1, compiles
    assert step._cache_size() == 1
    assert int(state.step) == 5
