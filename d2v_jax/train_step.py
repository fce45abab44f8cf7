"""The data2vec train step: a pure `(state, batch, rng) -> (state, metrics)`.

1. Teacher: the model applied to the EMA parameters on the full input; its top-K
   block tensors become targets (`targets.make_targets`), under stop_gradient.
2. Student: the model applied to the parameters on the masked input(s); the
   loss is regressed at masked positions only (`losses.regression_loss`), plus
   the 2.0 CLS loss.
3. The optax update, then the EMA update of the teacher (`ema.update`), in float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from d2v_jax import ema, losses, models, optim, targets
from d2v_jax.train_state import TrainState, ema_subtree, teacher_params

Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def compute_targets(model: nn.Module, tparams: Any, batch: Batch,
                    config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array | None]:
    """Teacher targets [B, N, D] (float32, no gradient) and the padding mask."""
    out = model.apply({"params": tparams}, batch, method="teacher")
    t = config.target
    y = targets.make_targets(out["layers"], top_k=t.top_k, layer_norm=t.layer_norm,
                             final_norm=t.final_norm, padding_mask=out["padding_mask"], eps=t.eps)
    return jax.lax.stop_gradient(y), out["padding_mask"]


def student_loss(model: nn.Module, params: Any, batch: Batch, y: jax.Array,
                 config: ml_collections.ConfigDict, rng: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The data2vec objective for one batch given the teacher's targets `y`."""
    d_rng, n_rng = jax.random.split(rng)
    out = model.apply({"params": params}, batch, method="student",
                      rngs={"dropout": d_rng, "noise": n_rng})
    pred, loss_mask = out["pred"], out["loss_mask"]
    clones = pred.shape[0] // y.shape[0]  # M students per teacher sample (SPEC 6)
    y_rep = jnp.repeat(y, clones, axis=0) if clones > 1 else y
    lc = config.loss
    reg = losses.regression_loss(pred, y_rep, loss_mask, beta=lc.beta, scale=lc.scale)
    loss, aux = reg, {"reg_loss": reg}
    if lc.cls_weight > 0:
        if out.get("cls") is None:
            raise ValueError("loss.cls_weight > 0 but this model has no CLS output")
        cls_target = jnp.mean(y, axis=1)  # mean over patches of the final targets
        if clones > 1:
            cls_target = jnp.repeat(cls_target, clones, axis=0)
        per = losses.regression_loss_terms(out["cls"], cls_target, beta=lc.beta, scale=lc.scale)
        if lc.cls_reduction == "sum":
            cls_loss = jnp.sum(per)
        elif lc.cls_reduction == "mean":
            cls_loss = jnp.mean(per)
        else:
            raise ValueError(f"loss.cls_reduction={lc.cls_reduction!r}; expected 'sum' or 'mean'")
        cls_loss = lc.cls_weight * cls_loss
        loss = loss + cls_loss
        aux["cls_loss"] = cls_loss
    aux["pred_var"] = losses.compute_var(pred, loss_mask)
    aux["target_var"] = losses.compute_var(y_rep, loss_mask)
    aux["masked_frac"] = jnp.mean(loss_mask.astype(jnp.float32))
    return loss, aux


def make_train_step_fn(config: ml_collections.ConfigDict, *, model: nn.Module | None = None,
                       tx: optax.GradientTransformation | None = None,
                       schedule: optax.Schedule | None = None) -> StepFn:
    """The pure, un-jitted step. `rng` is a base key; the step folds in its count."""
    model = model or models.build_model(config)
    if tx is None or schedule is None:
        tx, schedule = optim.make_optimizer(config)
    e = config.ema

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        tparams = teacher_params(state.params, state.ema_params, config)
        y, _ = compute_targets(model, tparams, batch, config)

        grad_fn = jax.value_and_grad(
            lambda p: student_loss(model, p, batch, y, config, rng), has_aux=True)
        (loss, aux), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        tau = ema.decay_at(state.step, start=e.start, end=e.end, anneal_steps=e.anneal_steps)
        ema_params = ema.update(state.ema_params, ema_subtree(params, config), tau)

        metrics = dict(aux, loss=loss, lr=schedule(state.step), tau=tau,
                       grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                       param_norm=optax.tree.norm(params))
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_train_step(config: ml_collections.ConfigDict, **kwargs) -> StepFn:
    """The jitted step with the train state donated (updated in place)."""
    return jax.jit(make_train_step_fn(config, **kwargs), donate_argnums=(0,))
