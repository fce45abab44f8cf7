"""Analytic FLOPs of one data2vec train step, and XLA's count to check them.

`step_flops(config)` adds up the modality's terms (`modalities/<m>/flops.py`,
built from the shared modules' terms in `d2v_jax/models/flops.py`, which also
says what is counted); `xla_flops` and `unrolled_scans` give XLA's own count.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import ml_collections

from d2v_jax import modalities
from d2v_jax.models.flops import StepFlops

__all__ = ["StepFlops", "step_flops", "unrolled_scans", "xla_flops"]


def step_flops(config: ml_collections.ConfigDict, batch_size: int | None = None) -> StepFlops:
    """FLOPs of one train step on a global batch of `batch_size` examples
    (default `config.data.batch_size`), each with `config.masking.num_clones`
    student clones. Gradient accumulation does not change the count."""
    entry = modalities.get(config.modality)
    b = int(config.data.batch_size if batch_size is None else batch_size)
    if b < 1:
        raise ValueError(f"flops.step_flops: batch_size={b} must be >= 1")
    return entry.step_flops(config, b, int(config.masking.num_clones))


# -- the cross-check against XLA -------------------------------------------------------
# -- the cross-check against XLA -------------------------------------------------------
@contextlib.contextmanager
def unrolled_scans():
    """Traces `nn.scan` stacks fully unrolled while active.

    XLA's `cost_analysis()` counts a while loop's body once, whatever its trip
    count, so the scanned encoder would count as one block. Lowering the same
    step with the scans unrolled gives XLA a loop-free program to count; use it
    only for that count (the step that runs keeps its scan).
    """
    original = nn.scan

    def scan(target, *args, **kwargs):
        if kwargs.get("length"):
            kwargs["unroll"] = kwargs["length"]
        return original(target, *args, **kwargs)

    nn.scan = scan
    try:
        yield
    finally:
        nn.scan = original


def xla_flops(jitted: Any, *args: Any) -> float:
    """XLA's FLOP count of `jitted(*args)`, compiled (not run). Counts the
    element-wise work too, which the analytic count leaves out."""
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError(f"flops.xla_flops: the backend reported no cost analysis ({cost!r})")
    return float(cost["flops"])
