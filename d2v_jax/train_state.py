"""The functional train state: student params, EMA teacher, optimizer state."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from d2v_jax import modalities, optim


@flax.struct.dataclass
class TrainState:
    """Everything that must survive a restart, as one pytree.

    `ema_params` is a sibling subtree, never seen by `grad` or the optimizer: it
    holds the teacher's copy of the subtrees listed by `ema_keys` (SPEC 4).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def ema_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Top-level subtrees the teacher keeps as EMA (the rest it shares)."""
    teacher = modalities.teacher_modules(config)
    shared = tuple(config.ema.shared)
    unknown = [k for k in shared if k not in teacher]
    if unknown:
        raise ValueError(f"ema.shared={shared!r} names {unknown}, which the {config.modality} "
                         f"teacher does not use; it uses {list(teacher)}")
    return tuple(k for k in teacher if k not in shared)


def ema_subtree(params: Any, config: ml_collections.ConfigDict) -> dict:
    return {k: params[k] for k in ema_keys(config)}


def teacher_params(params: Any, ema_params: Any, config: ml_collections.ConfigDict) -> dict:
    """The teacher's parameters: EMA subtrees, plus the student's shared ones."""
    out = {k: params[k] for k in modalities.teacher_modules(config) if k not in ema_params}
    out.update(ema_params)
    return out


def init_params(config: ml_collections.ConfigDict, rng: jax.Array, model: nn.Module | None = None):
    """Boxed (logically partitioned) parameters; `nn.unbox` for the arrays."""
    model = model or modalities.build_model(config)
    batch = modalities.dummy_batch(config)
    p_rng, d_rng, n_rng = jax.random.split(rng, 3)
    variables = model.init({"params": p_rng, "dropout": d_rng, "noise": n_rng}, batch,
                           method="student")
    return variables["params"]


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       tx: optax.GradientTransformation | None = None,
                       model: nn.Module | None = None) -> TrainState:
    """A fresh state: params from `rng`, the teacher a copy of the student."""
    if tx is None:
        tx, _ = optim.make_optimizer(config)
    params = nn.unbox(init_params(config, rng, model))
    # A real copy: the state is donated, and a buffer may be donated only once.
    ema_params = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True),
                              ema_subtree(params, config))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                      opt_state=tx.init(params))
