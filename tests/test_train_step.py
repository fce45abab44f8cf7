"""The train step: teacher without gradient, loss at masked positions only,
the EMA update, and one compilation for repeated shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax import modalities, optim
from d2v_jax.config import load_config
from d2v_jax.train_state import teacher_params
from d2v_jax.train_step import compute_targets, make_train_step, make_train_step_fn, student_loss

from helpers import init_state


def setup(arg, batch_size=2, **overrides):
    config = load_config(f"experiments/image.py:{arg}", overrides)
    model = modalities.build_model(config)
    state = init_state(config, jax.random.PRNGKey(0), model=model)
    batch = modalities.dummy_batch(config, batch_size)
    rng = np.random.default_rng(0)
    batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
    for b in range(batch_size):
        for j in range(config.masking.num_clones):
            batch["mask"][b, j] = rng.permutation(batch["mask"][b, j])
    return config, model, state, batch


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["tiny_v1", "tiny_v2"])  # the digits configs differ in sizes only
def test_teacher_gets_no_gradient(arg):
    config, model, state, batch = setup(arg)

    def loss_of(params, ema_params):
        y, _ = compute_targets(model, teacher_params(params, ema_params, config), batch, config)
        return student_loss(model, params, batch, y, config, jax.random.PRNGKey(1))[0]

    # jit: one compilation instead of op-by-op dispatch through the scanned blocks.
    g_student, g_teacher = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(state.params,
                                                                       state.ema_params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
    assert float(optim_norm(g_student)) > 0.0


def optim_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["tiny_v1", "tiny_v2"])
def test_targets_at_unmasked_positions_do_not_change_the_loss(arg):
    config, model, state, batch = setup(arg, **{"loss.cls_weight": 0.0})
    batch["mask"][:] = batch["mask"][:, :1]  # same mask in every clone
    y, _ = jax.jit(lambda p, e: compute_targets(model, teacher_params(p, e, config), batch,
                                                config))(state.params, state.ema_params)
    loss = jax.jit(lambda y: student_loss(model, state.params, batch, y, config,
                                          jax.random.PRNGKey(1))[0])
    # positions unmasked in every clone
    unmasked_everywhere = ~batch["mask"].any(1)  # [B, N]
    assert unmasked_everywhere.any()
    y2 = jnp.where(unmasked_everywhere[..., None], y + 100.0, y)
    np.testing.assert_allclose(loss(y2), loss(y), rtol=1e-6)
    masked = batch["mask"].all(1)
    y3 = jnp.where(masked[..., None], y + 1.0, y)
    assert abs(float(loss(y3)) - float(loss(y))) > 1e-3


@pytest.mark.slow  # compiles a train step
def test_loss_equals_independent_recomputation_v2():
    """reg loss = mean over masked positions of sum_D (pred - y)^2 / sqrt(D), with
    targets repeated per clone; cls = 0.01 x (fairseq's student rows per GPU,
    loss.cls_ref_rows) x the mean over rows (SPEC 6: the local masked count over
    the global one)."""
    config, model, state, batch = setup("tiny_v2")
    y, _ = compute_targets(model, teacher_params(state.params, state.ema_params, config),
                           batch, config)
    rng = jax.random.PRNGKey(1)
    loss, aux = student_loss(model, state.params, batch, y, config, rng)
    d_rng, n_rng = jax.random.split(rng)
    out = model.apply({"params": state.params}, batch, method="student",
                      rngs={"dropout": d_rng, "noise": n_rng})
    pred, y_np = np.asarray(out["pred"], np.float64), np.asarray(y, np.float64)
    m = config.masking.num_clones
    d = pred.shape[-1]
    mask = batch["mask"].reshape(-1, batch["mask"].shape[-1])
    y_rep = np.repeat(y_np, m, axis=0)
    per = ((pred - y_rep) ** 2).sum(-1) / np.sqrt(d)
    reg = per[mask].mean()
    cls_t = np.repeat(y_np.mean(1), m, axis=0)
    per_row = ((np.asarray(out["cls"]) - cls_t) ** 2).sum(-1) / np.sqrt(d)
    cls = 0.01 * config.loss.cls_ref_rows * per_row.mean()
    np.testing.assert_allclose(aux["reg_loss"], reg, rtol=1e-5)
    np.testing.assert_allclose(aux["cls_loss"], cls, rtol=1e-5)
    np.testing.assert_allclose(loss, reg + cls, rtol=1e-5)


@pytest.mark.slow  # compiles a train step
@pytest.mark.parametrize("arg", ["tiny_v1", "tiny_v2"])
def test_step_applies_optax_update_then_ema(arg):
    config, model, state, batch = setup(arg, **{"optim.warmup_steps": 0})  # lr(0) > 0
    old_params = jax.tree.map(np.asarray, state.params)
    old_ema = jax.tree.map(np.asarray, state.ema_params)
    step = make_train_step_fn(config, model=model)
    new, metrics = jax.jit(step)(state, batch, jax.random.PRNGKey(5))
    assert int(new.step) == 1
    tau = float(metrics["tau"])
    # SPEC 4: the update that produces step 1 anneals with fairseq's n = 1.
    e = config.ema
    want = e.end - (e.end - e.start) * (1 - 1 / e.anneal_steps) if e.anneal_steps > 1 else e.end
    np.testing.assert_allclose(tau, want, rtol=1e-7)
    for k in new.ema_params:  # ema' = tau * ema + (1 - tau) * params'
        expect = jax.tree.map(lambda e, p: tau * e + (1 - tau) * np.asarray(p), old_ema[k],
                              new.params[k])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new.ema_params[k], expect)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), new.params, old_params)
    assert max(jax.tree.leaves(moved)) > 0
    for key in ("loss", "target_var", "pred_var", "lr", "tau", "grad_norm", "update_norm"):
        assert np.isfinite(float(metrics[key])), key


@pytest.mark.slow  # compiles a train step
def test_step_compiles_once_and_donates_state():
    config, model, state, batch = setup("tiny_v2")
    step = make_train_step(config, model=model)
    rng = jax.random.PRNGKey(0)
    for _ in range(3):
        old = state
        state, metrics = step(state, batch, rng)
    assert step._cache_size() == 1
    with pytest.raises(RuntimeError, match="deleted|donated"):
        np.asarray(jax.tree.leaves(old.params)[0])


# The official optimizers' weight-decay rules (SPEC 7), by the *official* tensor
# each of our leaves stands for, written from the official code rather than
# from optim.decay_mask's rank test:
# - fairseq `adam` (audio 1.0 / 2.0, text 1.0): every parameter decays.
# - fairseq `composite` (data2vec2.py): no decay where `len(p.shape) == 1`, the
#   name ends in `.bias`, or contains `alibi_scale`. The image CLS token is
#   `extra_tokens` [1, 1, D] and the text positions an embedding [T, D]: decay.
# - BEiT (optim_factory.get_parameter_groups): no decay for 1-D params, `.bias`,
#   and `no_weight_decay() = {pos_embed, cls_token}`; mask_token [1, 1, D] and
#   the relative position table [N, H] decay, layer-scale gammas [D] do not.
OFFICIAL_DECAY = {
    "adam": lambda leaf: True,
    "composite": lambda leaf: {"kernel": True, "embedding": True, "pos_embed": True,
                               "cls_token": True, "bias": False, "scale": False,
                               "alibi_scale": False}[leaf],
    "beit": lambda leaf: {"kernel": True, "mask_token": True,
                          "relative_position_bias_table": True, "bias": False,
                          "scale": False, "gamma_1": False, "gamma_2": False,
                          "cls_token": False}[leaf],
}


@pytest.mark.parametrize("experiment,arg,official", [
    ("image", "tiny_v1", "beit"), ("image", "tiny_v2", "composite"),
    ("audio", "tiny_v1", "adam"), ("audio", "tiny_v2", "adam"),
    ("text", "tiny_v1", "adam"), ("text", "tiny_v2", "composite")])
def test_weight_decay_scope_follows_the_official_optimizer(experiment, arg, official):
    overrides = {"model.vocab_size": 100} if experiment == "text" else {}
    config = load_config(f"experiments/{experiment}.py:{arg}", overrides)
    model = modalities.build_model(config)
    batch = modalities.dummy_batch(config, 1)
    # The student's path holds every parameter (the 2.0 decoder too); shapes only.
    params = jax.eval_shape(lambda: nn.unbox(model.init(
        {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1),
         "noise": jax.random.PRNGKey(2)}, batch, method="student")["params"]))
    o = config.optim
    got = optim.decay_mask(params, tuple(o.no_decay), scope=o.decay_scope,
                           decay_names=tuple(o.decay_names))
    rule = OFFICIAL_DECAY[official]
    for path, decays in jax.tree_util.tree_leaves_with_path(got):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        assert decays == rule(name.split("/")[-1]), (name, decays)
    with pytest.raises(ValueError, match="optim.decay_scope='some'"):
        optim.decay_mask(params, scope="some")