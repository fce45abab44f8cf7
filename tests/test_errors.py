"""Fault handling and bad input: every error names the step, field, path, file
or parameter that caused it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d2v_jax import checkpoint, guards, metrics, modalities, optim, train
from d2v_jax.config import load_config, validate

from helpers import IMAGE, image_folder_run, make_image_folder, pretrain_dataset, tiny_config


def _config(images, **extra):
    """The tiny image config on the `image_folder` fixture's folder, `extra` on top."""
    return tiny_config("image", **{**image_folder_run(images), **extra})


# An lr of 1e38 from step 2 on (step 1 is the 0-lr warm-up step): step 2's
# update is finite but puts the params near float32's max, so step 3's
# forward pass overflows. Steps 1 and 2 are checkpointed.
EXPLODE = {"optim.schedule": "constant", "optim.warmup_steps": 1, "optim.lr": 1e38,
           "train.checkpoint_every": 1, "train.keep_checkpoints": 5, "train.num_steps": 5}


@pytest.mark.slow  # a short train run
def test_nonfinite_stop_names_step_and_last_good_checkpoint(tmp_path, image_folder):
    workdir = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteError) as e:
        train.train_and_evaluate(_config(image_folder, **EXPLODE), workdir)
    msg = str(e.value)
    assert "at step 3" in msg, msg
    assert f"Last good checkpoint: {os.path.join(workdir, 'checkpoints')}/2" in msg, msg
    assert "train.nonfinite='skip'" in msg
    # The bad state was never saved; the named checkpoint is finite.
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [1, 2]
    params, _ = checkpoint.restore_params(workdir, step=2)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nonfinite_skip_keeps_the_old_state_inside_the_jitted_step():
    """train.nonfinite='skip': a select in the step, the state donated, no host sync."""
    state = train.TrainState(step=jnp.int32(4), params={"w": jnp.arange(3.0)},
                             ema_params={"w": jnp.ones(3)}, opt_state=(jnp.zeros(3),))

    def toy_step(state, batch, rng):  # a loss that is NaN when the batch says so
        loss = jnp.where(batch["bad"], jnp.nan, 1.0)
        grads = {"w": jnp.full(3, loss)}
        new = state.replace(step=state.step + 1, params={"w": state.params["w"] - grads["w"]},
                            ema_params={"w": state.ema_params["w"] * 0.5},
                            opt_state=(state.opt_state[0] + 1,))
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    step = jax.jit(train.guard_nonfinite(toy_step, "skip"), donate_argnums=(0,))
    state, m = step(state, {"bad": jnp.bool_(False)}, None)
    assert bool(m["finite"]) and int(state.step) == 5
    np.testing.assert_array_equal(state.params["w"], [-1.0, 0.0, 1.0])
    bad = jax.device_put(np.bool_(True))
    with jax.transfer_guard("disallow"):  # no host transfer: the decision is on device
        state, m = step(state, {"bad": bad}, None)
    assert not bool(m["finite"]) and int(state.step) == 6  # the count still advances
    np.testing.assert_array_equal(state.params["w"], [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(state.ema_params["w"], [0.5] * 3)
    np.testing.assert_array_equal(state.opt_state[0], [1.0] * 3)
    # Mode 'stop' passes the non-finite update through (the host stops the run).
    stop = jax.jit(train.guard_nonfinite(toy_step, "stop"))
    assert np.isnan(stop(state, {"bad": jnp.bool_(True)}, None)[0].params["w"]).all()
    with pytest.raises(ValueError, match="train.nonfinite='ignore'"):
        train.guard_nonfinite(toy_step, "ignore")


class _Manager:
    directory = "/runs/x/checkpoints"

    def wait_until_finished(self):
        pass

    def latest_step(self):
        return 2


def test_finite_checks_count_skips_and_name_the_checkpoint_on_stop():
    flags = {3: False, 4: True, 5: False}
    checks = guards.FiniteChecks("skip", _Manager())
    for step, ok in [(1, True), (2, True)] + sorted(flags.items()):
        checks.add(step, {"finite": np.bool_(ok), "loss": np.float32(1.0 if ok else np.nan),
                          "grad_norm": np.float32(1.0)})
    checks.check()
    assert checks.skipped == 2
    checks = guards.FiniteChecks("stop", _Manager())
    checks.add(1, {"finite": np.bool_(True), "loss": np.float32(1), "grad_norm": np.float32(1)})
    checks.add(2, {"finite": np.bool_(False), "loss": np.float32(np.inf), "grad_norm": np.float32(1)})
    with pytest.raises(train.NonFiniteError, match="at step 2: loss=inf"):
        checks.check()


def test_collapse_guard_warns_or_stops():
    config = load_config(f"{IMAGE}:tiny_v2")
    ok = {"target_var": 0.5, "pred_var": 0.5}
    assert train.collapse_check(config, 1000, ok) is None
    msg = train.collapse_check(config, 1000, {"target_var": 0.05, "pred_var": 0.5})
    assert msg == "step 1000: target_var 0.0500 < 0.1"
    assert "pred_var 0.0010 < 0.01" in train.collapse_check(config, 1000, {"target_var": 1, "pred_var": 1e-3})
    # Unit-variance targets that position alone explains: the positional collapse.
    msg = train.collapse_check(config, 1000, {**ok, "target_pos_share": 0.997})
    assert msg.startswith("step 1000: target_pos_share 0.997 > 0.9: position alone explains")
    assert train.collapse_check(config, 1000, {**ok, "target_pos_share": 0.4}) is None
    # Before collapse.after_step nothing is reported.
    assert train.collapse_check(config, config.collapse.after_step - 1, {"target_var": 0, "pred_var": 0}) is None


def test_collapse_stop_raises_from_the_logging_path(tmp_path):
    config = load_config(f"{IMAGE}:tiny_v2", {"collapse.action": "stop", "collapse.after_step": 0})
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    clock = {"step": 0, "time": 0.0, "samples": 0}
    scalars = {"loss": 1.0, "target_var": 0.01, "pred_var": 0.5, "finite": True}
    with pytest.raises(train.CollapseError, match=r"step 7: target_var 0.0100 < 0.1"):
        train._log(config, writer, train._progress(0, 10), clock, 0, 7, 14, scalars)
    writer.close()
    # The step's metrics are written before it stops, for the post-mortem.
    assert metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))[0]["target_var"] == pytest.approx(0.01)


@pytest.mark.parametrize("override, field", [
    ({"train.nonfinite": "ignore"}, "train.nonfinite"),
    ({"train.keep_every": -1}, "train.keep_every"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints"),
    ({"masking.ratio": 0.0}, "masking.ratio"),
    ({"model.patch_size": 5}, "model.image_size"),
    ({"target.top_k": 2}, "target.top_k"),  # > model.depth=1
])
def test_bad_config_names_the_field(image_folder, override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate(_config(image_folder, **override))


def test_misspelt_field_is_named(image_folder):
    with pytest.raises(KeyError, match=r"train\.nonfinte"):
        _config(image_folder, **{"train.nonfinte": "skip"})


def test_missing_and_empty_data_paths_are_named(tmp_path, image_folder):
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        pretrain_dataset(_config(image_folder, **{"data.path": missing}))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"no class folders under '{empty}'"):
        pretrain_dataset(_config(image_folder, **{"data.path": str(empty)}))
    (empty / "cats").mkdir()
    (empty / "cats" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"no images .* under"):
        pretrain_dataset(_config(image_folder, **{"data.path": str(empty)}))


def test_corrupt_image_file_is_named_or_replaced(tmp_path):
    """data.on_bad_sample='error': the batch that reads a truncated file raises
    naming it. 'skip': the file is replaced by the next one of the folder
    (003.png read twice), and the batch says which file it replaced."""
    root = make_image_folder(tmp_path / "bad", n=4)
    victim = os.path.join(root, "a", "002.png")
    with open(victim, "r+b") as f:
        f.truncate(20)
    config = _config(root, **{"data.batch_size": 4, "data.on_bad_sample": "error"})
    with pytest.raises(Exception, match="002.png"):
        next(iter(pretrain_dataset(config)))
    batch = next(iter(pretrain_dataset(_config(root, **{"data.batch_size": 4}))))
    assert batch["bad_samples"].tolist().count(1) == 1 and batch["bad_samples"].sum() == 1
    (entry,) = [e for e in batch["bad_log"] if e]
    assert json.loads(entry)[0][0] == victim and "cannot decode" in json.loads(entry)[0][1]
    # The replacement is 003.png with its own crop and masks (seeded by its
    # index): two identical rows.
    images = batch["image"].reshape(4, -1)
    same = [(i, j) for i in range(4) for j in range(i + 1, 4) if (images[i] == images[j]).all()]
    assert len(same) == 1 and (batch["mask"][same[0][0]] == batch["mask"][same[0][1]]).all()


@pytest.mark.slow
def test_incompatible_checkpoint_names_parameter_paths_and_shapes(tmp_path, image_folder):
    workdir = str(tmp_path / "run")
    small = _config(image_folder)
    model = modalities.build_model(small)
    tx, _ = optim.make_optimizer(small)
    manager = checkpoint.make_manager(workdir, small)
    checkpoint.save(manager, 1, train.init_train_state(small, model, tx, jax.random.PRNGKey(0)), small)
    manager.wait_until_finished()
    manager.close()

    wider = _config(image_folder, **{"model.dim": 48, "model.num_heads": 3})
    with pytest.raises(checkpoint.IncompatibleCheckpointError) as e:
        train.train_and_evaluate(wider, workdir)
    msg = str(e.value)
    assert os.path.join(workdir, "checkpoints", "1") in msg
    assert "params/frontend/patch_embed/kernel: checkpoint (4, 4, 1, 32) vs config (4, 4, 1, 48)" in msg, msg
    # The same check guards params-only restore.
    wider_model = modalities.build_model(wider)
    wider_tx, _ = optim.make_optimizer(wider)
    abstract = train.abstract_train_state(wider, wider_model, wider_tx).params
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"encoder/blocks/mlp/fc1/kernel: "
                       r"checkpoint \(1, 32, 128\) vs config \(1, 48, 192\)"):
        checkpoint.restore_params(workdir, abstract_params=abstract)
    # Refused before anything was written: no config.json describing the wider model.
    assert not os.path.exists(os.path.join(workdir, "config.json"))
