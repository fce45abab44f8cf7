"""Run guards of the pretraining loop (`d2v_jax/train.py`).

- Preemption: `PreemptionWatcher` turns SIGTERM (or JAX's multi-host
  preemption notice) into a save at the next step boundary; the loop then
  raises `Preempted` and the CLI exits with `PREEMPTED_EXIT_CODE` (42).
- Non-finite steps (`train.nonfinite`): `guard_nonfinite` adds a `finite` flag
  to the jitted step's metrics and, in mode 'skip', drops that step's update;
  `FiniteChecks` reads the flags off the hot path and raises `NonFiniteError`
  (mode 'stop', naming the last good checkpoint) or counts the skips.
- Representation collapse (SPEC 3, `config.collapse`): `collapse_check` finds
  it in a step's logged scalars, `apply_collapse_guard` warns or raises
  `CollapseError`.
"""

from __future__ import annotations

import collections
import signal
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from d2v_jax.train_state import TrainState

# Exit status after a preemption save: distinct from success (0), errors (1),
# usage errors (2) and deaths by signal (128 + n), so a launcher can requeue on it.
PREEMPTED_EXIT_CODE = 42
NONFINITE_MODES = ("stop", "skip")


class CollapseError(RuntimeError):
    """The representation collapsed (SPEC 3 collapse guard, action='stop')."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient (train.nonfinite='stop')."""


class Preempted(Exception):
    """Raised by `train_and_evaluate` after the preemption checkpoint is written."""

    def __init__(self, step: int, path: str):
        super().__init__(f"preempted: saved step {step} to {path}")
        self.step, self.path = step, path


# --- non-finite steps -----------------------------------------------------------------
def nonfinite_mode(config: ml_collections.ConfigDict) -> str:
    return config.train.get("nonfinite", "stop")


def guard_nonfinite(step_fn: Callable, mode: str) -> Callable:
    """Adds `finite` (loss and gradient norm finite) to the step's metrics;
    mode 'skip' keeps the old params, EMA and optimizer state when it is False
    (a select inside the step: no host sync). The step count always advances,
    so the data and RNG streams stay aligned with an unskipped run."""
    if mode not in NONFINITE_MODES:
        raise ValueError(f"config.train.nonfinite={mode!r}; expected 'stop' or 'skip'")

    def step(state: TrainState, batch, rng):
        new_state, step_metrics = step_fn(state, batch, rng)
        finite = jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(step_metrics["grad_norm"])
        if mode == "skip":
            kept = state.replace(step=new_state.step)
            new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, kept)
        return new_state, dict(step_metrics, finite=finite)

    return step


class FiniteChecks:
    """Per-step `finite` flags, read one step late (mode 'stop': the host waits
    for step t-1 while step t runs) or at log time (mode 'skip': counted)."""

    def __init__(self, mode: str, manager):
        self.mode, self.manager = mode, manager
        self.pending: collections.deque = collections.deque()  # (step, metrics)
        self.skipped = 0

    def add(self, step: int, step_metrics: dict) -> None:
        self.pending.append((step, {k: step_metrics[k] for k in ("finite", "loss", "grad_norm")}))
        if self.mode == "stop":
            self.check(keep_last=1)

    def check(self, keep_last: int = 0) -> None:
        while len(self.pending) > keep_last:
            step, m = self.pending.popleft()
            if bool(m["finite"]):
                continue
            if self.mode == "skip":
                self.skipped += 1
                logging.warning("step %d: non-finite loss/gradients; update skipped (%d so far)",
                                step, self.skipped)
                continue
            self.manager.wait_until_finished()
            last = self.manager.latest_step()
            where = (f"{self.manager.directory}/{last}" if last is not None else
                     "none (no checkpoint was saved before it)")
            raise NonFiniteError(
                f"non-finite training at step {step}: loss={float(m['loss'])}, "
                f"grad_norm={float(m['grad_norm'])}. Last good checkpoint: {where}. "
                "Set config.train.nonfinite='skip' to skip such updates instead.")


# --- representation collapse --------------------------------------------------------
def collapse_check(config: ml_collections.ConfigDict, step: int, scalars: dict) -> str | None:
    """A message when target or prediction variance fell below SPEC 3's bounds."""
    g = config.collapse
    if step < g.after_step:
        return None
    if scalars["target_var"] < g.min_target_var:
        return f"step {step}: target_var {scalars['target_var']:.4f} < {g.min_target_var}"
    if scalars["pred_var"] < g.min_pred_var:
        return f"step {step}: pred_var {scalars['pred_var']:.4f} < {g.min_pred_var}"
    share = scalars.get("target_pos_share")
    if share is not None and share > g.max_target_pos_share:
        return (f"step {step}: target_pos_share {share:.3f} > {g.max_target_pos_share}: position "
                f"alone explains the targets (positional collapse; see docs/label_efficiency.md)")
    return None


def apply_collapse_guard(config: ml_collections.ConfigDict, step: int, scalars: dict) -> None:
    """`collapse_check`, then what `config.collapse.action` says: 'stop' raises
    CollapseError, anything else logs a warning."""
    msg = collapse_check(config, step, scalars)
    if not msg:
        return
    if config.collapse.action == "stop":
        raise CollapseError("representation collapse: " + msg)
    logging.warning("possible representation collapse: %s", msg)


# --- preemption ---------------------------------------------------------------------
class PreemptionWatcher:
    """SIGTERM -> save at the next step boundary.

    One process: a Python SIGTERM handler sets a flag. Several processes: the
    hosts must agree on the step, so JAX's preemption sync point decides
    (`jax.distributed.initialize()` installs its notifier on SIGTERM; orbax's
    `reached_preemption` asks it), and no Python handler is installed.
    """

    def __init__(self):
        self.signum = None
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.signum = signum
        logging.warning("received signal %d: saving at the next step boundary", signum)

    def requested(self, step: int, manager) -> bool:
        if self.signum is not None:
            return True
        return self._multi and manager.reached_preemption(step)

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
