"""The data2vec 2.0 student's token selection, shared by every modality (SPEC 6).

The 2.0 student encodes only the visible tokens of each of its B*M rows, and
the conv decoder sees the full grid again: encoder outputs back in place, the
removed positions filled with N(0, std) noise. Every row keeps the same static
count `num_keep` (each modality's `masking.num_keep(config)`), so the shapes
under jit never depend on the masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_indices(order: jax.Array, num_keep: int) -> jax.Array:
    """[R, T] sort keys (False / 0 = visible first) -> [R, num_keep] int indices
    of the positions the encoder sees, in increasing position order.

    A stable argsort keeps equal keys in position order, so with a bool mask
    (True = removed) the visible positions come first, left to right; larger
    integer keys (e.g. 1 = padding, 2 = masked) go after smaller ones.
    """
    return jnp.argsort(order, axis=1, stable=True)[:, :num_keep]


def gather(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x [R, T, ...] at `keep` [R, K] -> [R, K, ...]."""
    return jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1)


def scatter_with_noise(h: jax.Array, keep: jax.Array, length: int, std: float,
                       rng: jax.Array) -> jax.Array:
    """The decoder's input [R, length, D]: `h` [R, K, D] back at the positions
    `keep` [R, K], every other position drawn from N(0, std^2) (fairseq's
    `mask_noise_std`)."""
    rows = h.shape[0]
    full = std * jax.random.normal(rng, (rows, length, h.shape[-1]), h.dtype)
    return full.at[jnp.arange(rows)[:, None], keep].set(h)
