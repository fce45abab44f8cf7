"""Checkpoints: retention, corrupt steps, params-only restore, --init_from, and
save on 8 devices (FSDP) -> restore on 1 device -> and back."""

import copy
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from d2v_jax import checkpoint, modalities, optim, train

from helpers import IMAGE, ROOT, image_folder_run, make_image_folder, tiny_config, xla_env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny config, its model/optimizer and two distinct train states."""
    data_path = make_image_folder(tmp_path_factory.mktemp("images"), n=8)
    config = tiny_config("image", **image_folder_run(data_path))
    model = modalities.build_model(config)
    tx, _ = optim.make_optimizer(config)
    state = train.init_train_state(config, model, tx, jax.random.PRNGKey(0))
    other = jax.tree.map(lambda x: x + 1, state)
    return config, model, tx, state, other


def _save(workdir, config, steps_states):
    manager = checkpoint.make_manager(workdir, config)
    for step, state in steps_states:
        checkpoint.save(manager, step, state, config)
    manager.wait_until_finished()
    manager.close()


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_keeps_latest_n_plus_every_m(tmp_path, setup):
    config = copy.deepcopy(setup[0])
    with config.unlocked():
        config.train.keep_checkpoints, config.train.keep_every = 2, 4
    tree = {"w": np.arange(3.0)}
    _save(str(tmp_path), config, [(s, tree) for s in range(1, 10)])
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept == [4, 8, 9]


@pytest.mark.parametrize("victim", ["data", "metadata"])
def test_corrupt_step_is_reported_and_previous_step_restored(tmp_path, setup, victim, caplog):
    config, model, tx, state, other = setup
    workdir = str(tmp_path)
    _save(workdir, config, [(1, state), (2, other)])
    step_dir = tmp_path / "checkpoints" / "2" / "state"
    if victim == "data":  # the largest array file of the newest step, cut in half
        files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "ocdbt.process_0") for f in fs]
        path = max(files, key=os.path.getsize)
    else:
        path = step_dir / "_METADATA"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)

    manager = checkpoint.make_manager(workdir, config)
    with caplog.at_level(logging.ERROR):
        restored, step = checkpoint.restore_latest(manager, train.abstract_train_state(config, model, tx))
    manager.close()
    assert step == 1
    assert _equal(restored, state)
    assert any(os.path.join("checkpoints", "2") in r.getMessage() and "unreadable" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    # Moved aside: a resumed run can save step 2 again.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2.corrupt"]


def test_restore_params_alone(tmp_path, setup):
    config, model, tx, state, other = setup
    _save(str(tmp_path), config, [(1, state), (2, other)])
    params, saved_config = checkpoint.restore_params(str(tmp_path))
    assert _equal(params, other.params) and jax.tree.structure(params) == jax.tree.structure(other.params)
    assert saved_config.model.dim == config.model.dim
    params, _ = checkpoint.restore_params(str(tmp_path / "checkpoints"), step=1)
    assert _equal(params, state.params)
    both, _ = checkpoint.restore_params(str(tmp_path), subtrees=("params", "ema_params"))
    assert _equal(both["ema_params"], other.ema_params)
    with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"step 7 .*have \[1, 2\]"):
        checkpoint.restore_params(str(tmp_path), step=7)
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="nowhere"):
        checkpoint.restore_params(str(tmp_path / "nowhere"))


def test_init_from_takes_params_and_teacher_not_optimizer(tmp_path, setup):
    config, model, tx, state, other = setup
    source, fresh = str(tmp_path / "source"), str(tmp_path / "new")
    trained = other.replace(step=other.step + 41)
    _save(source, config, [(42, trained)])
    manager = checkpoint.make_manager(fresh, config)
    got, origin = train.restore_or_init(config, manager, model, tx, jax.random.PRNGKey(0),
                                        init_from=source)
    assert "init_from" in origin and int(got.step) == 0
    assert _equal(got.params, trained.params) and _equal(got.ema_params, trained.ema_params)
    assert _equal(got.opt_state, state.opt_state)  # a fresh optimizer
    # A work dir that has a checkpoint resumes from it; --init_from is ignored.
    checkpoint.save(manager, 3, state, config)
    manager.wait_until_finished()
    got, origin = train.restore_or_init(config, manager, model, tx, jax.random.PRNGKey(0),
                                        init_from=source)
    manager.close()
    assert origin.startswith("resumed") and _equal(got, state)


_RESHARD = r'''
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from d2v_jax import checkpoint, modalities, optim, train
from d2v_jax.config import load_config

mode, src, dst, config_spec, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
config = load_config(config_spec, overrides)
model = modalities.build_model(config)
tx, _ = optim.make_optimizer(config)
n = jax.device_count()
shardings = None
if n > 1:  # FSDP: every leaf split over its first axis divisible by n
    mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    def fsdp(x):
        axis = next((i for i, d in enumerate(x.shape) if d % n == 0), None)
        return NamedSharding(mesh, P() if axis is None else P(*[None] * axis, "fsdp"))
    shardings = jax.tree.map(fsdp, train.abstract_train_state(config, model, tx))
abstract = train.abstract_train_state(config, model, tx, shardings)
out = {"devices": n}
if mode == "init":
    state = train.init_train_state(config, model, tx, jax.random.PRNGKey(3), shardings)
else:
    manager = checkpoint.make_manager(src, config)
    state, step = checkpoint.restore_latest(manager, abstract)
    manager.close()
    want = np.load(src + ".npz")
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    out["mismatched"] = [checkpoint.path_str(p) for p, x in leaves
                         if not np.array_equal(np.asarray(x), want[checkpoint.path_str(p)])]
    out["wrong_sharding"] = [checkpoint.path_str(p) for (p, x), a in zip(leaves, jax.tree.leaves(abstract))
                             if not x.sharding.is_equivalent_to(a.sharding, x.ndim)]
    state = jax.tree.map(lambda x: x * 2 + 1, state)  # new values for the way back
leaves = jax.tree_util.tree_flatten_with_path(state)[0]
out["sharded"] = sum(len(x.addressable_shards) > 1 and x.addressable_shards[0].data.shape != x.shape
                     for _, x in leaves)
out["leaves"] = len(leaves)
np.savez(dst + ".npz", **{checkpoint.path_str(p): np.asarray(x) for p, x in leaves})
manager = checkpoint.make_manager(dst, config)
checkpoint.save(manager, int(state.step), state, config)
manager.wait_until_finished()
manager.close()
print("RESULT", json.dumps(out))
'''


def _reshard(tmp_path, mode, src, dst, devices, overrides):
    env = xla_env(devices)
    proc = subprocess.run(
        [sys.executable, "-c", _RESHARD, mode, str(tmp_path / src), str(tmp_path / dst),
         f"{IMAGE}:tiny_v2", json.dumps(overrides)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow  # three 8- or 1-device subprocesses
def test_fsdp_8_devices_to_1_device_and_back(tmp_path):
    overrides = image_folder_run(make_image_folder(tmp_path / "images", n=4))
    saved = _reshard(tmp_path, "init", "-", "fsdp8", 8, overrides)
    assert saved["devices"] == 8 and saved["sharded"] >= saved["leaves"] // 2, saved
    one = _reshard(tmp_path, "restore", "fsdp8", "one", 1, overrides)
    assert one["devices"] == 1 and one["leaves"] == saved["leaves"]
    assert one["mismatched"] == [] and one["wrong_sharding"] == [], one
    back = _reshard(tmp_path, "restore", "one", "back", 8, overrides)
    assert back["devices"] == 8 and back["sharded"] == saved["sharded"]
    assert back["mismatched"] == [] and back["wrong_sharding"] == [], back
