"""The EMA teacher: decay schedule and parameter update (SPEC section 4).

Pure functions: ``decay_at`` gives tau for an update count (Python int or traced
int under jit), indexed as fairseq does (``ema_update_count``); ``update`` moves
the teacher's parameters towards the student's, in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def decay_at(num_updates: int | jax.Array, *, start: float, end: float,
             anneal_steps: int | jax.Array) -> jax.Array:
    """EMA decay tau for the EMA step after update number ``num_updates`` (SPEC 4),
    a float32 scalar.

    ``num_updates`` counts the optimizer updates *including* the one just made,
    as fairseq's ``set_num_updates(num_updates)`` (its counter is incremented
    before the EMA step): the update that turns step 0 into step 1 uses
    ``num_updates = 1`` (`ema_update_count(step)`). Then
    ``end - (end - start) * (1 - n / anneal_steps)`` while ``n < anneal_steps``,
    else ``end``; ``anneal_steps <= 0`` means always ``end`` (fairseq skips the
    annealing when start == end). Written as the equal
    ``start + (end - start) * n / anneal_steps``, so n = 0 gives exactly
    ``float32(start)``. Branch-free (``jnp.where``), so ``num_updates`` may be traced.
    """
    step = jnp.asarray(num_updates, jnp.float32)
    anneal = jnp.asarray(anneal_steps, jnp.float32)
    start, end = jnp.float32(start), jnp.float32(end)
    frac = step / jnp.maximum(anneal, 1.0)  # safe denominator; unused when anneal <= 0
    annealing = (anneal > 0) & (step < anneal)
    return jnp.where(annealing, start + (end - start) * frac, end)


def ema_update_count(step: int | jax.Array) -> int | jax.Array:
    """The ``num_updates`` of `decay_at` for the update made at train step
    ``step`` (the state's counter before it is incremented): ``step + 1``."""
    return step + 1


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
