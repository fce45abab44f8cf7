"""Scale-out: the sharded, pmap and shard_map steps equal the 1-device step;
params are sharded as the rules say; gradient accumulation equals the big
batch; bf16 compute keeps float32 master params and EMA.

The 8-device checks run in ONE subprocess (this file as a script) with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX is imported,
since the pytest workers already imported JAX with one device; one test reads
its JSON report, so the compilations are shared and run once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, TINY_IMAGE, xla_env
from helpers import init_state as _init_state

# A tiny 2.0 model (decoder, CLS loss, 2 clones). Constant lr 0.1 from step 0 and
# Adam eps=1 make the first update ~ lr * g / (|g| + 1), proportional to the
# gradient, so the params check sees any gradient error (with the default eps
# Adam's first step is ~ lr * sign(g) and would hide it). Decoder noise is off
# because pmap / shard_map devices draw their own noise (the jit paths run the
# 1-device program, noise included).
OVERRIDES = {
    **TINY_IMAGE, "decoder.groups": 2, "masking.num_clones": 2, "data.batch_size": 8,
    "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.lr": 0.1, "optim.eps": 1.0,
    "decoder.mask_noise_std": 0.0,
}
METRICS = ("loss", "reg_loss", "cls_loss", "grad_norm", "update_norm", "param_norm",
           "pred_var", "target_var", "masked_frac")


def make_config(arg="tiny_v2", **overrides):
    from d2v_jax.config import load_config
    return load_config(os.path.join(ROOT, f"experiments/image.py:{arg}"), {**OVERRIDES, **overrides})


def make_batch(config, batch_size, seed=0):
    from d2v_jax import modalities
    batch = modalities.dummy_batch(config, batch_size)
    rng = np.random.default_rng(seed)
    batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
    for b in range(batch_size):
        for j in range(config.masking.num_clones):
            batch["mask"][b, j] = rng.permutation(batch["mask"][b, j])
    return batch


def init_state(config):
    """The train state, created by one jitted call (op-by-op init compiles every op)."""
    import jax
    return _init_state(config, jax.random.key(0))


def _max_diff(a, b):
    import jax
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _worker() -> dict:
    """Runs in the 8-device subprocess; returns what the test asserts on."""
    import jax
    import jax.numpy as jnp

    from d2v_jax import parallel
    from d2v_jax.train_step import make_train_step

    assert jax.device_count() == 8, jax.devices()
    config = make_config()
    batch = make_batch(config, 8)
    rng = jax.random.key(1)
    state0 = init_state(config)
    ref_state, ref_m = make_train_step(config)(jax.tree.map(jnp.copy, state0), batch, rng)
    ref_m = {k: float(ref_m[k]) for k in METRICS}
    report = {"ref": ref_m, "modes": {}}

    def record(name, state, m, extra=None):
        report["modes"][name] = dict(
            metrics={k: float(m[k]) for k in METRICS},
            params_diff=_max_diff(state.params, ref_state.params),
            ema_diff=_max_diff(state.ema_params, ref_state.ema_params),
            **(extra or {}))

    def kernel_info(tree):
        k = tree["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]
        return {"spec": [None if a is None else str(a) for a in k.sharding.spec],
                "shape": list(k.shape), "shard": list(k.addressable_shards[0].data.shape),
                "devices": len(k.sharding.device_set)}

    # Riders that must not change the numbers either: an explicit attention
    # implementation, and rematerialization of the scanned blocks.
    jit_modes = {"dp": {}, "fsdp": {"mesh.data": 1, "mesh.fsdp": -1, "model.attention_impl": "xla"},
                 "dp_x_fsdp": {"mesh.data": 2, "mesh.fsdp": -1},
                 "dp_accum2": {"optim.accum_steps": 2, "model.remat": "block"}}
    for name, kw in jit_modes.items():
        c = make_config(**kw)
        mesh = parallel.make_mesh(c)
        if name == "fsdp":  # born sharded: jit(create, out_shardings=rules)
            state, shardings = parallel.create_sharded_train_state(c, jax.random.key(0), mesh)
        else:  # the same values, moved onto the rules' shardings (one compile fewer)
            shardings = parallel.state_shardings(c, mesh)
            state = jax.device_put(jax.tree.map(jnp.copy, state0), shardings)  # donated below
        born = kernel_info(state.params)
        step = parallel.make_jit_train_step(c, mesh, shardings)
        gbatch = parallel.global_batch(batch, parallel.batch_sharding(mesh))
        image_shard = list(gbatch["image"].addressable_shards[0].data.shape)
        state, m = step(state, gbatch, rng)
        mu = state.opt_state[1][0].mu  # clip_by_global_norm, then adamw's ScaleByAdamState
        per_dev, total = parallel.device_bytes(state)
        record(name, state, m, {"born": born, "params": kernel_info(state.params),
                                "ema": kernel_info(state.ema_params), "mu": kernel_info(mu),
                                "image_shard": image_shard, "bytes": [per_dev, total],
                                "mesh": dict(mesh.shape)})

    c = make_config()
    state, m = parallel.make_pmap_train_step(c)(jax.tree.map(jnp.copy, state0), batch, rng)
    record("pmap", state, m)
    mesh = parallel.make_mesh(c)
    step = parallel.make_shard_map_train_step(c, mesh)
    state = jax.device_put(jax.tree.map(jnp.copy, state0), parallel.replicated_shardings(state0, mesh))
    state, m = step(state, parallel.global_batch(batch, jax.NamedSharding(mesh, jax.P("data"))), rng)
    record("shard_map", state, m)

    # Tensor parallel: the rule table alone (no step compiled), abstractly.
    c = make_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    sh = parallel.state_shardings(c, parallel.make_mesh(c))
    report["tensor_specs"] = {
        name: [None if a is None else str(a) for a in s.spec]
        for name, s in [("fc1", sh.params["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]),
                        ("fc2", sh.params["encoder"]["blocks"]["mlp"]["fc2"]["kernel"]),
                        ("qkv", sh.params["encoder"]["blocks"]["attn"]["qkv"]["kernel"]),
                        ("proj", sh.params["encoder"]["blocks"]["attn"]["proj"]["kernel"]),
                        ("cls_token", sh.params["frontend"]["cls_token"])]}
    return report


@pytest.fixture(scope="module")
def eight_device_report():
    env = xla_env(8)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the 8-device subprocess (eight_device_report)
def test_eight_device_steps_equal_one_device_step(eight_device_report):
    """DP, FSDP, DP x FSDP (jit + NamedSharding), DP with 2 micro-batches (and
    block remat), pmap and shard_map: loss, every metric and the updated params/EMA of one step
    equal the 1-device step within 1e-5 (float32)."""
    r = eight_device_report
    ref = r["ref"]
    assert set(r["modes"]) == {"dp", "fsdp", "dp_x_fsdp", "dp_accum2", "pmap", "shard_map"}
    for name, got in r["modes"].items():
        for k in METRICS:
            if name == "dp_accum2" and k in ("pred_var", "target_var"):
                continue  # statistics: the mean over micro-batches, by design
            assert abs(got["metrics"][k] - ref[k]) <= 1e-5 * max(1.0, abs(ref[k])), (name, k, got["metrics"][k], ref[k])
        assert got["params_diff"] < 1e-5, (name, got["params_diff"])
        assert got["ema_diff"] < 1e-5, (name, got["ema_diff"])
    # The step moved the params by far more than the tolerance, and by the
    # gradient: the comparison above is not trivially satisfied.
    assert ref["update_norm"] > 1e-2 and ref["grad_norm"] > 1e-2


@pytest.mark.slow  # the 8-device subprocess (eight_device_report)
def test_params_are_sharded_as_the_rules_say(eight_device_report):
    """fc1 kernel [layers, embed, mlp] = [1, 32, 128]: replicated under DP;
    `embed` split 8 ways under FSDP (born sharded, and so are EMA and Adam's
    moment); 4 ways under DP(2) x FSDP(4). The batch is split over data x fsdp."""
    m = eight_device_report["modes"]
    for part in ("born", "params", "ema", "mu"):
        assert m["dp"][part]["spec"] == [] and m["dp"][part]["shard"] == [1, 32, 128], part
        assert m["fsdp"][part]["spec"] == [None, "fsdp"], part
        assert m["fsdp"][part]["shard"] == [1, 4, 128], part
        assert m["dp_x_fsdp"][part]["shard"] == [1, 8, 128], part
    assert m["fsdp"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert m["dp_x_fsdp"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    for name in ("dp", "fsdp", "dp_x_fsdp"):
        assert m[name]["image_shard"] == [1, 32, 32, 1], name  # 8 images over 8 devices
    # Whole-state bytes per device: DP holds everything, FSDP a fraction of it.
    dp_per, dp_total = m["dp"]["bytes"]
    fsdp_per, fsdp_total = m["fsdp"]["bytes"]
    assert dp_per == dp_total == fsdp_total
    assert fsdp_per < 0.3 * fsdp_total, (fsdp_per, fsdp_total)
    t = eight_device_report["tensor_specs"]
    assert t["fc1"] == [None, "fsdp", "tensor"] and t["fc2"] == [None, "tensor", "fsdp"]
    # The fused q|k|v axis is whole (tensor splits heads through its view,
    # layers.QKVProjection); the output projection is row-parallel over heads.
    assert t["qkv"] == [None, "fsdp"] and t["proj"] == [None, "tensor", "fsdp"]
    assert t["cls_token"] == ["fsdp"]


@pytest.mark.slow  # 4 train-step compilations
def test_grad_accumulation_equals_big_batch_step():
    """4 micro-batches of 2 (a lax.scan inside the step, with full remat) == one
    batch of 8: loss, metrics and updated params within 1e-5 (1 device). data2vec 1.0 with random
    masks of 6..40 patches per image, so the micro-batches' masked counts differ
    and only normalizing by the whole batch's count gives the big-batch loss."""
    import jax

    from d2v_jax.train_step import make_train_step

    kw = {"masking.num_clones": 1}
    batch = make_batch(make_config("tiny_v1", **kw), 8, seed=3)
    rng = np.random.default_rng(4)
    n = batch["mask"].shape[-1]
    for b in range(8):
        batch["mask"][b, 0] = rng.permutation(np.arange(n) < rng.integers(6, 41))
    per_micro = batch["mask"].reshape(2, 4, n).sum(axis=(0, 2))  # micro-batch j = rows j, j+4
    assert len(set(per_micro.tolist())) > 1, per_micro
    results = []
    for k, remat in ((1, "none"), (4, "full")):  # remat must not change the numbers either
        config = make_config("tiny_v1", **kw, **{"optim.accum_steps": k, "model.remat": remat})
        state = init_state(config)
        state, m = make_train_step(config)(state, batch, jax.random.key(1))
        results.append((jax.device_get(state.params), {n: float(m[n]) for n in METRICS if n in m}))
    (p1, m1), (p4, m4) = results
    for name in ("loss", "reg_loss", "grad_norm", "update_norm", "param_norm", "masked_frac"):
        assert abs(m4[name] - m1[name]) <= 1e-5 * max(1.0, abs(m1[name])), (name, m4[name], m1[name])
    assert _max_diff(p4, p1) < 1e-5
    assert m1["update_norm"] > 1e-2
    with pytest.raises(ValueError, match="accum_steps=3"):
        make_train_step(make_config(**{"optim.accum_steps": 3}))


@pytest.mark.slow  # 2 train-step compilations
def test_bf16_compute_keeps_float32_master_params_and_ema():
    """model.dtype=bfloat16: activations are bf16, params / EMA / Adam moments
    stay float32 through a step, and the loss is close to the float32 one."""
    import jax
    import jax.numpy as jnp

    from d2v_jax import modalities
    from d2v_jax.train_step import make_train_step

    batch = make_batch(make_config(), 8, seed=5)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = make_config(**{"model.dtype": dtype})
        state = init_state(config)
        state, m = make_train_step(config)(state, batch, jax.random.key(1))
        losses[dtype] = float(m["loss"])
    floats = [x for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    out = jax.eval_shape(lambda p: modalities.build_model(config).apply(
        {"params": p}, batch, method="student",
        rngs={"dropout": jax.random.key(0), "noise": jax.random.key(0)}), state.params)
    assert out["pred"].dtype == jnp.bfloat16
    assert np.isfinite(losses["bfloat16"])
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.05 * abs(losses["float32"])
    assert losses["bfloat16"] != losses["float32"]  # bf16 really computed something else


def test_mesh_and_distributed_config_errors():
    """Bad mesh sizes and rules fail with messages naming the field; the
    multi-process environment is detected from SLURM / TPU / explicit vars."""
    from d2v_jax import parallel

    config = make_config(**{"mesh.data": 3, "mesh.fsdp": -1})
    with pytest.raises(ValueError, match="config.mesh.*8 devices"):
        parallel.mesh_shape(config, 8)
    assert parallel.mesh_shape(make_config(**{"mesh.data": 2, "mesh.fsdp": -1}), 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.mesh_shape(make_config(**{"mesh.fsdp": -1}), 8)
    with pytest.raises(ValueError, match="'model'.*not a mesh axis"):
        parallel.logical_rules(make_config(**{"mesh.rules": (("embed", "model"),)}))
    with pytest.raises(ValueError, match="parallel.mode='pmap'.*mesh.fsdp=2"):
        parallel.make_pmap_train_step(make_config(**{"mesh.fsdp": 2}))
    assert parallel.distributed_env({}) is None
    assert parallel.distributed_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert parallel.distributed_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16"}) == "slurm"
    assert parallel.distributed_env({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu"
    assert parallel.distributed_env({"JAX_COORDINATOR_ADDRESS": "h:1234"}) == "explicit"
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        parallel.maybe_initialize_distributed("auto", {"JAX_COORDINATOR_ADDRESS": "h:1"})
    assert parallel.maybe_initialize_distributed("auto", {}) is False


if __name__ == "__main__":
    print(json.dumps(_worker()))
