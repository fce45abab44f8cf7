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


def split_indices(order: jax.Array, num_keep: int) -> tuple[jax.Array, jax.Array]:
    """[R, T] sort keys (False / 0 = visible first) -> (keep [R, num_keep],
    removed [R, T - num_keep]): int positions, each sorted in increasing order.

    A stable argsort keeps equal keys in position order, so with a bool mask
    (True = removed) the visible positions come first, left to right; larger
    integer keys (e.g. 1 = padding, 2 = masked) go after smaller ones. Both
    halves are then sorted by position (a no-op for `keep` with a bool mask or
    right padding), so the scatters below may promise sorted, unique indices.
    """
    perm = jnp.argsort(order, axis=1, stable=True)
    return jnp.sort(perm[:, :num_keep], axis=1), jnp.sort(perm[:, num_keep:], axis=1)


def keep_indices(order: jax.Array, num_keep: int) -> jax.Array:
    """[R, T] sort keys -> [R, num_keep] kept positions, increasing (`split_indices`)."""
    return split_indices(order, num_keep)[0]


def _row_gather(x: jax.Array, idx: jax.Array, sorted_: bool) -> jax.Array:
    """x [T, ...] at idx [K] -> [K, ...] (one row; vmapped below)."""
    return x.at[idx].get(mode="promise_in_bounds", indices_are_sorted=sorted_)


def _row_set(full: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
    """full [T, ...] with values [K, ...] written at the unique, sorted idx [K]."""
    return full.at[idx].set(values, unique_indices=True, indices_are_sorted=True,
                            mode="promise_in_bounds")


def gather(x: jax.Array, keep: jax.Array, clones: int = 1) -> jax.Array:
    """x [R / clones, T, ...] at `keep` [R, K] -> [R, K, ...]; row r of `keep`
    reads row r // clones of `x`.

    `clones` > 1 gathers straight from the un-cloned input: the same values as
    gathering from `jnp.repeat(x, clones, axis=0)`, without materializing the
    clones, and the backward scatter-adds into x's [R / clones, T, ...] rather
    than a [R, T, ...] buffer. The M clones' indices of a sample are read as
    one row of M*K indices, so the gather is vmapped over the sample axis: its
    row axis is a *batching* dimension of the gather (and of its transpose, the
    scatter-add), which the SPMD partitioner keeps split over the batch
    devices. An explicit row index (x[r // M, keep[r]]) would be a general
    2-D gather that the partitioner cannot split: it all-gathers the inputs.
    """
    if x.shape[0] * clones != keep.shape[0]:
        raise ValueError(f"visible.gather: x has {x.shape[0]} rows x {clones} clones but keep "
                         f"has {keep.shape[0]} rows")
    k = keep.shape[1]
    # Indices come from an argsort of length T: always in bounds, so no clamping.
    # One clone's indices are sorted; M clones' concatenated are not.
    out = jax.vmap(_row_gather, in_axes=(0, 0, None))(
        x, keep.reshape(x.shape[0], clones * k), clones == 1)
    return out.reshape((keep.shape[0], k) + x.shape[2:])


def scatter_with_noise(h: jax.Array, keep: jax.Array, removed: jax.Array, std: float,
                       rng: jax.Array) -> jax.Array:
    """The decoder's input [R, T, D] (T = K + T - K): `h` [R, K, D] back at the
    positions `keep` [R, K], the positions `removed` [R, T - K] filled with
    N(0, std^2) (fairseq's `mask_noise_std`).

    Noise is drawn for the removed positions only (the kept ones would be
    overwritten). Both index sets are unique and sorted per row
    (`split_indices`), which the scatters promise: with unique indices the
    gradient w.r.t. `h` is a plain gather, not the id-scatter JAX builds to
    resolve colliding updates. Vmapped over rows, so the row axis is a batching
    dimension the partitioner keeps split (see `gather`).
    """
    length = keep.shape[1] + removed.shape[1]
    noise = std * jax.random.normal(rng, removed.shape + h.shape[-1:], h.dtype)
    full = jnp.zeros((h.shape[0], length, h.shape[-1]), h.dtype)
    full = jax.vmap(_row_set)(full, removed, noise)
    return jax.vmap(_row_set)(full, keep, h)
