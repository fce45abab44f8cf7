"""Orbax checkpoints: the whole TrainState, the data iterator and the config.

One checkpoint is the directory `workdir/checkpoints/<step>/` with three items:

  state      the TrainState (step, params, ema_params, opt_state), orbax
             `StandardSave`; restored onto any device count or mesh (the
             abstract target carries the shardings, orbax reshards on load).
  data_iter  the grain iterator's position *as consumed by the train step*
             (not as read ahead by the prefetcher), one JSON file per process.
  config     the config the run used, JSON.

The RNG is not stored: the train step folds the step into a key derived from
`config.seed` (`train.py`), so (config, step) determines it.

Saves are asynchronous (the device->host copy blocks, the writes run in a
thread) and atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it
once every file is written, and only finalized steps are listed, so a process
killed mid-save leaves nothing that is restored. Kept: the latest
`train.keep_checkpoints` steps plus every multiple of `train.keep_every`.

A finalized step that cannot be read (a truncated file, a disk error) is
reported (the step, the file and the reason), moved aside to
`<step>.corrupt`, and the next older step restored. A checkpoint whose
parameters do not fit the current config is an IncompatibleCheckpointError
(a `UserError`) that lists the mismatching parameter paths and shapes (never
silently skipped); `check_workdir` / `check_init_from` make that check from
the metadata alone, so a run can refuse before it writes anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Mapping

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from d2v_jax.checkpoint_writes import CheckpointWriteError, error_chain, writing  # noqa: F401
from d2v_jax.errors import CheckpointError

STATE, DATA_ITER, CONFIG = "state", "data_iter", "config"
CORRUPT_SUFFIX = ".corrupt"


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """A checkpoint's tree does not fit the structure the current config builds.
    The first line of the message says so with the first mismatch; the lines
    after it (also in `details`) list every mismatching path and shape."""

    def __init__(self, message: str, details: list[str] = (), hint: str | None = None):
        self.details = list(details)
        full = message + "".join(f"\n  {line}" for line in self.details)
        super().__init__(full, hint=hint)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (readable) checkpoint where one was asked for."""



# --- the manager ------------------------------------------------------------------
def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def resolve_dir(path: str) -> str:
    """A run's work dir or its `checkpoints/` dir -> the checkpoints dir."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"checkpoint path {path!r} does not exist")
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {STATE: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
            DATA_ITER: grain.checkpoint.CheckpointHandler()}


def preservation_policy(keep_last: int, keep_every: int = 0) -> policies.PreservationPolicy:
    """The latest `keep_last` steps, plus every multiple of `keep_every` (0 = none)."""
    latest = policies.LatestN(max(int(keep_last), 1))
    if keep_every and keep_every > 0:
        return policies.AnyPreservationPolicy([latest, policies.EveryNSteps(int(keep_every))])
    return latest


def make_manager(workdir: str, config: ml_collections.ConfigDict | None = None, *,
                 directory: str | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """The manager of `workdir/checkpoints` (or `directory`), async, with the
    retention policy of `config.train` (keep_checkpoints, keep_every)."""
    t = config.train if config is not None else None
    keep_last = int(t.keep_checkpoints) if t is not None else 1
    keep_every = int(t.get("keep_every", 0) or 0) if t is not None else 0
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else preservation_policy(keep_last, keep_every),
        enable_async_checkpointing=not read_only,
        create=not read_only,
        read_only=read_only,
        # what orbax sets for a read-only manager anyway, minus its warning saying so
        save_interval_steps=0 if read_only else 1,
        # a save that a kill or a full disk interrupted leaves <step>.orbax-checkpoint-tmp*
        cleanup_tmp_directories=not read_only,
        # A read-only manager (the checks before a run writes) joins no barrier:
        # each process decides alone whether a checkpoint dir exists to check,
        # and one may see the dir another has just created.
        save_root_metadata=not read_only,
    )
    return ocp.CheckpointManager(directory or checkpoint_dir(workdir), options=options,
                                 item_handlers=_handlers())


# --- the data iterator's state ----------------------------------------------------
class ConsumedIterator:
    """The grain iterator's state at the last batch the train step *consumed*.

    The loop prefetches batches, so the live iterator is ahead of the step;
    the loop records the state right after reading each batch and sets
    `consumed` when that batch goes into the step. Saved and restored through
    grain's own orbax handler (one JSON file per process).
    """

    def __init__(self, iterator: Any):
        self.iterator = iterator
        self.consumed = iterator.get_state()

    # grain's handler treats non-DatasetIterator items as bytes-state iterators.
    def get_state(self) -> bytes:
        return json.dumps(self.consumed).encode()

    def set_state(self, state: bytes) -> None:
        self.consumed = json.loads(state.decode() if isinstance(state, bytes) else state)
        self.iterator.set_state(self.consumed)

    def start_prefetch(self) -> None:
        start = getattr(self.iterator, "start_prefetch", None)
        if start is not None:
            start()


# --- save -------------------------------------------------------------------------
def config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict, data_iter: ConsumedIterator | None = None) -> None:
    """Starts an async save of `state` (+ data iterator, config) as `step`.

    Returns once the arrays are copied to host; the state may then be donated.
    A failed write (this one's, or the previous save's surfacing now) raises
    `CheckpointWriteError`.
    """
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_json(config))}
    if data_iter is not None:
        items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    with writing(manager, step):  # a full disk (here or in the previous async save): one line
        manager.save(int(step), args=ocp.args.Composite(**items), force=True)


def wait(manager: ocp.CheckpointManager, step: int | None = None) -> None:
    """Waits for a started save to finish; a failed write is a `CheckpointWriteError`
    (`step`: the step to name when orbax's error does not say which)."""
    if step is None:
        step = manager.latest_step() or 0
    with writing(manager, step):
        manager.wait_until_finished()


# --- compatibility ----------------------------------------------------------------
def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: tuple) -> str:
    return "/".join(_key_name(k) for k in path)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): tuple(getattr(x, "shape", np.shape(x))) for p, x in leaves}


def tree_mismatches(saved: Any, expected: Any, limit: int | None = 20) -> list[str]:
    """Human-readable differences between two trees of arrays/metadata:
    parameter paths only in one of them and paths whose shapes differ."""
    a, b = _shapes(saved), _shapes(expected)
    out = [f"{p}: checkpoint {a[p]} vs config {b[p]}" for p in a if p in b and a[p] != b[p]]
    out += [f"{p}: in the checkpoint {a[p]}, not built by the config" for p in a if p not in b]
    out += [f"{p}: built by the config {b[p]}, missing from the checkpoint" for p in b if p not in a]
    # The student's params first: the optimizer and EMA trees only mirror them.
    out.sort(key=lambda line: (not line.startswith("params/"), line.startswith("opt_state/")))
    if limit is not None and len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def check_compatible(saved: Any, expected: Any, where: str, hint: str | None = None) -> None:
    """Raises IncompatibleCheckpointError naming every mismatching path and shape."""
    diffs = tree_mismatches(saved, expected, limit=None)
    if diffs:
        shown = diffs[:20] + ([f"... and {len(diffs) - 20} more"] if len(diffs) > 20 else [])
        n = len(diffs)
        raise IncompatibleCheckpointError(
            f"checkpoint {where} does not fit the current config ({n} mismatching parameter "
            f"path{'s' if n > 1 else ''}, first {diffs[0]})", shown,
            hint=hint or "it was written by a model of another size or kind: use the config "
                         "that wrote it, or another directory")


# --- restore ----------------------------------------------------------------------
def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(os.fspath(manager.directory), str(step))


def unreadable_reason(error: BaseException, step_dir: str, part: str) -> str:
    """`<file>: <reason>` for an unreadable step, from the innermost error of
    the chain (orbax wraps TensorStore's readable error in one whose message is
    an object repr). `part` is what was being read: 'metadata' or 'arrays'."""
    chain = error_chain(error)
    readable = [c for c in chain if str(c) and "<bound method" not in str(c)
                and "TensorStore(" not in str(c)]
    root = readable[-1] if readable else chain[-1]
    text = str(root).splitlines()[0] if str(root) else ""
    m = re.search(r'Error reading "([^"]+)" in \S+ database at local file "([^"]+)":?\s*', text)
    if m:  # TensorStore names the array (key) inside the step's state folder
        array = m.group(1).split("/")[0].replace(".", "/")
        return f"{m.group(2).rstrip('/')}, array {array}: {text[m.end():] or text}"
    where = os.path.join(step_dir, STATE, "_METADATA") if part == "metadata" else step_dir
    if not os.path.exists(where):
        where = step_dir
    return f"{where}: {type(root).__name__}: {text}" if text else f"{where}: {type(root).__name__}"


def _quarantine(manager: ocp.CheckpointManager, step: int, error: Exception,
                part: str = "arrays") -> None:
    """Reports an unreadable step (the step, the file and the reason) and moves
    it aside, so that the next save of that step number does not collide with
    it and it is never tried again."""
    path = _step_dir(manager, step)
    older = [s for s in manager.all_steps() if s < step]
    then = f"restoring step {max(older)} instead" if older else "no older step to restore"
    logging.error("checkpoint step %d is unreadable: %s; %s", step,
                  unreadable_reason(error, path, part), then)
    if jax.process_index() == 0 and os.path.isdir(path):
        target = path + CORRUPT_SUFFIX
        n = 1
        while os.path.exists(target):
            target, n = f"{path}{CORRUPT_SUFFIX}{n}", n + 1
        os.rename(path, target)
        logging.error("moved %s to %s", path, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"d2v_quarantine_{step}")
    manager.reload()


def _state_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
    meta = manager.item_metadata(step)[STATE]
    if meta is None:
        raise ValueError(f"no '{STATE}' item metadata")
    return getattr(meta, "tree", meta)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iter: ConsumedIterator | None = None) -> tuple[Any, int] | None:
    """(state, step) of the newest readable step, restored onto `abstract_state`
    (ShapeDtypeStructs with shardings); the data iterator's position too when
    `data_iter` is given and the step has one. None when there is no step.

    Unreadable steps are reported and skipped (see module doc); a step that
    reads but does not fit `abstract_state` raises IncompatibleCheckpointError.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        where = _step_dir(manager, step)
        try:
            saved = _state_metadata(manager, step)
        except Exception as e:  # unreadable metadata: a corrupt step
            _quarantine(manager, step, e, "metadata")
            continue
        check_compatible(saved, abstract_state, where)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        has_iter = data_iter is not None and os.path.isdir(os.path.join(where, DATA_ITER))
        if has_iter:
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = manager.restore(step, args=ocp.args.Composite(**items))
            # Reading every byte now surfaces truncated data here, not mid-step.
            jax.block_until_ready(out[STATE])
        except MemoryError:
            raise  # the host's problem, not the checkpoint's
        except Exception as e:  # orbax/TensorStore report bad files as plain errors
            _quarantine(manager, step, e)
            continue
        if data_iter is not None and not has_iter:
            logging.warning("checkpoint %s has no data iterator state; the data stream restarts", where)
        return out[STATE], step
    return None


def check_workdir(workdir: str, abstract_state: Any) -> int | None:
    """The step a run in `workdir` would resume from, after checking from its
    metadata (no arrays read, nothing written) that it fits `abstract_state`:
    raises IncompatibleCheckpointError otherwise. None when there is no
    checkpoint. Steps whose metadata does not read are passed over here; the
    restore reports and moves them aside (`restore_latest`)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return None
    manager = make_manager("", directory=directory, read_only=True)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                saved = _state_metadata(manager, step)
            except Exception:  # noqa: BLE001  (unreadable: the restore reports it)
                continue
            check_compatible(saved, abstract_state, _step_dir(manager, step), hint=(
                f"the checkpoints in {workdir} were written by another model (their config: "
                f"{os.path.join(workdir, 'config.json')}); use that config, or another --workdir"))
            return step
    finally:
        manager.close()
    return None


def check_init_from(path: str, abstract: dict[str, Any], step: int | None = None) -> int:
    """Checks from its metadata that `path`'s checkpoint (newest step unless
    `step`) has the subtrees of `abstract` ({"params": ..., "ema_params": ...})
    in the shapes given; returns the step. Raises CheckpointNotFoundError or
    IncompatibleCheckpointError; reads no arrays, writes nothing."""
    with _read_only_step(path, step) as (manager, step):
        where, saved = _step_dir(manager, step), _state_metadata(manager, step)
        for name, want in abstract.items():
            check_compatible(_subtree(saved, name, where), want, where, hint=(
                f"--init_from={path} holds another model; pass a config of its size "
                f"(its config: {os.path.join(where, CONFIG)})"))
        return step


@contextlib.contextmanager
def _read_only_step(path: str, step: int | None):
    """(read-only manager, step) of `path`'s checkpoints (a work dir or its
    checkpoints/ dir) at `step`, the newest finalized one when None; the
    manager is closed on exit."""
    directory = resolve_dir(path)
    manager = make_manager("", directory=directory, read_only=True)
    try:
        yield manager, _finalized_step(manager, step, directory)
    finally:
        manager.close()


def _subtree(saved: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in saved:
        raise IncompatibleCheckpointError(f"checkpoint {where} has no {name!r} subtree")
    return saved[name]


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
    """The state at `step` (latest readable one when None) or None when there
    are no checkpoints. Kept for callers that only need the TrainState."""
    if step is None:
        out = restore_latest(manager, abstract_state)
        return None if out is None else out[0]
    if step not in manager.all_steps():
        raise CheckpointNotFoundError(f"no checkpoint step {step} in {manager.directory} "
                                      f"(have {sorted(manager.all_steps())})")
    check_compatible(_state_metadata(manager, step), abstract_state, _step_dir(manager, step))
    return manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]


def saved_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    raw = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    return ml_collections.ConfigDict(raw)


def _finalized_step(manager: ocp.CheckpointManager, step: int | None, directory: str) -> int:
    """`step` (default the newest) if the manager holds it finalized, else a
    CheckpointNotFoundError naming the directory and the steps it has."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointNotFoundError(f"no finalized checkpoint under {directory}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise CheckpointNotFoundError(f"no checkpoint step {step} in {directory} (have {steps})")
    return step


def restore_params(path: str, step: int | None = None, *, abstract_params: Any = None,
                   subtrees: tuple[str, ...] = ("params",)) -> tuple[Any, ml_collections.ConfigDict]:
    """(student params, config it was trained with) from a pretraining run.

    `path` is the run's work dir or its `checkpoints/` dir; `step` defaults to
    the newest step. Only the requested subtrees of the state are read (not the
    optimizer state). `abstract_params` (ShapeDtypeStructs with shardings, e.g.
    from a mesh) places and checks them: a mismatch raises
    IncompatibleCheckpointError naming the paths and shapes. Without it, they
    land on the first local device as saved. With `subtrees=("params",
    "ema_params")` the first element is a dict of both (and `abstract_params`,
    if given, a dict keyed the same way).
    """
    with _read_only_step(path, step) as (manager, step):
        where, saved = _step_dir(manager, step), _state_metadata(manager, step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {}
        for name in subtrees:
            meta = _subtree(saved, name, where)
            want = abstract_params if len(subtrees) == 1 else (abstract_params or {}).get(name)
            if want is not None:
                check_compatible(meta, want, where)
                target[name] = want
            else:
                target[name] = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        handler = ocp.PyTreeCheckpointHandler()
        restored = ocp.Checkpointer(handler).restore(
            os.path.join(where, STATE),
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        config = saved_config(manager, step)
    params = restored[subtrees[0]] if len(subtrees) == 1 else dict(restored)
    return params, config


def restore_config(path: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a run saved with its checkpoint (`step`: default the newest),
    without reading any arrays: e.g. to build a pretraining run's architecture
    with fresh weights."""
    with _read_only_step(path, step) as (manager, step):
        return saved_config(manager, step)


def abstract_like(state: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
