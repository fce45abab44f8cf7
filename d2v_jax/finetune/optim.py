"""The fine-tune optimizer: AdamW with layer-wise lr decay, and its schedule;
for speech recognition also wav2vec 2.0's frozen conv feature extractor and
the encoder frozen for the first `optim.freeze_finetune_updates` updates."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from d2v_jax import optim


def _keys(path) -> list[str]:
    return [str(getattr(k, "key", k)) for k in path]


def layer_scales(params: Any, depth: int, decay: float, top: tuple[str, ...] = (),
                 frontend: bool = True, per_block: tuple[str, ...] = ()) -> Any:
    """Per-parameter lr multipliers (BEiT's layer-wise decay), one pytree.

    Scanned block params are stacked [L, ...]: their multiplier is an array
    [L, 1, ...] with decay^(L - i) for block i, so one update scales each layer's
    slice; so are front-end params stacked per block under a name in
    `per_block` (BEiT fine-tuning's per-block relative position tables).
    Front-end params get decay^(L + 1) (BEiT), or 1 with `frontend=False`
    (fairseq's data2vec 2.0 image fine-tune scales the blocks only);
    everything else (final norm, head, names in `top`) gets 1.
    """
    layer_scale = (decay ** (depth - np.arange(depth))).astype(np.float32)

    def scale(path, leaf):
        keys = _keys(path)
        if keys[0] != "backbone" or any(t in keys for t in top):
            return np.float32(1.0)
        stacked = any(t in keys for t in per_block)
        if stacked or any(k in optim.SCANNED_MODULES for k in keys):
            if leaf.shape[0] != depth:
                raise ValueError(f"scanned param {'/'.join(keys)} has leading axis "
                                 f"{leaf.shape[0]}, expected model.depth={depth}")
            return layer_scale.reshape((depth,) + (1,) * (leaf.ndim - 1))
        if "frontend" in keys:
            return np.float32(decay ** (depth + 1) if frontend else 1.0)
        return np.float32(1.0)

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by its entry of `scales` (broadcast)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def freeze_masks(params: Any, conv_frozen: bool) -> tuple[Any, Any]:
    """(never, until): bool trees. `never` marks the conv feature extractor's
    convolutions and their norms when `conv_frozen` (wav2vec 2.0 fine-tuning:
    feature_grad_mult 0; the feature LayerNorm and projection after them
    train); `until` marks the rest of the encoder (`backbone`), which trains
    only after `optim.freeze_finetune_updates` updates."""

    def never(path, leaf):
        keys = _keys(path)
        return bool(conv_frozen and keys[0] == "backbone" and "frontend" in keys
                    and any(k.startswith("conv_") for k in keys))

    never_tree = jax.tree_util.tree_map_with_path(never, params)
    until_tree = jax.tree_util.tree_map_with_path(lambda p, _: _keys(p)[0] == "backbone", params)
    return never_tree, until_tree


def hold(never: Any, until: Any, num_updates: int) -> optax.GradientTransformation:
    """Zeroes the leaves marked `never` always and those marked `until` for the
    first `num_updates` calls. Placed before Adam (its moments of a held
    parameter stay 0, as fairseq's Adam skips parameters without a gradient)
    and after it (no weight decay moves a held parameter)."""

    def init(params):
        del params
        return {"count": jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None):
        del params
        on = state["count"] >= num_updates
        scale = lambda u, n, t: u * jnp.where(n, 0.0, jnp.where(t, on, True)).astype(u.dtype)
        return (jax.tree.map(scale, updates, never, until),
                {"count": state["count"] + 1})

    return optax.GradientTransformation(init, update)


def make_schedule(config: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """`optim.schedule`: cosine, polynomial or constant after a linear warm-up
    of `warmup_steps` from `lr * warmup_init_ratio` (fairseq's cosine warms up
    from its min_lr), or fairseq's tri_stage (`phase_ratio`, `init_lr_scale`,
    `final_lr_scale` of the fine-tune's steps; d2v_jax.optim.tri_stage_schedule).
    cosine decays to `lr * end_lr_ratio` at the last step; polynomial is
    fairseq's polynomial_decay: (1 - progress)^power from lr to `lr *
    end_lr_ratio` over the steps after the warm-up (power 1: linear)."""
    o = config.optim
    if o.schedule == "tri_stage":
        return optim.tri_stage_schedule(o.lr, steps, tuple(o.phase_ratio), o.init_lr_scale,
                                        o.final_lr_scale)
    warmup = min(o.warmup_steps, max(steps - 1, 0))
    start = o.lr * float(o.get("warmup_init_ratio", 0.0))
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(start, o.lr, warmup, max(steps, warmup + 1),
                                                  o.lr * o.end_lr_ratio)
    if o.schedule == "polynomial":
        decay = optax.polynomial_schedule(o.lr, o.lr * o.end_lr_ratio,
                                          float(o.get("power", 1.0)), max(steps - warmup, 1))
        return optax.join_schedules([optax.linear_schedule(start, o.lr, max(warmup, 1)), decay],
                                    [warmup])
    return optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, max(warmup, 1)), optax.constant_schedule(o.lr)], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, params: Any, depth: int, steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (no decay on 1-D params) with layer-wise lr decay; for a linear
    probe the backbone's updates are exactly zero (and it keeps no Adam state)."""
    o = config.optim
    schedule = make_schedule(config, steps)
    parts = []
    frozen = None
    conv_frozen = "encoder" in config and config.encoder.get("feature_grad_mult", 1.0) == 0
    if conv_frozen or o.get("freeze_finetune_updates", 0) > 0:
        frozen = (*freeze_masks(params, conv_frozen), int(o.get("freeze_finetune_updates", 0)))
        parts.append(hold(*frozen))
    if o.clip_norm and o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    # Weight-decay scope (d2v_jax.optim.decay_mask): `matrices` for fairseq's
    # composite optimizer and BEiT, `all` for fairseq's plain adam (GLUE).
    scope, names = o.get("decay_scope", "matrices"), tuple(o.get("decay_names", ()))
    no_decay = tuple(o.get("no_decay", ()))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=lambda p: optim.decay_mask(p, no_decay, scope=scope,
                                                             decay_names=names)))
    if o.layer_decay < 1:
        parts.append(scale_by_tree(layer_scales(
            params, depth, o.layer_decay, tuple(o.layer_decay_top),
            frontend=bool(o.get("layer_decay_frontend", True)),
            per_block=tuple(o.get("layer_decay_per_block", ())))))
    if frozen is not None:
        parts.append(hold(*frozen))
    tx = optax.chain(*parts)
    if config.mode == "linear_probe":
        labels = {k: ("frozen" if k == "backbone" else "train") for k in params}
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
