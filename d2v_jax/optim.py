"""Optimizer and learning-rate schedule from `config.optim` (SPEC 7)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "constant", "tri_stage")
DECAY_SCOPES = ("all", "matrices")


def tri_stage_schedule(peak_lr: float, total_steps: int, phase_ratio: tuple[float, float, float],
                       init_lr_scale: float, final_lr_scale: float) -> optax.Schedule:
    """fairseq's `tri_stage` schedule (audio 1.0, SPEC 7).

    With w, h, d = int(total_steps * r) for the three `phase_ratio` entries:
    linear warm-up from `init_lr_scale * peak_lr` to `peak_lr` over w steps, hold
    at `peak_lr` for h steps, exponential decay to `final_lr_scale * peak_lr`
    over d steps (`peak * exp(-ln(1 / final_lr_scale) * s / d)` at step s of the
    stage), then constant at that final value.
    """
    if len(phase_ratio) != 3 or any(r < 0 for r in phase_ratio) \
            or abs(sum(phase_ratio) - 1.0) > 1e-6:
        raise ValueError(f"optim.phase_ratio={tuple(phase_ratio)}: expected 3 non-negative "
                         "ratios (warm-up, hold, decay) that add up to 1")
    if not 0 < final_lr_scale <= 1 or not 0 <= init_lr_scale <= 1:
        raise ValueError(f"optim.init_lr_scale={init_lr_scale} / final_lr_scale="
                         f"{final_lr_scale}: expected values in (0, 1]")
    warmup, hold, decay = (int(total_steps * r) for r in phase_ratio)
    if warmup + hold + decay < 1:
        raise ValueError(f"optim.phase_ratio={tuple(phase_ratio)} of train.num_steps="
                         f"{total_steps} gives no step")
    init_lr, final_lr = init_lr_scale * peak_lr, final_lr_scale * peak_lr
    rate = (peak_lr - init_lr) / warmup if warmup else 0.0
    decay_factor = -math.log(final_lr_scale) / max(decay, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        s_decay = step - warmup - hold
        return jnp.where(
            step < warmup, init_lr + rate * step,
            jnp.where(step < warmup + hold, peak_lr,
                      jnp.where(s_decay <= decay, peak_lr * jnp.exp(-decay_factor * s_decay),
                                final_lr)))

    return schedule


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """`optim.schedule`: `cosine` (linear warm-up from 0 to `optim.lr`, then cosine
    to `lr * end_lr_ratio` at `train.num_steps`), `constant` (warm-up, then `lr`),
    or `tri_stage` (`tri_stage_schedule` with `optim.phase_ratio`,
    `init_lr_scale`, `final_lr_scale`; `warmup_steps` is not used)."""
    o, total = config.optim, config.train.num_steps
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.lr, o.warmup_steps, max(total, o.warmup_steps + 1), o.lr * o.end_lr_ratio)
    if o.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1)), optax.constant_schedule(o.lr)],
            [o.warmup_steps])
    if o.schedule == "tri_stage":
        return tri_stage_schedule(o.lr, total, tuple(o.phase_ratio), o.init_lr_scale,
                                  o.final_lr_scale)
    raise ValueError(f"optim.schedule={o.schedule!r}; expected one of {SCHEDULES}")


# Modules built with nn.scan stack their params with a leading layer axis, so a
# per-layer LayerNorm scale is [L, D]: its own rank is one less than it looks.
SCANNED_MODULES = ("blocks",)


def decay_mask(params: Any, no_decay: tuple[str, ...] = (), *, scope: str = "matrices",
               decay_names: tuple[str, ...] = ()) -> Any:
    """True where weight decay applies (SPEC 7), one bool per parameter.

    `scope="matrices"` (fairseq's `composite` optimizer, BEiT): matrices and conv
    kernels (rank > 1 per layer) decay; biases, norms, tokens and other 1-D
    params do not. `scope="all"` (fairseq's plain `adam`): every parameter
    decays. Then a parameter whose path contains a name in `decay_names` decays
    (a token that is 1-D here but a [1, 1, D] tensor in the official model), and
    one whose path contains a name in `no_decay` does not (that wins).
    """
    if scope not in DECAY_SCOPES:
        raise ValueError(f"optim.decay_scope={scope!r}; expected one of {DECAY_SCOPES}")

    def wants_decay(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        name = "/".join(keys)
        ndim = leaf.ndim - sum(k in SCANNED_MODULES for k in keys)
        decay = scope == "all" or ndim > 1 or any(n in name for n in decay_names)
        return decay and not any(n in name for n in no_decay)

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
    """Gradient clipping (when `optim.clip_norm > 0`), then AdamW with the
    `decay_mask` of `optim.decay_scope`, `decay_names` and `no_decay`."""
    o = config.optim
    if o.name != "adamw":
        raise ValueError(f"optim.name={o.name!r}; only 'adamw' is implemented "
                         "(fairseq's Adam with weight decay is decoupled, i.e. AdamW)")
    schedule = make_schedule(config)
    scope = o.get("decay_scope", "matrices")
    decay_names, no_decay = tuple(o.get("decay_names", ())), tuple(o.no_decay)
    parts = []
    if o.clip_norm and o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=lambda p: decay_mask(p, no_decay, scope=scope,
                                                       decay_names=decay_names)))
    return optax.chain(*parts), schedule
