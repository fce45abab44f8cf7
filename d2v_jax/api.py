"""The programmatic API: everything a user needs to drive pretraining from Python.

    import jax, d2v_jax
    config = d2v_jax.load_config("experiments/image.py:tiny_v2")
    state = d2v_jax.create_train_state(config, jax.random.PRNGKey(config.seed))
    train_step = d2v_jax.make_train_step(config)          # jitted, state donated
    batches = iter(d2v_jax.make_dataset(config))
    for _ in range(config.train.num_steps):
        state, metrics = train_step(state, next(batches), rng)
    features = d2v_jax.make_encoder(config, pool="mean")(state.params, images)

`docs/api.md` walks through it; a test executes that page as written.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from d2v_jax.data import bad_samples
from d2v_jax import checkpoint, modalities
from d2v_jax.config import load_config, validate
from d2v_jax.train_state import TrainState, create_train_state
from d2v_jax.train_step import make_train_step

POOLS = ("none", "mean", "cls")

__all__ = [
    "POOLS", "TrainState", "create_train_state", "encode", "load_config", "load_eval_data",
    "make_dataset", "make_encoder", "make_train_step", "restore_checkpoint", "save_checkpoint",
]


def make_dataset(config: ml_collections.ConfigDict, **kwargs):
    """The endless pretraining batches for this process (a grain IterDataset).

    Each batch is a dict of numpy arrays with static shapes, masks included (for
    images: "image" [b,S,S,C], "mask" [b,M,N], "label", "index"). `kwargs` go to
    the modality's pipeline (e.g. `process_index`, `process_count`, `source`).
    """
    validate(config)
    # The train loop's own pipeline also carries which unreadable samples it
    # replaced (host-side fields, data/bad_samples.py); a user's loop gets the
    # model's batch alone.
    dataset = modalities.get(config).pretrain_dataset(config, **kwargs)
    return dataset.map(lambda batch: bad_samples.host_fields(batch)[0])


def _as_batch(config: ml_collections.ConfigDict, inputs: Any) -> Mapping[str, Any]:
    if isinstance(inputs, Mapping):
        return inputs
    key = modalities.get(config).input_key
    if key is not None:
        return {key: inputs}
    raise TypeError(f"encode: pass a batch dict for modality {config.modality!r} "
                    f"(as the data pipeline yields it), got {type(inputs).__name__}")


def make_encoder(config: ml_collections.ConfigDict, pool: str = "none"
                 ) -> Callable[[Any, Any], jax.Array]:
    """A jitted `encode(params, inputs)` -> representations of the full input.

    `params` are the student's (`state.params`) or the teacher's
    (`teacher_params(...)` of the EMA subtrees); `inputs` is a batch dict as the
    data pipeline yields it, or for images an array [B,S,S,C]: uint8 pixels
    (normalized on device with `config.data.mean/std`, as `load_eval_data`
    gives them) or floats already normalized. `pool`:
    "none" -> final hidden states [B,T,D]; "cls" -> the CLS position [B,D]
    (models whose sequence starts with one); "mean" -> the average over
    non-CLS, non-padded positions [B,D].
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}; expected one of {POOLS}")
    model = modalities.build_model(config)
    cls_first = bool(getattr(model, "cls_first", False))
    if pool == "cls" and not cls_first:
        raise ValueError(f"pool='cls': the {config.modality} model has no CLS position")

    @jax.jit
    def encode_fn(params, inputs):
        batch = _as_batch(config, inputs)
        h = model.apply({"params": params}, batch, method="encode")
        if pool == "none":
            return h
        if pool == "cls":
            return h[:, 0]
        keep = jnp.ones(h.shape[:2], h.dtype)
        if batch.get("padding_mask") is not None:
            keep = keep * (~batch["padding_mask"]).astype(h.dtype)
        if cls_first:
            keep = keep.at[:, 0].set(0)
        return jnp.einsum("btd,bt->bd", h, keep) / jnp.maximum(keep.sum(1, keepdims=True), 1)

    return encode_fn


@functools.lru_cache(maxsize=8)
def _cached_encoder(config_json: str, pool: str):
    return make_encoder(ml_collections.ConfigDict(json.loads(config_json)), pool)


def encode(params: Any, inputs: Any, *, config: ml_collections.ConfigDict,
           pool: str = "none") -> jax.Array:
    """`make_encoder(config, pool)(params, inputs)`, with the compiled encoder cached."""
    return _cached_encoder(config.to_json(), pool)(params, inputs)


def load_eval_data(config: ml_collections.ConfigDict, limit: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of the config's labeled data, preprocessed deterministically
    (no crops, no masks), in source order: images [n,S,S,C] uint8, labels [n]."""
    eval_data = modalities.get(config).eval_data
    if eval_data is None:
        raise NotImplementedError(f"load_eval_data: the {config.modality!r} modality has no "
                                  "eval_data (its batches are dicts: use make_dataset)")
    return eval_data(config, limit)


def save_checkpoint(workdir: str, state: TrainState, config: ml_collections.ConfigDict) -> str:
    """Saves `state` (and `config`) under `workdir/checkpoints/<step>`; waits for
    the write to finish and returns that directory."""
    manager = checkpoint.make_manager(workdir, config)
    step = int(jax.device_get(state.step))
    checkpoint.save(manager, step, state, config)
    checkpoint.wait(manager, step)
    manager.close()
    return os.path.join(checkpoint.checkpoint_dir(workdir), str(step))


def restore_checkpoint(workdir: str, config: ml_collections.ConfigDict, step: int | None = None
                       ) -> TrainState:
    """The TrainState saved under `workdir` (latest step unless `step`), restored
    onto the structure `config` builds. Raises FileNotFoundError if none."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    template = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(0))))
    manager = checkpoint.make_manager(workdir, config)
    try:
        state = checkpoint.restore(manager, template, step)
    finally:
        manager.close()
    if state is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoint.checkpoint_dir(workdir)}")
    return state
