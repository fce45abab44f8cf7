"""Metric writers (JSONL + TensorBoard) and the loss plot. Host 0 writes."""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np

from d2v_jax.tensorboard import EventWriter


class MetricWriter:
    """Appends one JSON object per logged step to `workdir/metrics.jsonl` and
    mirrors scalars to TensorBoard event files under `workdir/tb`."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                self._tb = EventWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        row = {"step": int(step)}
        row.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            self._tb.write(int(step), {k: float(v) for k, v in scalars.items()})

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: str, out_path: str) -> None:
    """Loss (and target/prediction variance) against step, from metrics.jsonl."""
    # A bare Figure (no pyplot): never switches the caller's backend, so plots
    # still show inline in a notebook that called train_and_evaluate.
    from matplotlib.figure import Figure

    rows = read_jsonl(metrics_path)
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])
    probed = [r for r in rows if "probe_knn" in r or "probe_linear" in r]
    fig = Figure(figsize=(15 if probed else 10, 3.5))
    axes = fig.subplots(1, 3 if probed else 2)
    ax1, ax2 = axes[0], axes[1]
    ax1.plot(steps, [r["loss"] for r in rows])
    ax1.set(xlabel="step", ylabel="loss", title="data2vec loss", yscale="log")
    for key in ("target_var", "pred_var"):
        if key in rows[0]:
            ax2.plot(steps, [r[key] for r in rows], label=key)
    if "target_pos_share" in rows[0]:
        ax2.plot(steps, [r["target_pos_share"] for r in rows], label="target_pos_share", ls="--")
    ax2.set(xlabel="step", title="collapse guard")
    ax2.legend()
    if probed:  # a falling loss beside a flat probe is a positional collapse
        ax3 = axes[2]
        for key in ("probe_knn", "probe_linear"):
            pts = [(r["step"], r[key]) for r in probed if key in r]
            if pts:
                ax3.plot(*zip(*pts), marker="o", label=key)
        ax3.set(xlabel="step", title="online probe (teacher features, held-out rows)")
        ax3.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
