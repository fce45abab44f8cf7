"""Orbax checkpoints of the whole TrainState (and the config it ran with).

Saves are asynchronous and atomic (orbax writes into a temporary directory and
renames it when complete, so a half-written step is never restored).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    keep = max(int(config.train.keep_checkpoints), 1)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=True,
        create=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
    """Restores onto `abstract_state` (a pytree of jax.ShapeDtypeStruct, with
    shardings where the run is sharded). Returns the state or None."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return out.state


def abstract_like(state: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
