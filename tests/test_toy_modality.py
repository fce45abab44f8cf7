"""A modality is one folder: a toy fourth one (multichannel sensor time series,
tests/toy_sensor/) registers itself and pretrains through the public API and
the train loop, with no change to d2v_jax."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import d2v_jax
from d2v_jax import flops, modalities
from d2v_jax.train import train_and_evaluate

TOY = os.path.join(os.path.dirname(__file__), "toy_sensor", "experiment.py")


@pytest.fixture
def toy_config():
    import toy_sensor

    modalities.register(toy_sensor.MODALITY)
    yield d2v_jax.load_config(TOY)
    modalities.unregister("toy_sensor")


def test_unregistered_modality_is_a_clear_error():
    config = d2v_jax.load_config(TOY)
    assert "toy_sensor" not in modalities.names()
    with pytest.raises(ValueError, match="config.modality='toy_sensor'; expected one of"):
        modalities.get(config)


def test_toy_modality_pretrains_through_the_public_api(toy_config):
    config = toy_config
    state = d2v_jax.create_train_state(config, jax.random.PRNGKey(config.seed))
    train_step = d2v_jax.make_train_step(config)
    batches = iter(d2v_jax.make_dataset(config))
    batch = next(batches)
    assert batch["signal"].shape == (8, 32, 3) and batch["mask"].shape == (8, 2, 32)
    assert (batch["mask"].sum(-1) == 16).all()  # the toy masker's exact count
    rng = jax.random.PRNGKey(1)
    losses = []
    for _ in range(25):
        state, metrics = train_step(state, batch, rng)
        losses.append(float(metrics["loss"]))
        batch = next(batches)
    assert int(state.step) == 25 and np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < losses[0]  # it learns
    # The teacher is the EMA of the student: close to it, not equal.
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state.params["encoder"],
                        state.ema_params["encoder"])
    assert 0 < max(jax.tree.leaves(diff)) < 1
    features = d2v_jax.make_encoder(config, pool="mean")(state.params, batch["signal"])
    assert features.shape == (8, 32)  # a bare array goes to the record's input_key
    count = flops.step_flops(config)
    assert count.tokens == {"teacher": 32, "student": 16, "decoder": 32} and count.model > 0


@pytest.mark.slow  # the whole train loop: two compiled step variants and a checkpoint
def test_toy_modality_runs_in_the_train_loop(toy_config, tmp_path):
    config = toy_config
    with config.unlocked():
        config.train.num_steps = 6
    state = train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 6
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [5, 6] and all(np.isfinite(r["loss"]) for r in rows)
    restored = d2v_jax.restore_checkpoint(str(tmp_path), config)
    np.testing.assert_array_equal(restored.params["frontend"]["pos_embed"],
                                  state.params["frontend"]["pos_embed"])
