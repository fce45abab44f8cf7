"""Optimizer and learning-rate schedule from `config.optim` (SPEC 7)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to `optim.lr`, then cosine to `lr * end_lr_ratio`
    at `train.num_steps` (or constant)."""
    o, total = config.optim, config.train.num_steps
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.lr, o.warmup_steps, max(total, o.warmup_steps + 1), o.lr * o.end_lr_ratio)
    if o.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1)), optax.constant_schedule(o.lr)],
            [o.warmup_steps])
    raise ValueError(f"optim.schedule={o.schedule!r}; expected 'cosine' or 'constant'")


# Modules built with nn.scan stack their params with a leading layer axis, so a
# per-layer LayerNorm scale is [L, D]: its own rank is one less than it looks.
SCANNED_MODULES = ("blocks",)


def decay_mask(params: Any, no_decay: tuple[str, ...] = ()) -> Any:
    """True where weight decay applies: matrices and conv kernels (per layer),
    never biases, norms, tokens or other 1-D params, nor parameters whose path
    names one of `no_decay`."""

    def wants_decay(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        ndim = leaf.ndim - sum(k in SCANNED_MODULES for k in keys)
        return ndim > 1 and not any(n in "/".join(keys) for n in no_decay)

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def accum_steps(config: ml_collections.ConfigDict) -> int:
    """`optim.accum_steps`: micro-batches per optimizer step (1 = none)."""
    k = config.optim.get("accum_steps", 1)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"optim.accum_steps={k!r}; expected an integer >= 1")
    if config.data.batch_size % k:
        raise ValueError(f"optim.accum_steps={k} does not divide data.batch_size="
                         f"{config.data.batch_size}")
    return k


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = config.optim
    if o.name != "adamw":
        raise ValueError(f"optim.name={o.name!r}; only 'adamw' is implemented "
                         "(fairseq's Adam with weight decay is decoupled, i.e. AdamW)")
    schedule = make_schedule(config)
    parts = []
    if o.clip_norm and o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=lambda p: decay_mask(p, tuple(o.no_decay))))
    return optax.chain(*parts), schedule
