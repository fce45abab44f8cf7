"""Logical names -> mesh shardings, for parameters and for activations.

Parameters carry logical axis names (`nn.with_logical_partitioning`); a rule
table (`parallel.DEFAULT_RULES`) maps each name to mesh axes. Activations are
pinned the same way at a few points of every model (`constrain`): the batch
axis over the batch devices (`data` x `fsdp`), the model width whole. Without
these pins the SPMD partitioner is free to carry a parameter's FSDP split
(`embed` over `fsdp`) into the activations, which turns every block into
all-to-alls of activations: the opposite of what FSDP is for.

The pins act only while a jit over a mesh is being traced
(`activation_sharding`, entered by `parallel.ParallelPlan.compile`); on one
device, under pmap / shard_map (per-device programs) and at init they are the
identity, so the models stay plain functions.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, Any], ...]

# The residual stream [rows, length, width]: rows split, the rest whole.
BATCH = ("batch",)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "d2v_activation_sharding", default=None)


def mesh_spec(logical: P | tuple | None, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> P:
    """Logical PartitionSpec -> mesh PartitionSpec for an array of `shape`.

    A dimension whose size the mesh axes do not divide, or whose axes an earlier
    dimension already uses, stays replicated: the alternative would be padding or
    an invalid spec. Unknown logical names are an error naming them.
    """
    if logical is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; add it to parallel.DEFAULT_RULES "
                             f"or config.mesh.rules (known: {sorted(table)})")
        axes = table[name]
        axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While active (around the tracing of a jit over `mesh`), `constrain`
    pins activations by `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical: tuple = BATCH) -> jax.Array:
    """`x` constrained to the sharding that `logical` names (default: leading
    axis = batch, the rest replicated); the identity outside
    `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, mesh_spec(logical, x.shape, mesh, rules)))


def batch_local(fn: Callable[..., jax.Array], x: jax.Array, *whole: jax.Array) -> jax.Array:
    """`fn(x, *whole)`, computed by each device on its own rows of x [B, ...]
    with the `whole` arguments (weights) complete on every device: a
    `shard_map` over the batch devices while `activation_sharding` is active,
    a plain call otherwise. For the ops the SPMD partitioner cannot split by
    rows: a grouped convolution (`feature_group_count` > 1) makes it
    all-gather its input, forward and backward (XLA in jax 0.10; measured in
    docs/scaling.md). `fn` must map rows to rows (output [B, ...])."""
    active = _ACTIVE.get()
    if active is None:
        return fn(x, *whole)
    mesh, rules = active
    rows = mesh_spec(BATCH, x.shape, mesh, rules)
    if rows == P():  # rows not split (a batch the devices do not divide)
        return fn(x, *whole)
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows,) + (P(),) * len(whole),
                         out_specs=rows)(x, *whole)
