"""The data2vec train step: a pure `(state, batch, rng) -> (state, metrics)`.

1. Teacher: the model applied to the EMA parameters on the full input; its top-K
   block tensors become targets (`targets.make_targets`), under stop_gradient.
2. Student: the model applied to the parameters on the masked input(s); the
   loss is regressed at masked positions only (`losses.regression_loss`), plus
   the 2.0 CLS loss.
3. The optax update, then the EMA update of the teacher (`ema.update`), in float32.

Large batches: `optim.accum_steps = k` splits the batch into k micro-batches
inside the step (a `lax.scan`, one compiled micro-step); each micro-batch's loss
is divided by the masked count of the *whole* batch (SPEC 3), so the summed
gradient is exactly the big-batch gradient. With `axis_name` (the pmap and
shard_map paths of `parallel.py`) the same normalizers are `psum`-ed over the
devices and the gradients `psum`-ed, so every device applies the global update.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from d2v_jax import ema, losses, modalities, optim, targets
from d2v_jax.train_state import TrainState, ema_subtree, teacher_params

Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def compute_targets(model: nn.Module, tparams: Any, batch: Batch,
                    config: ml_collections.ConfigDict,
                    rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Teacher targets [B, N, D] (float32, no gradient) and the padding mask.
    `rng`: the step's key; the teacher gets the student's dropout key from it
    (a teacher that reads the student's dropped-out input uses it; the
    others run without dropout whatever it is)."""
    rngs = {} if rng is None else {"dropout": jax.random.split(rng)[0]}  # = student_loss's d_rng
    out = model.apply({"params": tparams}, batch, method="teacher", rngs=rngs)
    t = config.target
    y = targets.make_targets(out["layers"], top_k=t.top_k, layer_norm=t.layer_norm,
                             final_norm=t.final_norm, padding_mask=out["padding_mask"], eps=t.eps)
    return jax.lax.stop_gradient(y), out["padding_mask"]


def loss_normalizers(batch: Batch, axis_name: str | None = None) -> dict[str, jax.Array]:
    """Denominators of the loss over the whole (global) batch, SPEC 3, known
    before the forward pass (gradient accumulation needs them up front).

    `count`: the positions of the pipeline's mask (True = masked), which is the
    loss mask when the model masks no padding itself (image, text; audio whose
    masks avoid padded frames); `rows`: student rows B*M. With `axis_name`,
    summed over devices, so every device divides by the global count.
    """
    mask = jnp.asarray(batch["mask"], bool)
    norm = {"count": jnp.sum(mask, dtype=jnp.float32),
            "rows": jnp.float32(mask.shape[0] * mask.shape[1])}
    return norm if axis_name is None else jax.lax.psum(norm, axis_name)


def student_loss(model: nn.Module, params: Any, batch: Batch, y: jax.Array,
                 config: ml_collections.ConfigDict, rng: jax.Array, *,
                 norm: dict[str, jax.Array] | None = None, axis_name: str | None = None,
                 with_stats: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The data2vec objective for one batch given the teacher's targets `y`.

    The value is this batch's *share* of the loss of the global batch: masked
    sums divided by the global counts, so shares add up to the big-batch loss
    over devices and micro-batches (SPEC 3). The counts are `norm` (from
    `loss_normalizers`, for micro-batches), else the model's loss mask, `psum`-ed
    over `axis_name` when given (with neither: the plain masked mean). With
    `axis_name` the variance metrics are those of the global batch too.
    `with_stats=False` leaves out the statistics (pred/target variance, masked
    fraction): passes over [B*M, N, D] that only logging steps read.
    """
    d_rng, n_rng = jax.random.split(rng)
    out = model.apply({"params": params}, batch, method="student",
                      rngs={"dropout": d_rng, "noise": n_rng})
    pred, loss_mask = out["pred"], out["loss_mask"]
    clones = pred.shape[0] // y.shape[0]  # M students per teacher sample (SPEC 6)
    y_rep = jnp.repeat(y, clones, axis=0) if clones > 1 else y
    lc = config.loss
    if norm is None:
        norm = {"count": jnp.sum(loss_mask, dtype=jnp.float32), "rows": jnp.float32(pred.shape[0])}
        if axis_name is not None:
            norm = jax.lax.psum(norm, axis_name)
    # losses.regression_loss's masked mean, with the denominator of `norm`.
    terms = losses.regression_loss_terms(pred, y_rep, beta=lc.beta, scale=lc.scale)
    reg = jnp.sum(jnp.where(loss_mask, terms, 0.0)) / jnp.maximum(norm["count"], 1.0)
    loss, aux = reg, {"reg_loss": reg}
    if lc.cls_weight > 0:
        if out.get("cls") is None:
            raise ValueError("loss.cls_weight > 0 but this model has no CLS output")
        cls_target = jnp.mean(y, axis=1)  # mean over patches of the final targets
        if clones > 1:
            cls_target = jnp.repeat(cls_target, clones, axis=0)
        cls_loss = losses.cls_loss(out["cls"], cls_target, weight=lc.cls_weight,
                                   reduction=lc.cls_reduction, total_rows=norm["rows"],
                                   ref_rows=lc.get("cls_ref_rows"), beta=lc.beta, scale=lc.scale)
        loss = loss + cls_loss
        aux["cls_loss"] = cls_loss
    if with_stats:
        aux["pred_var"] = losses.compute_var(pred, loss_mask, axis_name=axis_name)
        aux["target_var"] = losses.compute_var(y_rep, loss_mask, axis_name=axis_name)
        frac = jnp.mean(loss_mask.astype(jnp.float32))
        aux["masked_frac"] = frac if axis_name is None else jax.lax.pmean(frac, axis_name)
    return loss, aux


# Metrics that are shares of the loss (summed over micro-batches and devices);
# the others are statistics, averaged over micro-batches.
ADDITIVE_METRICS = ("reg_loss", "cls_loss")


def _vary(tree: Any, axis_name: str | None) -> Any:
    """Marks replicated values as per-device inside shard_map (vma typing), so
    that `grad` gives this device's gradient and the psum below is the only
    reduction (shard_map would otherwise psum implicitly). pmap has no vma."""
    if axis_name is None:
        return tree

    def one(x):
        varying = getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", None)
        if varying is None or axis_name in varying:
            return x
        return jax.lax.pcast(x, axis_name, to="varying")

    return jax.tree.map(one, tree)


def split_micro_batches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...]; micro-batch j holds rows j, j+k, j+2k, ...

    Strided, not contiguous, so a batch sharded over devices on its first axis
    stays sharded the same way in every micro-batch (no data movement).
    """
    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"optim.accum_steps={k} does not divide the per-step batch "
                             f"of {x.shape[0]} (input shape {x.shape})")
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def compute_grads(model: nn.Module, params: Any, ema_params: Any, batch: Batch, rng: jax.Array,
                  config: ml_collections.ConfigDict, *, accum_steps: int = 1,
                  axis_name: str | None = None, batch_sharding: Any = None,
                  with_stats: bool = True):
    """(loss, aux, grads) of the global-batch loss (SPEC 3).

    With `accum_steps` = k > 1 the teacher and student run on k micro-batches in
    a `lax.scan` and the gradients are summed; each micro-batch draws its own
    dropout/noise keys. With `axis_name`, loss, loss-share metrics and
    gradients are `psum`-ed over the devices of that axis.
    """
    norm = loss_normalizers(batch, axis_name) if accum_steps > 1 else None
    tparams = teacher_params(params, ema_params, config)
    params = _vary(params, axis_name)

    def micro_step(mb, r):
        if batch_sharding is not None:
            mb = jax.lax.with_sharding_constraint(mb, batch_sharding)
        y_raw, padding_mask = compute_targets(model, tparams, mb, config, r)
        y = (targets.position_center(y_raw, padding_mask, axis_name=axis_name)
             if config.target.get("position_center", False) else y_raw)
        grad_fn = jax.value_and_grad(
            lambda p: student_loss(model, p, mb, y, config, r, norm=norm, axis_name=axis_name,
                                   with_stats=with_stats),
            has_aux=True)
        (loss, aux), grads = grad_fn(params)
        if with_stats:  # of the teacher's targets before any position centring
            aux["target_pos_share"] = losses.position_share(y_raw, padding_mask,
                                                            axis_name=axis_name)
        return loss, aux, grads

    if accum_steps == 1:
        loss, aux, grads = micro_step(batch, rng)
    else:
        micro = split_micro_batches(batch, accum_steps)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(micro_step, first, rng))
        zeros = _vary(zeros, axis_name)  # the carry must type-match the body's outputs

        def body(acc, xs):
            mb, i = xs
            out = micro_step(mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, acc, out), None

        (loss, aux, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
        aux = {k: v if k in ADDITIVE_METRICS else v / accum_steps for k, v in aux.items()}
    if axis_name is not None:
        loss, grads = jax.lax.psum((loss, grads), axis_name)
        # Statistics are already global (psum inside); pmean keeps their value
        # and marks them replicated.
        aux = {k: (jax.lax.psum if k in ADDITIVE_METRICS else jax.lax.pmean)(v, axis_name)
               for k, v in aux.items()}
    return loss, aux, grads


def make_train_step_fn(config: ml_collections.ConfigDict, *, model: nn.Module | None = None,
                       tx: optax.GradientTransformation | None = None,
                       schedule: optax.Schedule | None = None, axis_name: str | None = None,
                       batch_sharding: Any = None, with_stats: bool = True) -> StepFn:
    """The pure, un-jitted step. `rng` is a base key; the step folds in its count.

    `with_stats` (static): True adds the statistics a logged step writes
    (variances, target_pos_share, masked_frac, update and param norms); False
    keeps only what every step needs (loss, the loss shares, grad_norm for the
    non-finite guard, lr, tau). The train loop compiles both and runs the
    statistics variant on logging steps only.

    `axis_name`: run under pmap/shard_map with the batch split over that axis
    (see `parallel.py`); the update is the global one on every device.
    `batch_sharding`: a sharding each micro-batch is constrained to (jit path).
    """
    model = model or modalities.build_model(config)
    if tx is None or schedule is None:
        tx, schedule = optim.make_optimizer(config)
    e = config.ema
    accum_steps = optim.accum_steps(config)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:  # each device draws its own dropout / noise
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        loss, aux, grads = compute_grads(model, state.params, state.ema_params, batch, rng, config,
                                         accum_steps=accum_steps, axis_name=axis_name,
                                         batch_sharding=batch_sharding, with_stats=with_stats)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # SPEC 4: tau of fairseq's post-increment count (the update to step 1 uses n = 1).
        tau = ema.decay_at(ema.ema_update_count(state.step), start=e.start, end=e.end,
                           anneal_steps=e.anneal_steps)
        ema_params = ema.update(state.ema_params, ema_subtree(params, config), tau)

        metrics = dict(aux, loss=loss, lr=schedule(state.step), tau=tau,
                       grad_norm=optax.tree.norm(grads))
        if with_stats:
            metrics.update(update_norm=optax.tree.norm(updates),
                           param_norm=optax.tree.norm(params))
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_train_step(config: ml_collections.ConfigDict, **kwargs) -> StepFn:
    """The jitted step with the train state donated (updated in place)."""
    return jax.jit(make_train_step_fn(config, **kwargs), donate_argnums=(0,))
