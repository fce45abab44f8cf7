r"""Pretraining entry point and loop.

  python -m d2v_jax.train --config experiments/image.py:tiny_v2 --workdir runs/x \
      [--init_from runs/other] [--config.train.num_steps=200 ...]

The loop: restore-or-init, then jitted steps with the state donated; metrics of
step t are fetched while step t+1 runs (no host sync in the hot path); logs to
`workdir/metrics.jsonl`, TensorBoard and a progress bar; the loss curve to
`loss.png`. Checkpoints (docs/checkpoints.md):

- Resume order: the newest readable checkpoint in `workdir`, else `--init_from`
  (another run's params and EMA teacher; fresh optimizer, step 0), else scratch.
- Async saves every `train.checkpoint_every` steps and at the end, with the
  data iterator's position; the RNG is `fold_in(key(seed), step)`, so it needs
  no saving. A killed run loses at most the steps since its last checkpoint and
  continues bit-for-bit as if it had not stopped.
- SIGTERM (or JAX's multi-host preemption notice) -> save at the next step
  boundary, exit with `PREEMPTED_EXIT_CODE` (42) so a launcher can requeue.
- `train.nonfinite`: "stop" raises NonFiniteError naming the step and the last
  good checkpoint; "skip" drops that step's update inside the jitted step.
- The SPEC 3 collapse guard warns or stops (`collapse.action`).

The guards are in `d2v_jax/guards.py`; the mesh, shardings and the compiled
step's mode come from one `parallel.ParallelPlan` made per run.

Before anything is written (config.json, the tokenizer, checkpoints, even the
work dir itself) the run checks its config, reads one batch of its data, and
checks from their metadata that the work dir's checkpoints (or `--init_from`'s)
fit the model: a refused run leaves the work dir as it was (what the modality's
set-up added, e.g. a newly trained tokenizer, is removed again).

Errors (d2v_jax/errors.py): a user error (bad config key or value, bad data,
an incompatible checkpoint) prints `error: ...` and a `hint: ...` line and
exits with 2, no traceback (`--debug` or D2V_DEBUG=1 shows it); a stopped run
(non-finite loss, collapse) exits with 3; preemption with 42.

Console: the progress bar, a start line (model, params, origin, devices, mesh)
and an end line (steps, final loss, wall time, checkpoint and metrics paths);
warnings (collapse, skipped non-finite steps, preemption, unreadable
checkpoints) always print. `--log_level=info` (or `debug`) brings back the INFO
lines of the loop, orbax, JAX and grain; `--log_level=error` hides warnings.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import optax
from absl import flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from d2v_jax import (checkpoint, collectives, errors, metrics, modalities, optim, parallel,
                     probe)
from d2v_jax.config import validate
from d2v_jax.data import bad_samples
# The run guards live in d2v_jax/guards.py; their names stay importable from here.
from d2v_jax.guards import (PEER_LOST_EXIT_CODE, PREEMPTED_EXIT_CODE, CollapseError,
                            FiniteChecks, NonFiniteError, PeerWatchdog, Preempted,
                            PreemptionWatcher, apply_collapse_guard, collapse_check,
                            guard_nonfinite, nonfinite_mode)
from d2v_jax.train_state import TrainState, create_train_state
from d2v_jax.train_step import make_train_step_fn

__all__ = ["PEER_LOST_EXIT_CODE", "PREEMPTED_EXIT_CODE", "CollapseError", "NonFiniteError", "Preempted",
           "PreemptionWatcher", "collapse_check", "guard_nonfinite", "device_prefetch",
           "abstract_train_state", "init_train_state", "restore_or_init", "make_step",
           "train_and_evaluate"]


# --- input ------------------------------------------------------------------------
def device_prefetch(iterator: Iterator, size: int, sharding: Any = None
                    ) -> Iterator[tuple[Any, Any, dict]]:
    """Yields (device batch, the iterator's state right after that batch, the
    batch's host-only fields: the unreadable samples it replaced,
    `data/bad_samples.py`), keeping `size` batches in flight to the device
    (device_put is async)."""
    get_state = getattr(iterator, "get_state", None)
    queue = collections.deque()

    def enqueue(n):
        for _ in range(n):
            try:
                host = next(iterator)
            except StopIteration:
                return
            host, fields = bad_samples.host_fields(host)
            # this process's rows -> the global sharded batch
            device = jax.device_put(host) if sharding is None else parallel.global_batch(host, sharding)
            queue.append((device, get_state() if get_state else None, fields))

    enqueue(max(size, 1))
    while queue:
        yield queue.popleft()
        enqueue(1)


# --- state --------------------------------------------------------------------------
def abstract_train_state(config: ml_collections.ConfigDict, model, tx, shardings: Any = None) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying shardings (nothing allocated):
    the target that checkpoints are restored (and resharded) onto."""
    abstract = jax.eval_shape(lambda r: create_train_state(config, r, tx, model), jax.random.PRNGKey(0))
    if shardings is None:
        shardings = _one_device(abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def _one_device(tree: Any) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device, tree)


def init_train_state(config: ml_collections.ConfigDict, model, tx, rng: jax.Array,
                     shardings: Any = None) -> TrainState:
    """A fresh state, made by one compiled program (op-by-op init of a deep
    model is slower) and placed exactly as a restored one would be (same
    shardings, hence the same compiled step whether fresh or resumed)."""
    create = lambda r: create_train_state(config, r, tx, model)  # noqa: E731
    if shardings is None:
        shardings = _one_device(jax.eval_shape(create, rng))
    return jax.jit(create, out_shardings=shardings)(rng)


def restore_or_init(config: ml_collections.ConfigDict, manager, model, tx, rng: jax.Array, *,
                    data_iter: checkpoint.ConsumedIterator | None = None,
                    init_from: str | None = None, shardings: Any = None) -> tuple[TrainState, str]:
    """(state, where it came from): the workdir's newest readable checkpoint
    (with the data position), else `init_from`'s params + EMA teacher on a
    fresh optimizer at step 0, else a fresh state from `rng`."""
    abstract = abstract_train_state(config, model, tx, shardings)
    restored = checkpoint.restore_latest(manager, abstract, data_iter)
    if restored is not None:
        state, step = restored
        if init_from:
            logging.warning("--init_from=%s ignored: the work dir has a checkpoint", init_from)
        return state, f"resumed from {manager.directory}/{step}"
    state = init_train_state(config, model, tx, rng, shardings)
    if not init_from:
        return state, "initialized from scratch"
    loaded, _ = checkpoint.restore_params(
        init_from, subtrees=("params", "ema_params"),
        abstract_params={"params": abstract.params, "ema_params": abstract.ema_params})
    return (state.replace(params=loaded["params"], ema_params=loaded["ema_params"]),
            f"params and EMA teacher from --init_from={init_from}")


# --- the guarded step ---------------------------------------------------------------
def make_step(config: ml_collections.ConfigDict, model, tx, schedule: optax.Schedule,
              plan: parallel.ParallelPlan | None = None, with_stats: bool = True) -> Callable:
    """The jitted, guarded train step with the state donated: compiled by the
    run's ParallelPlan (jit over the mesh with the rules' shardings, or pmap /
    shard_map), or a plain jit on the default device when there is no plan.
    `with_stats`: the logging-step variant (`make_train_step_fn`)."""
    guard = lambda step: guard_nonfinite(step, nonfinite_mode(config))  # noqa: E731
    if plan is None:
        step = make_train_step_fn(config, model=model, tx=tx, schedule=schedule,
                                  with_stats=with_stats)
        return jax.jit(guard(step), donate_argnums=(0,))
    step = make_train_step_fn(config, model=model, tx=tx, schedule=schedule,
                              axis_name=plan.axis_name, batch_sharding=plan.step_batch_sharding,
                              with_stats=with_stats)
    return plan.compile(guard(step))


# --- the loop -----------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       init_from: str | None = None) -> TrainState:
    """Pretrains to `config.train.num_steps`, resuming from `workdir` if it
    holds checkpoints. Raises Preempted after a SIGTERM save."""
    t0 = time.perf_counter()
    validate(config)
    errors.check_workdir(workdir)
    entry = modalities.get(config)
    # Checks before writes: a refused run leaves the work dir as it was.
    with errors.undo_additions(workdir, primary=jax.process_index() == 0):
        # Run-level set-up of the modality (text: train or reload the tokenizer in
        # the work dir and set model.vocab_size from it), before the config is saved.
        config = entry.prepare(config, workdir)
        model = entry.build_model(config)
        with errors.config_errors():  # their checks name the optim.* / mesh.* field
            tx, schedule = optim.make_optimizer(config)
            parallel.make_mesh(config)
        # The mesh, shardings and step compilation, decided once.
        plan = parallel.make_plan(config, model, tx)
        dataset = entry.pretrain_dataset(
            config, process_index=jax.process_index(), process_count=jax.process_count())
        iterator = iter(dataset)
        _check_first_batch(iterator)
        _check_checkpoints(config, workdir, init_from, model, tx, plan)
        # The online probe's labeled split (read with the run's own tokenizer /
        # preprocessing), before anything is written: a bad probe.task fails here.
        online_probe = probe.OnlineProbe(config) if probe.will_run(config) else None
    errors.make_workdir(workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # The step folds its count into step_rng: the RNG is a function of (seed, step).
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    data_iter = checkpoint.ConsumedIterator(iterator)
    manager = checkpoint.make_manager(workdir, config)
    state, origin = restore_or_init(config, manager, model, tx, init_rng, data_iter=data_iter,
                                    init_from=init_from, shardings=plan.state_shardings)
    start, num_steps = int(state.step), config.train.num_steps
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    _say(f"pretrain: {config.modality} {config.version}, {n_params / 1e6:.2f}M params, {origin} "
         f"at step {start}; {plan.describe()}")
    if start >= num_steps:
        _say(f"step {start} >= train.num_steps={num_steps}: nothing to do")
        manager.close()
        return state

    _trim_metrics(os.path.join(workdir, "metrics.jsonl"), start)
    # Unreadable samples replaced so far (data.on_bad_sample): counted on from
    # what the resumed run had logged, each path listed once. The logged count
    # is the global one: process 0 carries it, the others start at 0, so the
    # sum over processes continues the uninterrupted run's.
    restored = (bad_samples.restored_total(os.path.join(workdir, "metrics.jsonl"), start)
                if jax.process_index() == 0 else 0)
    bad = bad_samples.BadSampleLog(config, workdir, getattr(dataset, "num_examples", None),
                                   restored)
    batches = device_prefetch(iterator, config.data.prefetch, plan.batch_sharding)
    log_every = max(config.train.log_every, 1)
    # Two compiled variants: the statistics (variances, position share, norms)
    # only on logging steps; one variant when every step is logged.
    step_fns = {True: make_step(config, model, tx, schedule, plan, with_stats=True)}
    step_fns[False] = (make_step(config, model, tx, schedule, plan, with_stats=False)
                       if log_every > 1 else step_fns[True])
    writer = metrics.MetricWriter(workdir)
    every = config.train.checkpoint_every
    bar = _progress(start, num_steps)
    finite = FiniteChecks(nonfinite_mode(config), manager)
    watcher = PreemptionWatcher()

    # Metrics of a logged step are fetched after the next step is dispatched, so
    # the host never waits on the device in the hot path. samples/s is measured
    # between two such fetches (each waits for its step to finish), which
    # excludes the first step's compilation. Samples are counted from the batch
    # shapes on the host (a token-budget batcher gives each bucket its own rows).
    pending = None  # (step, samples seen, device metrics, probe scalars) waiting to be fetched
    clock = {"step": None, "time": None, "samples": 0}
    seen = 0  # samples fed to the steps so far in this run
    last = {}  # the scalars logged last

    def flush():
        nonlocal pending
        finite.check()
        if pending is not None:
            last.update(_log(config, writer, bar, clock, finite.skipped, *pending))
            pending = None

    try:
        for step in range(start, num_steps):
            batch, batch_state, bad_fields = next(batches)
            seen += jax.tree.leaves(batch)[0].shape[0]
            done = step + 1
            bad.add(bad_fields, done)
            probe_due = online_probe is not None and probe.due(config, done, num_steps)
            logged = done % log_every == 0 or done == num_steps or probe_due
            if clock["step"] is None:  # compiled ahead of time here, reused by the jit
                line = collectives.check_collectives(config, plan, step_fns[logged],
                                                     (state, batch, step_rng))
                if line:
                    _say(f"pretrain: {line}")
            if clock["step"] is None and step_fns[not logged] is not step_fns[logged]:
                # The first step carries compilation: the other variant's too
                # (ahead of time, where the step is a jit), so that it does not
                # land in a later samples/s window. pmap compiles on first call.
                other = step_fns[not logged]
                if hasattr(other, "lower"):
                    other.lower(state, batch, step_rng).compile()
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = step_fns[logged](state, batch, step_rng)
            data_iter.consumed = batch_state
            if clock["step"] is None:  # the first step carries compilation
                jax.block_until_ready(state.step)
                clock.update(step=done, time=time.perf_counter(), samples=seen)
                logging.info("first step (incl. compilation) done")
            finite.add(done, step_metrics)
            if pending is not None:
                finite.check(keep_last=1)
                last.update(_log(config, writer, bar, clock, finite.skipped, *pending))
                pending = None
            if logged:
                extra = {bad_samples.COUNT: bad.check(done * int(config.data.batch_size))}
                pending = (done, seen, step_metrics, extra)
            if probe_due:  # a host sync, outside the step; its time is not the step's
                pending[3].update(online_probe(state.params, state.ema_params))
                clock["time"] += pending[3]["probe_seconds"]
            preempted = watcher.requested(done, manager)
            if (every and done % every == 0) or done == num_steps or preempted:
                flush()  # never checkpoint a state that has not passed the guards
                checkpoint.save(manager, done, state, config, data_iter)  # a full disk: one line
            bar.update(1)
            if preempted and done < num_steps:
                checkpoint.wait(manager, done)
                raise Preempted(done, f"{manager.directory}/{done}")
        flush()
    finally:
        watcher.close()
        try:
            checkpoint.wait(manager, start)  # a started save completes, even on error
        finally:
            manager.close()
            try:
                writer.close()
            except OSError as e:  # e.g. the disk that failed the checkpoint: keep that error
                logging.warning("could not close the metric files in %s: %s", workdir, e)
            bar.close()
    if jax.process_index() == 0 and os.path.exists(writer.path):
        metrics.plot_loss(writer.path, os.path.join(workdir, "loss.png"))
    loss = f"final loss {last['loss']:.4f}" if "loss" in last else "no loss logged"
    _say(f"pretrain: done, steps {start}->{num_steps} in {time.perf_counter() - t0:.0f}s, {loss}; "
         f"checkpoint {manager.directory}/{num_steps}, metrics {writer.path}")
    return state


# --- checks before writes -------------------------------------------------------------
def _check_first_batch(iterator) -> None:
    """Reads one batch and rewinds: an unreadable file, an empty folder or a
    missing column is reported before the run writes anything."""
    start = iterator.get_state()
    try:
        next(iterator)
    except StopIteration:
        raise errors.DataError("the data source yields no batch (fewer examples than "
                               "data.batch_size?)") from None
    iterator.set_state(start)


def _check_checkpoints(config, workdir: str, init_from: str | None, model, tx,
                       plan: parallel.ParallelPlan) -> None:
    """The work dir's newest checkpoint (or else `init_from`'s) fits the model
    the config builds: checked from the metadata, nothing read or written."""
    abstract = abstract_train_state(config, model, tx, plan.state_shardings)
    if checkpoint.check_workdir(workdir, abstract) is None and init_from:
        checkpoint.check_init_from(init_from, {"params": abstract.params,
                                               "ema_params": abstract.ema_params})


def _trim_metrics(path: str, step: int) -> None:
    """Drops rows logged after `step` by a run that died before checkpointing
    them, so a resumed run's metrics.jsonl has each step once."""
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def _say(msg: str) -> None:
    """A summary line on the console (process 0), whatever the log level."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def _log(config, writer, bar, clock, skipped, step, seen, device_metrics,
         extra=None) -> dict[str, float]:
    """Writes one logged step's scalars (and returns them); the collapse guard.
    `extra`: host-side scalars of the same step (the online probe's)."""
    scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    scalars.pop("finite", None)
    now = time.perf_counter()
    steps = step - clock["step"]
    scalars["samples_per_sec"] = (seen - clock["samples"]) / (now - clock["time"]) if steps > 0 else 0.0
    clock.update(step=step, time=now, samples=seen)
    if nonfinite_mode(config) == "skip":
        scalars["skipped_updates"] = float(skipped)
    scalars.update(extra or {})
    writer.write(step, scalars)
    postfix = {"loss": f"{scalars['loss']:.4f}", "tvar": f"{scalars['target_var']:.3f}"}
    if "target_pos_share" in scalars:
        postfix["pos"] = f"{scalars['target_pos_share']:.2f}"
    if "probe_knn" in scalars:
        postfix["knn"] = f"{scalars['probe_knn']:.3f}"
    if scalars.get(bad_samples.COUNT):
        postfix["bad"] = int(scalars[bad_samples.COUNT])
    bar.set_postfix(**postfix, sps=f"{scalars['samples_per_sec']:.0f}")
    apply_collapse_guard(config, step, scalars)
    return scalars


def _progress(start, total):
    # A redraw at most every few seconds keeps logs and notebook outputs short.
    return tqdm(total=total, initial=start, desc="pretrain", unit="step", mininterval=5.0,
                disable=jax.process_index() != 0, dynamic_ncols=True)


def _define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Experiment file and arg, e.g. experiments/image.py:tiny_v2.",
        flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Directory for metrics, plots and checkpoints; resumes "
                        "from its newest checkpoint if it has one.", flag_values=fv)
    flags.DEFINE_string("init_from", None, "Another run's work dir (or checkpoints dir): start "
                        "from its params and EMA teacher (fresh optimizer, step 0). Ignored when "
                        "--workdir already holds a checkpoint.", flag_values=fv)
    flags.DEFINE_enum("log_level", "warning", ["debug", "info", "warning", "error"],
                      "Console log level of this run and its libraries (orbax, JAX, grain). "
                      "'warning' (default): the progress bar, a start and an end line, and "
                      "warnings; 'info' brings back the INFO lines.", flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def _run(fv: flags.FlagValues) -> int:
    # absl sets the root logger's level, which orbax, JAX and grain inherit.
    logging.set_verbosity(fv.log_level)
    # Multi-process start (SLURM, Cloud TPU, JAX_COORDINATOR_ADDRESS)
    # before anything touches the devices.
    with errors.config_errors():
        settings = parallel.parallel_config(fv.config)
    parallel.maybe_initialize_distributed(settings["distributed"])
    # Several processes: one that dies without a word stops the others
    # (PEER_LOST_EXIT_CODE) instead of leaving them in a collective forever.
    watchdog = (PeerWatchdog(settings["peer_timeout_s"]) if jax.process_count() > 1 else None)
    try:
        train_and_evaluate(fv.config, fv.workdir, init_from=fv.init_from)
    except Preempted as e:
        logging.warning("%s; exiting with code %d", e, PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    except jax.errors.JaxRuntimeError:
        if watchdog is not None:  # a collective failed: a lost peer, or a real error
            watchdog.settle()
        raise
    finally:
        if watchdog is not None:
            watchdog.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m d2v_jax.train` with `argv` (default sys.argv); returns the exit
    code: 0, 2 (a user error, printed as `error: ...`), 3 (the run stopped
    itself: non-finite loss, collapse) or 42 (preempted)."""
    return errors.absl_main(_define_flags, _run, argv, doc=__doc__,
                            stopped=(NonFiniteError, CollapseError))


if __name__ == "__main__":
    sys.exit(main())
