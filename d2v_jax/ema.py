"""The EMA teacher: decay schedule and parameter update (SPEC section 4).

Pure functions: ``decay_at`` gives tau for a step (Python int or traced int under
jit); ``update`` moves the teacher's parameters towards the student's, in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def decay_at(step: int | jax.Array, *, start: float, end: float,
             anneal_steps: int | jax.Array) -> jax.Array:
    """EMA decay tau at ``step`` (SPEC 4), a float32 scalar.

    ``end - (end - start) * (1 - step / anneal_steps)`` while ``step < anneal_steps``,
    then ``end``; ``anneal_steps <= 0`` means always ``end``. Written as the equal
    ``start + (end - start) * step / anneal_steps`` so step 0 gives exactly
    ``float32(start)``. Branch-free (``jnp.where``), so ``step`` may be traced.
    """
    step = jnp.asarray(step, jnp.float32)
    anneal = jnp.asarray(anneal_steps, jnp.float32)
    start, end = jnp.float32(start), jnp.float32(end)
    frac = step / jnp.maximum(anneal, 1.0)  # safe denominator; unused when anneal <= 0
    annealing = (anneal > 0) & (step < anneal)
    return jnp.where(annealing, start + (end - start) * frac, end)


def update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
    """One EMA step (SPEC 4): ``decay * ema + (1 - decay) * param`` per leaf.

    Computed in float32 and stored in each ema leaf's dtype, so a float32 teacher
    stays float32 when the student's params are bfloat16. The two trees must have
    the same structure.
    """
    decay = jnp.asarray(decay, jnp.float32)

    def one(e: jax.Array, p: jax.Array) -> jax.Array:
        e32 = jnp.asarray(e, jnp.float32)
        new = decay * e32 + (1.0 - decay) * jnp.asarray(p, jnp.float32)
        return new.astype(jnp.result_type(e))

    try:
        return jax.tree.map(one, ema_params, params)
    except ValueError as err:
        raise ValueError(
            "ema.update: ema_params and params trees differ (the EMA subtree must "
            f"match the student subtree it tracks): {err}") from err
