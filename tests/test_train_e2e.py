"""End to end: the train loop's outputs, resume, and the CLI's config errors."""

import json
import os
import time

import jax
import ml_collections
import numpy as np
import pytest

from d2v_jax import metrics, probe, train
from d2v_jax.config import load_config, validate
from d2v_jax.train import train_and_evaluate

from helpers import IMAGE as EXPERIMENT

SMALL = {
    "model.depth": 2, "target.top_k": 2, "decoder.layers": 1, "data.batch_size": 8,
    "masking.num_clones": 2, "train.log_every": 2, "train.checkpoint_every": 2,
    "data.prefetch": 1,
    # The online probe on a small split of mnist_5k at every logged step.
    "probe.every": 2, "probe.num_train": 60, "probe.num_eval": 30, "probe.k": 5,
}


def _config(num_steps):
    return load_config(f"{EXPERIMENT}:tiny_v2", {**SMALL, "train.num_steps": num_steps})


@pytest.mark.slow  # two short train runs
def test_train_writes_metrics_plot_checkpoints_and_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    state = train_and_evaluate(_config(4), workdir)
    assert int(state.step) == 4
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        for key in ("loss", "samples_per_sec", "target_var", "pred_var", "lr", "tau", "grad_norm"):
            assert np.isfinite(r[key]), key
        assert r["samples_per_sec"] > 0
    assert os.path.getsize(os.path.join(workdir, "loss.png")) > 1000
    # The online probe ran at both logged steps; its step-4 numbers are the
    # teacher of that step: the offline probe of the checkpoint computes the same.
    for r in rows:
        assert 0.0 <= r["probe_knn"] <= 1.0 and 0.0 <= r["probe_linear"] <= 1.0
    section = ml_collections.ConfigDict(_config(4).probe.to_dict())
    offline = probe.run_offline(workdir, section, step=4)
    assert offline["probe_knn"] == pytest.approx(rows[-1]["probe_knn"])
    assert offline["probe_linear"] == pytest.approx(rows[-1]["probe_linear"])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [2, 4]  # keep_checkpoints = 2
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 4

    # A longer run in the same workdir resumes from step 4 and logs only new steps.
    resumed = train_and_evaluate(_config(6), workdir)
    assert int(resumed.step) == 6
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4, 6]
    # The restored params were trained on: they differ from the step-4 ones.
    before = jax.tree.leaves(state.params)
    after = jax.tree.leaves(resumed.params)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("override, field", [
    ({"model.image_size": 30}, "model.image_size"),
    ({"target.top_k": 9}, "target.top_k"),
    ({"masking.ratio": 1.0}, "masking.ratio"),
    ({"model.num_heads": 3}, "model.num_heads"),
    ({"masking.kind": "block"}, "masking.kind"),
])
def test_validate_names_the_impossible_field(override, field):
    config = load_config(f"{EXPERIMENT}:tiny_v2", override)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate(config)


def test_load_config_rejects_misspelt_field():
    with pytest.raises(KeyError, match="model.dimm"):
        load_config(f"{EXPERIMENT}:tiny_v2", {"model.dimm": 8})
    with pytest.raises(ValueError, match="size in"):
        load_config(f"{EXPERIMENT}:huge_v3")


@pytest.mark.slow  # python -m d2v_jax.train
def test_cli_rejects_unknown_field(tmp_path, cli):
    run = cli("train", f"--config={EXPERIMENT}:tiny_v2", f"--workdir={tmp_path}",
              "--config.model.dimm=8", timeout=120)
    assert run.returncode != 0
    assert "dimm" in run.stderr


def test_samples_per_sec_counts_the_rows_each_step_was_fed(tmp_path):
    """A token-budget batcher (audio data.max_tokens) feeds each length bucket
    its own number of rows: samples/s is the rows seen between two logged steps
    over their time, not data.batch_size x steps."""
    config = _config(10)
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    now = time.perf_counter()
    clock = {"step": 2, "time": now - 2.0, "samples": 30}
    scalars = {"loss": 1.0, "target_var": 1.0, "pred_var": 1.0, "finite": True}
    # steps 3 and 4 were fed 64 + 40 rows (data.batch_size is 2 here)
    out = train._log(config, writer, train._progress(0, 10), clock, 0, 4, 134, scalars)
    writer.close()
    assert out["samples_per_sec"] == pytest.approx(104 / 2.0, rel=0.05)
    assert clock == {"step": 4, "time": pytest.approx(now, abs=1.0), "samples": 134}
