r"""Pretraining entry point and loop.

  python -m d2v_jax.train --config experiments/image.py:tiny_v2 --workdir runs/x \
      [--config.train.num_steps=200 ...]

The loop: restore-or-init, then jitted steps with the state donated; metrics of
step t are fetched while step t+1 runs (no host sync in the hot path); logs to
`workdir/metrics.jsonl`, TensorBoard and a progress bar; an orbax checkpoint at
`train.checkpoint_every` steps and at the end; the loss curve to `loss.png`.
"""

from __future__ import annotations

import collections
import logging as pylogging
import os
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from d2v_jax import checkpoint, data, metrics, models, optim
from d2v_jax.config import validate
from d2v_jax.train_state import TrainState, create_train_state
from d2v_jax.train_step import make_train_step


class CollapseError(RuntimeError):
    """The representation collapsed (SPEC 3 collapse guard, action='stop')."""


def device_prefetch(iterator: Iterator, size: int) -> Iterator:
    """Keeps `size` batches in flight to the device (device_put is async)."""
    queue = collections.deque()

    def enqueue(n):
        for _ in range(n):
            try:
                queue.append(jax.device_put(next(iterator)))
            except StopIteration:
                return

    enqueue(max(size, 1))
    while queue:
        yield queue.popleft()
        enqueue(1)


def collapse_check(config: ml_collections.ConfigDict, step: int, scalars: dict) -> str | None:
    """A message when target or prediction variance fell below SPEC 3's bounds."""
    g = config.collapse
    if step < g.after_step:
        return None
    if scalars["target_var"] < g.min_target_var:
        return f"step {step}: target_var {scalars['target_var']:.4f} < {g.min_target_var}"
    if scalars["pred_var"] < g.min_pred_var:
        return f"step {step}: pred_var {scalars['pred_var']:.4f} < {g.min_pred_var}"
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    model = models.build_model(config)
    tx, schedule = optim.make_optimizer(config)
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = create_train_state(config, init_rng, tx, model)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("model: %s %s, %.2fM params", config.modality, config.version, n_params / 1e6)

    manager = checkpoint.make_manager(workdir, config)
    restored = checkpoint.restore(manager, checkpoint.abstract_like(state))
    if restored is not None:
        state = restored
        logging.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), int(state.step))
    start, num_steps = int(state.step), config.train.num_steps

    batches = device_prefetch(iter(data.make_pretrain_dataset(
        config, process_index=jax.process_index(), process_count=jax.process_count())), config.data.prefetch)
    step_fn = make_train_step(config, model=model, tx=tx, schedule=schedule)
    writer = metrics.MetricWriter(workdir)
    log_every = max(config.train.log_every, 1)
    bar = _progress(start, num_steps)

    # Metrics of a logged step are fetched after the next step is dispatched, so
    # the host never waits on the device in the hot path. samples/s is measured
    # between two such fetches (each waits for its step to finish), which
    # excludes the first step's compilation.
    pending = None  # (step, device metrics) waiting to be fetched
    clock = {"step": None, "time": None}
    for step in range(start, num_steps):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, step_metrics = step_fn(state, next(batches), step_rng)
        if clock["step"] is None:  # the first step carries compilation
            jax.block_until_ready(state.step)
            clock.update(step=step + 1, time=time.perf_counter())
            logging.info("first step (incl. compilation) done")
        if pending is not None:
            _log(config, writer, bar, clock, *pending)
            pending = None
        done = step + 1
        if done % log_every == 0 or done == num_steps:
            pending = (done, step_metrics)
        if config.train.checkpoint_every and done % config.train.checkpoint_every == 0 and done < num_steps:
            checkpoint.save(manager, done, state, config)
        bar.update(1)
    if pending is not None:
        _log(config, writer, bar, clock, *pending)
    checkpoint.save(manager, num_steps, state, config)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    bar.close()
    if jax.process_index() == 0 and os.path.exists(writer.path):
        metrics.plot_loss(writer.path, os.path.join(workdir, "loss.png"))
    return state


def _log(config, writer, bar, clock, step, device_metrics):
    scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    steps = step - clock["step"]
    scalars["samples_per_sec"] = config.data.batch_size * steps / (now - clock["time"]) if steps > 0 else 0.0
    clock.update(step=step, time=now)
    samples_per_sec = scalars["samples_per_sec"]
    if not np.isfinite(scalars["loss"]):
        raise FloatingPointError(f"loss is {scalars['loss']} at step {step}")
    writer.write(step, scalars)
    bar.set_postfix(loss=f"{scalars['loss']:.4f}", tvar=f"{scalars['target_var']:.3f}",
                    sps=f"{samples_per_sec:.0f}")
    msg = collapse_check(config, step, scalars)
    if msg:
        if config.collapse.action == "stop":
            raise CollapseError("representation collapse: " + msg)
        logging.warning("possible representation collapse: %s", msg)


def _progress(start, total):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="pretrain", unit="step",
                disable=jax.process_index() != 0, dynamic_ncols=True)


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file and arg, e.g. experiments/image.py:tiny_v2.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, plots and checkpoints.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    pylogging.getLogger("absl").setLevel(pylogging.INFO)
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
