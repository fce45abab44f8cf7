"""The functional train state: student params, EMA teacher, optimizer state."""

from __future__ import annotations

import fnmatch
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from d2v_jax import modalities, optim


@flax.struct.dataclass
class TrainState:
    """Everything that must survive a restart, as one pytree.

    `ema_params` is a sibling tree, never seen by `grad` or the optimizer: it
    holds the teacher's copy of the parameters `ema_subtree` selects (SPEC 4).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def _shared_patterns(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(str(p).split("/")) for p in config.ema.shared)


def _matches(path: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """True when `pattern` (segments, shell wildcards allowed) is a prefix of `path`."""
    return len(path) >= len(pattern) and all(
        fnmatch.fnmatchcase(seg, pat) for seg, pat in zip(path, pattern))


def ema_subtree(params: Any, config: ml_collections.ConfigDict) -> dict:
    """The parameters the teacher keeps as an EMA (SPEC 4, config `ema.shared`).

    The teacher uses the subtrees `modalities.teacher_modules(config)`; of
    those, every parameter whose path matches an entry of `ema.shared` is the
    student's (shared, or in fairseq's words copied into the teacher each
    step); the rest is returned here, as a nested dict of the same layout.
    An entry is a '/'-separated path prefix whose segments may use shell
    wildcards: "frontend" (a whole subtree), "context/pos_conv*" (the audio
    positional convs: data2vec 1.0 `ema_layers_only`). An entry that matches
    nothing is an error (a typo would silently put a module under EMA).
    """
    teacher = modalities.teacher_modules(config)
    patterns = _shared_patterns(config)
    flat = traverse_util.flatten_dict({k: params[k] for k in teacher if k in params})
    used = {p: False for p in patterns}
    keep = {}
    for path, leaf in flat.items():
        hit = [p for p in patterns if _matches(path, p)]
        for p in hit:
            used[p] = True
        if not hit:
            keep[path] = leaf
    unused = ["/".join(p) for p, u in used.items() if not u]
    if unused:
        raise ValueError(
            f"ema.shared={tuple(config.ema.shared)!r}: {unused} match no parameter that the "
            f"{config.modality} teacher uses; its subtrees are {list(teacher)} (paths like "
            "'frontend' or 'context/pos_conv*')")
    return traverse_util.unflatten_dict(keep)


def ema_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Top-level subtrees holding EMA parameters (whole or in part)."""
    teacher = modalities.teacher_modules(config)
    patterns = _shared_patterns(config)
    unknown = [p[0] for p in patterns if not any(fnmatch.fnmatchcase(k, p[0]) for k in teacher)]
    if unknown:
        raise ValueError(f"ema.shared={tuple(config.ema.shared)!r} names {unknown}, which the "
                         f"{config.modality} teacher does not use; it uses {list(teacher)}")
    whole = {p[0] for p in patterns if len(p) == 1}
    return tuple(k for k in teacher if not any(fnmatch.fnmatchcase(k, w) for w in whole))


def teacher_params(params: Any, ema_params: Any, config: ml_collections.ConfigDict) -> dict:
    """The teacher's parameters: the student's teacher subtrees with every EMA
    parameter (`ema_params`, a partial tree of the same layout) put in place."""
    teacher = modalities.teacher_modules(config)
    flat = traverse_util.flatten_dict({k: params[k] for k in teacher if k in params})
    flat.update(traverse_util.flatten_dict(dict(ema_params)))
    return traverse_util.unflatten_dict(flat)


def teacher_view(params: Any, ema_params: Any, config: ml_collections.ConfigDict) -> dict:
    """The whole parameter tree as the teacher sees it: `params` with
    `teacher_params` in place of its teacher subtrees (modules the teacher does
    not use, e.g. a 2.0 decoder, stay the student's)."""
    return {**params, **teacher_params(params, ema_params, config)}


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
    """A fresh state: params from `rng`, the teacher a copy of the student.

    Compiled as one program: run op by op, a model's init is a couple of hundred
    tiny compilations (8 s for the tiny ViT on a CPU, against under 1 s jitted).
    The same random draws either way (jax's counter-based RNG)."""
    if tx is None:
        tx, _ = optim.make_optimizer(config)
    return jax.jit(lambda r: _fresh_state(config, r, tx, model))(rng)


def _fresh_state(config, rng, tx, model) -> TrainState:
    params = nn.unbox(init_params(config, rng, model))
    # A real copy: the state is donated, and a buffer may be donated only once.
    ema_params = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True),
                              ema_subtree(params, config))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                      opt_state=tx.init(params))
