"""Accelerator-performance properties checked on CPU (docs/performance.md
"Checked on CPU"): the compute dtype "auto", the bf16 step's matmuls, the
token selection's scatter/gather and its backward, and no DropPath op at rate 0.

Each test lowers (never compiles) the tiny step: StableHLO / jaxpr text is what
the accelerator would get, and lowering takes about a second.
"""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import AUDIO, IMAGE, TEXT, tiny_config

from d2v_jax import modalities
from d2v_jax.config import load_config, validate
from d2v_jax.models.layers import DTYPE_NAMES, REMAT_POLICIES, dtype_of, resolve_dtype
from d2v_jax.train_state import create_train_state
from d2v_jax.train_step import make_train_step_fn

# ----------------------------------------------------------------------------- model.dtype


def test_auto_dtype_resolves_per_backend():
    """"auto": bf16 where matmul units run it natively, f32 on CPU and on anything
    unknown; explicit names pass through; a bad name is an error naming the field."""
    assert resolve_dtype("auto", "cpu") == "float32"
    for backend in ("gpu", "cuda", "rocm", "tpu"):
        assert resolve_dtype("auto", backend) == "bfloat16", backend
    assert resolve_dtype("auto", "some_new_backend") == "float32"
    for name in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(name, "cpu") == name and resolve_dtype(name, "gpu") == name
    assert dtype_of("auto") == jnp.float32  # this test runs on CPU
    with pytest.raises(ValueError, match="model.dtype='bf16'"):
        resolve_dtype("bf16")
    config = tiny_config("image")
    config.model.dtype = "bf16"
    with pytest.raises(ValueError, match="model.dtype"):
        validate(config)
    assert "auto" in DTYPE_NAMES


def test_base_experiments_default_to_auto_and_tiny_pin_float32():
    for path, args in ((IMAGE, ("base_v1", "base_v2", "large_v2")), (AUDIO, ("base_v1", "base_v2")),
                       (TEXT, ("base_v1", "base_v2"))):
        for arg in args:
            assert load_config(f"{path}:{arg}").model.dtype == "auto", (path, arg)
        assert load_config(f"{path}:tiny_v2").model.dtype == "float32", path


def test_auto_is_resolved_when_the_model_is_built(monkeypatch):
    """The same config computes in bf16 when the backend says GPU, in f32 on CPU;
    the params stay f32 either way."""
    config = tiny_config("image", **{"model.dtype": "auto"})
    batch = modalities.dummy_batch(config, 2)
    rngs = {"dropout": jax.random.key(0), "noise": jax.random.key(0)}

    def shapes():
        model = modalities.build_model(config)
        params = jax.eval_shape(lambda: model.init(
            {"params": jax.random.key(0), **rngs}, batch, method="student"))["params"]
        out = jax.eval_shape(lambda p: model.apply({"params": p}, batch, method="student",
                                                   rngs=rngs), params)
        return params, out["pred"].dtype

    params, pred_dtype = shapes()
    assert pred_dtype == jnp.float32
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    params, pred_dtype = shapes()
    assert pred_dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


# The f32 matmuls (dot_general / convolution with an f32 operand) a bf16 step may
# keep, by the op's source name in the lowered HLO, with the reason. Norm
# statistics, the loss, the targets' instance/layer norms and the EMA have no
# matmul at all (reductions and elementwise ops, f32 by design), so they need no
# entry; the test checks that nothing else shows up.
F32_MATMUL_ALLOWED = {
    # jax.nn.dot_product_attention's XLA path computes the logits q.k^T with
    # preferred_element_type=float32 (bf16 operands, f32 accumulate); the backward
    # of that einsum takes the f32 logits' cotangent against bf16 q / k (dq, dk).
    # This is jax's library code; the fused cuDNN kernel (attention_impl=cudnn)
    # replaces the whole path on GPU.
    "attn/vmap(BTNH,BSNH->BNTS)/dot_general":
        "XLA attention backward: f32 logit cotangent x bf16 q/k (jax.nn.dot_product_attention)",
}

_MATMUL = re.compile(r"stablehlo\.(dot_general|convolution)\b.*?: \((tensor<[^>]*>), "
                     r"(tensor<[^>]*>)\) -> (tensor<[^>]*>)")


def _matmuls(hlo: str) -> list[tuple[str, str, str, str]]:
    """(operand, operand, result, source name) of every dot_general / convolution."""
    locs = dict(re.findall(r"^(#loc\d+) = (.*)$", hlo, re.MULTILINE))
    out = []
    for line in hlo.splitlines():
        m = _MATMUL.search(line)
        if not m:
            continue
        where = re.search(r"loc\((.*)\)\s*$", line)
        name = where.group(1) if where else ""
        for ref in re.findall(r"#loc\d+", name):  # resolve aliases one level deep
            name += " " + locs.get(ref, "")
        out.append((m.group(2), m.group(3), m.group(4), name))
    return out


def _lowered_step(modality: str, arg: str, batch_size: int = 2, **overrides) -> str:
    config = tiny_config(modality, arg, **overrides)
    if modality == "text" and config.model.get("vocab_size") is None:
        config.model.vocab_size = 300  # set by the tokenizer in a real run
    state = jax.eval_shape(lambda r: create_train_state(config, r), jax.random.key(0))
    batch = modalities.dummy_batch(config, batch_size)
    step = jax.jit(make_train_step_fn(config))
    return step.lower(state, batch, jax.random.key(1)).as_text(debug_info=True)


@pytest.mark.parametrize("modality,arg,overrides", [
    ("image", "tiny_v1", {}),
    # the recomputed forward of a remat policy adds no f32 matmul either
    ("image", "tiny_v1", {"model.remat": "save_bf16_dots"}),
    # the xla grouped conv is the base configs' decoder (the tiny ones use the dense form)
    ("image", "tiny_v2", {"decoder.conv_impl": "xla"}),
    pytest.param("audio", "tiny_v2", {}, marks=pytest.mark.slow),  # ~3.5 s to lower
    ("text", "tiny_v2", {}),
])
def test_bf16_step_has_no_f32_matmul_outside_the_allow_list(modality, arg, overrides):
    hlo = _lowered_step(modality, arg, **{"model.dtype": "bfloat16", **overrides})
    mm = _matmuls(hlo)
    bf16 = [m for m in mm if "bf16" in m[0] and "bf16" in m[1]]
    f32 = [m for m in mm if "xf32>" in m[0] or "xf32>" in m[1]]
    # forward + backward of every dense layer: the detector sees the step's matmuls
    assert len(bf16) >= 12, (len(bf16), len(mm))
    stray = [m for m in f32 if not any(k in m[3] for k in F32_MATMUL_ALLOWED)]
    assert not stray, "f32 matmuls outside the allow-list:\n" + "\n".join(map(str, stray))


# ----------------------------------------------------------------------------- token selection


def _np_reference(order, num_keep):
    """numpy, from SPEC 6: a row's encoder sees its num_keep positions of smallest
    key (ties by position), the decoder the full grid."""
    keep, removed = [], []
    for row in order:
        ranked = sorted(range(len(row)), key=lambda i: (row[i], i))
        keep.append(sorted(ranked[:num_keep]))
        removed.append(sorted(ranked[num_keep:]))
    return np.array(keep), np.array(removed)


@pytest.mark.parametrize("keys", ["bool", "int"])
def test_token_selection_matches_a_numpy_reference(keys):
    from d2v_jax.models import visible

    rng = np.random.default_rng(0)
    b, m, t, d, k = 3, 2, 10, 4, 6
    if keys == "bool":  # image / audio: True = removed; every row removes t - k
        order = np.stack([rng.permutation(np.arange(t) >= k) for _ in range(b * m)])
    else:  # text: 0 visible, 1 padding (right), 2 masked
        order = np.zeros((b * m, t), np.int32)
        for r in range(b * m):
            n = t - (r % 3)  # real tokens, then padding
            order[r, n:] = 1
            order[r, rng.choice(n, 3, replace=False)] = 2
    keep_ref, removed_ref = _np_reference(order.tolist(), k)
    keep, removed = visible.split_indices(jnp.asarray(order), k)
    np.testing.assert_array_equal(keep, keep_ref)
    np.testing.assert_array_equal(removed, removed_ref)

    x = rng.normal(size=(b, t, d)).astype(np.float32)
    x_rep = np.repeat(x, m, axis=0)  # the former repeat-then-gather
    want = np.stack([x_rep[r, keep_ref[r]] for r in range(b * m)])
    np.testing.assert_array_equal(visible.gather(jnp.asarray(x), keep, clones=m), want)
    np.testing.assert_array_equal(visible.gather(jnp.asarray(x_rep), keep), want)

    h = rng.normal(size=(b * m, k, d)).astype(np.float32)
    std, key = 0.5, jax.random.key(3)
    full = np.asarray(visible.scatter_with_noise(jnp.asarray(h), keep, removed, std, key))
    noise = np.asarray(std * jax.random.normal(key, (b * m, t - k, d)))  # drawn removed-only
    want = np.zeros((b * m, t, d), np.float32)
    for r in range(b * m):
        want[r, keep_ref[r]] = h[r]
        want[r, removed_ref[r]] = noise[r]
    np.testing.assert_allclose(full, want, rtol=0, atol=1e-7)


def _scatters(jaxpr) -> list[tuple[str, tuple]]:
    """(primitive, output shape) of every scatter* in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("scatter"):
            found.append((eqn.primitive.name, tuple(eqn.outvars[0].aval.shape)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _scatters(sub)
    return found


@pytest.mark.parametrize("modality", ["image", "text"])
def test_token_selection_backward_has_no_full_size_scatter(modality):
    """The student's gradient (image / text 2.0, 4 clones): the cloned [B*M, N, D] grid
    is scattered into only by the forward's two decoder-input writes (noise at
    the removed positions, encoder outputs at the kept ones). The backward adds
    none: with unique indices the gradient w.r.t. the encoder output is a gather
    (no id-scatter to resolve collisions), and the visible patches are gathered
    from the un-cloned patches, whose gradient scatter-adds into [B, N, D]."""
    b, m = 2, 4
    config = tiny_config(modality, **{"masking.num_clones": m})
    if modality == "text":
        config.model.vocab_size = 300  # set by the tokenizer in a real run
    model = modalities.build_model(config)
    batch = modalities.dummy_batch(config, b)
    rngs = {"dropout": jax.random.key(0), "noise": jax.random.key(0)}
    params = jax.eval_shape(lambda: model.init(
        {"params": jax.random.key(0), **rngs}, batch, method="student"))["params"]

    def loss(p):
        return jnp.sum(model.apply({"params": p}, batch, method="student", rngs=rngs)["pred"])

    found = _scatters(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)  # traced, not run
    grid, d = batch["mask"].shape[-1], config.model.dim
    full = [(name, s) for name, s in found if s[:2] == (b * m, grid)]
    assert full == [("scatter", (b * m, grid, d))] * 2, found
    assert ("scatter-add", (b, grid, d)) in found, found  # the un-cloned gather's gradient


# ----------------------------------------------------------------------------- DropPath at rate 0


def _primitives(jaxpr, counts):
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitives(sub, counts)
    return counts


@pytest.mark.parametrize("arg,other_draws", [
    ("tiny_v1", 0),
    ("tiny_v2", 1),  # the decoder's N(0, std) input noise at the removed positions
])
def test_no_drop_path_draw_at_rate_0(arg, other_draws):
    """The student's training forward draws random bits only for what needs them:
    none for DropPath at model.drop_path = 0 (the 2.0 recipes); at a rate > 0,
    two (one per residual branch of the scanned block)."""
    def random_bits(drop_path):
        config = tiny_config("image", arg, **{"model.drop_path": drop_path})
        model = modalities.build_model(config)
        batch = modalities.dummy_batch(config, 2)
        rngs = {"dropout": jax.random.key(0), "noise": jax.random.key(0)}
        params = jax.eval_shape(lambda: model.init(
            {"params": jax.random.key(0), **rngs}, batch, method="student"))["params"]
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, batch, method="student",
                                                     rngs=rngs))(params).jaxpr
        counts = _primitives(jaxpr, {})
        return counts.get("random_bits", 0) + counts.get("threefry2x32", 0)

    assert random_bits(0.0) == other_draws
    assert random_bits(0.1) == other_draws + 2  # two residual branches per block


# ----------------------------------------------------------------------------- statistics on logging steps only

STATS = {"pred_var", "target_var", "masked_frac", "target_pos_share", "update_norm", "param_norm"}


def _step_and_inputs(**overrides):
    config = tiny_config("image", **overrides)
    state = jax.eval_shape(lambda r: create_train_state(config, r), jax.random.key(0))
    batch = modalities.dummy_batch(config, 2)
    return config, state, batch


@pytest.mark.parametrize("accum", [1, 2])
def test_step_without_stats_leaves_out_only_the_statistics(accum):
    """with_stats=False (the non-logging steps): the same state update and the
    metrics every step needs (loss, grad_norm for the non-finite guard), none of
    the statistics. Traced, not compiled."""
    config, state, batch = _step_and_inputs(**{"optim.accum_steps": accum})
    out = {w: jax.eval_shape(make_train_step_fn(config, with_stats=w), state, batch,
                             jax.random.key(1)) for w in (True, False)}
    assert set(out[True][1]) - set(out[False][1]) == STATS
    assert {"loss", "grad_norm", "lr", "tau", "reg_loss"} <= set(out[False][1])
    assert jax.tree.structure(out[True][0]) == jax.tree.structure(out[False][0])


@pytest.mark.slow  # two step compilations
def test_step_without_stats_updates_the_state_identically():
    from helpers import init_state

    config, _, batch = _step_and_inputs()
    state = init_state(config, jax.random.key(0))
    steps = {w: jax.jit(make_train_step_fn(config, with_stats=w)) for w in (True, False)}
    # fewer reductions lowered: the statistics' passes are gone
    reduces = {w: f.lower(state, batch, jax.random.key(1)).as_text().count("stablehlo.reduce")
               for w, f in steps.items()}
    assert reduces[False] < reduces[True], reduces
    outs = {w: f(state, batch, jax.random.key(1)) for w, f in steps.items()}
    for a, b in zip(jax.tree.leaves(outs[True][0]), jax.tree.leaves(outs[False][0])):
        np.testing.assert_array_equal(a, b)
    for k in outs[False][1]:
        np.testing.assert_array_equal(outs[True][1][k], outs[False][1][k])


@pytest.mark.slow  # a 5-step train run (two step compilations)
def test_loop_runs_the_stats_variant_on_logging_steps_only(tmp_path, monkeypatch):
    """log_every=2 over 5 steps: steps 2, 4 and the last (5) run the statistics
    variant, 1 and 3 the other; each variant compiles once (the logging one ahead
    of time at step 1, so no samples/s window holds a compilation), and the
    logged rows carry the statistics."""
    from d2v_jax import metrics, train

    made, calls = {}, []

    def make_step(*args, with_stats=True, **kwargs):
        fn = real(*args, with_stats=with_stats, **kwargs)
        made[with_stats] = fn

        def call(*a):
            calls.append(with_stats)
            return fn(*a)
        call.lower = fn.lower  # the loop compiles the other variant ahead of time
        return call

    real = train.make_step
    monkeypatch.setattr(train, "make_step", make_step)
    config = load_config(f"{IMAGE}:tiny_v2", {
        "model.depth": 1, "target.top_k": 1, "decoder.layers": 1, "data.batch_size": 4,
        "masking.num_clones": 2, "train.log_every": 2, "train.checkpoint_every": 0,
        "data.prefetch": 1, "train.num_steps": 5})
    train.train_and_evaluate(config, str(tmp_path / "run"))
    assert calls == [False, True, False, True, True]
    assert made[True]._cache_size() == 1 and made[False]._cache_size() == 1
    rows = metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4, 5]
    assert all(STATS <= set(r) for r in rows), rows[0].keys()
    assert all(r["samples_per_sec"] > 0 for r in rows)


# ----------------------------------------------------------------------------- remat policies

# Matmuls each policy recomputes per block in the backward (a block has six:
# qkv, the attention logits q.k^T, probs @ v, proj, fc1, fc2), in a bf16 step.
RECOMPUTED_DOTS = {"none": 0, "save_dots": 0, "save_bf16_dots": 1,
                   "save_dots_no_batch": 2, "full": 6}


def _remat_encoder(remat: str, dtype, attn_dropout: float = 0.0):
    """(loss(params, x, bias), encoder, param shapes, x, bias) of a 2-block scanned
    `Encoder` at `model.remat=remat`, in training mode with drop path (and
    `attn_dropout`: the recomputed forward must redraw the same masks) and a
    per-head bias."""
    from d2v_jax.models.layers import Encoder

    enc = Encoder(depth=2, dim=32, num_heads=2, layer_norm_first=True, layer_scale_init=0.1,
                  drop_path=0.1, attn_dropout=attn_dropout, remat=remat, dtype=dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 17, 32)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(1, 2, 17, 17)), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    params = jax.eval_shape(lambda: enc.init(rngs, x, bias, deterministic=False))["params"]

    def loss(p, x, bias):
        h, layers = enc.apply({"params": p}, x, bias, deterministic=False,
                              rngs={"dropout": jax.random.key(2)})
        return jnp.sum(jnp.sin(h.astype(jnp.float32))) + jnp.sum(layers.astype(jnp.float32) ** 2)
    return loss, enc, params, x, bias


def test_remat_policies_save_and_recompute_what_they_say():
    """bf16 step: the residuals kept for the backward shrink from none to full,
    and the lowered gradient recomputes exactly the matmuls the policy drops
    (save_bf16_dots: the f32 attention logits only; save_dots_no_batch: the two
    batched attention einsums; full: all six)."""
    from jax._src.ad_checkpoint import saved_residuals

    kept, dots = {}, {}
    for remat in RECOMPUTED_DOTS:
        loss, _, params, x, bias = _remat_encoder(remat, jnp.bfloat16)
        kept[remat] = sum(int(np.prod(a.shape)) * a.dtype.itemsize
                          for a, _ in saved_residuals(loss, params, x, bias))
        # traced, not lowered: the recomputed forward sits in the remat sub-jaxpr
        jaxpr = jax.make_jaxpr(jax.grad(loss))(params, x, bias).jaxpr
        dots[remat] = _primitives(jaxpr, {})["dot_general"]
    assert {k: dots[k] - dots["none"] for k in dots} == RECOMPUTED_DOTS, dots
    assert kept["none"] > kept["save_dots"] > kept["save_bf16_dots"] > kept["full"], kept
    assert kept["save_dots"] > kept["save_dots_no_batch"] > kept["full"], kept
    assert REMAT_POLICIES["block"] is REMAT_POLICIES["save_dots"]  # the older name


def test_remat_policies_keep_loss_and_grads():
    """Recomputation changes what is stored, not the numbers (float32, with
    dropout and drop path drawn again in the recomputed forward)."""
    loss, enc, _, x, bias = _remat_encoder("none", jnp.float32, attn_dropout=0.1)
    params = jax.jit(lambda: enc.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                      x, bias, deterministic=False))()["params"]
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, x, bias)
    for remat in ("full", "save_dots", "save_dots_no_batch", "save_bf16_dots"):
        loss, *_ = _remat_encoder(remat, jnp.float32, attn_dropout=0.1)
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, x, bias)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, err_msg=remat)
        for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=remat)
