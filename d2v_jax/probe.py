"""An online representation check during pretraining: kNN and linear probes of
the teacher's pooled features on a small labeled split.

A falling loss says the student predicts its targets; it does not say the
targets carry anything a downstream task needs. The failure this catches is
the one that went unnoticed for images and text here (docs/results.md, tiny recipes):
the teacher's outputs became a function of *position* (the loss fell, the
variance stayed up) while the features lost the content. Every
`probe.every` steps the teacher (`ema_params` over `params`, SPEC 4) encodes a
fixed labeled split of a fine-tuning task, its final hidden states are pooled
the way fine-tuning pools them (`FinetuneModel.features`), and two probes are
fitted on the host, both closed-form and deterministic:

- `probe_knn`: cosine k-nearest-neighbours (k = `probe.k`); classification:
  accuracy of the majority vote (ties to the nearest), regression: RMSE of the
  neighbours' mean target.
- `probe_linear`: ridge regression on standardized features (one-hot targets
  and argmax for classification), `probe.ridge` times the number of fitted
  rows as the penalty; accuracy or RMSE.

The fitted rows come from the task's training pool, the scored rows from its
test split: with `data.holdout_fraction` / `holdout_seed` equal to the task's
`test_fraction` / `split_seed`, pretraining never saw them
(`data.pipeline.holdout_split`). The task is a fine-tuning experiment
(`probe.task = "experiments/finetune.py:stdlib_docs"`) read with the
pretraining run's own preprocessing (tokenizer, image size, sample rate).
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from absl import logging

from d2v_jax import checkpoint, train_state
from d2v_jax.config import load_config, parse_overrides
from d2v_jax.data import labeled
from d2v_jax.errors import ConfigError, UserError
from d2v_jax.finetune import backbone
from d2v_jax.finetune.model import FinetuneModel


def enabled(config: ml_collections.ConfigDict) -> bool:
    p = config.get("probe")
    return p is not None and bool(p.task) and int(p.every) > 0


def will_run(config: ml_collections.ConfigDict) -> bool:
    """Whether a run of `train.num_steps` probes at least once (a smoke run
    shorter than one period does not build the probe at all)."""
    return enabled(config) and int(config.train.num_steps) >= int(config.probe.every)


def due(config: ml_collections.ConfigDict, done: int, num_steps: int) -> bool:
    """Whether the probe runs after step `done` (every `probe.every` steps and at the end)."""
    if not enabled(config):
        return False
    every = int(config.probe.every)
    # At the end too, unless the run is shorter than one period (a smoke run).
    return done % every == 0 or (done == num_steps and done >= every)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int,
                classify: bool, num_classes: int | None = None) -> np.ndarray:
    """Cosine kNN. Classification: the majority label of the k nearest (a tie
    goes to the label of the nearer neighbour); regression: their mean target."""
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sim = unit(test_x) @ unit(train_x).T  # [n_test, n_train]
    k = min(k, len(train_x))
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # nearest first
    votes = train_y[nearest]
    if not classify:
        return votes.mean(axis=1)
    n_cls = int(num_classes or train_y.max() + 1)
    counts = np.zeros((len(test_x), n_cls))
    np.add.at(counts, (np.arange(len(test_x))[:, None], votes), 1.0)
    # Ties go to the label whose nearest neighbour ranks first: a bonus of
    # (k - best rank) / (k + 1) < 1 never outweighs a whole vote.
    best = np.full_like(counts, k)
    np.minimum.at(best, (np.arange(len(test_x))[:, None], votes), np.arange(k)[None, :])
    bonus = (k - best) / (k + 1.0)
    return np.argmax(counts + bonus, axis=1)


def ridge_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, ridge: float,
                  classify: bool, num_classes: int | None = None) -> np.ndarray:
    """Ridge regression on features standardized with the fitted rows'
    statistics; penalty `ridge * n` (n = fitted rows), intercept unpenalized.
    Classification fits one-hot targets and predicts the argmax."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    if classify:
        n_cls = int(num_classes or train_y.max() + 1)
        y = np.eye(n_cls)[train_y]
    else:
        y = train_y[:, None].astype(np.float64)
    y_mean = y.mean(0)
    n, d = a.shape
    if d <= n:  # primal: (A^T A + lam I) w = A^T y
        w = np.linalg.solve(a.T @ a + ridge * n * np.eye(d), a.T @ (y - y_mean))
    else:  # dual: w = A^T (A A^T + lam I)^-1 y
        w = a.T @ np.linalg.solve(a @ a.T + ridge * n * np.eye(n), y - y_mean)
    pred = b @ w + y_mean
    return np.argmax(pred, axis=1) if classify else pred[:, 0]


def score(pred: np.ndarray, y: np.ndarray, classify: bool) -> float:
    """Accuracy (classification) or RMSE (regression)."""
    if classify:
        return float(np.mean(pred == y))
    return float(np.sqrt(np.mean((pred - y) ** 2)))


class OnlineProbe:
    """Builds the labeled split once; `__call__(params, ema_params)` ->
    {'probe_knn', 'probe_linear', 'probe_seconds'}."""

    def __init__(self, config: ml_collections.ConfigDict):
        p = config.probe
        task = load_config(p.task, parse_overrides(p.overrides) if p.overrides else None)
        if task.modality != config.modality:
            raise ConfigError(f"config.probe.task={p.task!r} is a {task.modality!r} task; this "
                              f"run pretrains a {config.modality!r} model")
        if task.task not in labeled.TASKS:
            raise ConfigError(f"config.probe.task={p.task!r} is a {task.task!r} task; the probe "
                              f"scores {labeled.TASKS}")
        self.config = config
        self.classify = task.task == "classification"
        try:
            data = backbone.make_labeled_data(task, config)
        except UserError as e:  # say that the probe, not the corpus, read this data
            raise type(e)(f"config.probe.task={p.task!r}: {e}",
                          hint=e.hint or "set --config.probe.task='' to run without the "
                          "online probe") from None
        rng = np.random.default_rng(int(p.seed))
        fit = rng.permutation(data.train_pool)[: int(p.num_train)]
        scored = np.sort(data.test)[: int(p.num_eval)]
        self.num_classes = data.num_classes
        logging.info("online probe: %s, %d fitted / %d scored rows; scored rows held out of "
                     "pretraining: %s", p.task, len(fit), len(scored),
                     backbone.held_out_of_pretraining(task, config))
        bs = int(p.batch_size)
        self.batches = {"fit": labeled.eval_arrays(data, fit, bs),
                        "scored": labeled.eval_arrays(data, scored, bs)}
        self.labels = {"fit": data.labels[fit], "scored": data.labels[scored]}
        model = FinetuneModel(backbone_config=config, num_outputs=1, pool=p.pool, norm="none")

        def features(params, batch):
            inputs = {k: v for k, v in batch.items() if k not in ("label", "valid")}
            return model.apply({"params": {"backbone": params}}, inputs, method=model.features)

        self._features = jax.jit(features)

    def features(self, params: dict, split: str) -> np.ndarray:
        out = []
        for batch in self.batches[split]:
            f = np.asarray(jax.device_get(self._features(params, batch)), np.float64)
            out.append(f[batch["valid"]])
        return np.concatenate(out)

    def __call__(self, params: dict, ema_params: dict) -> dict[str, float]:
        """Scores the teacher (or student) features; adds `probe_seconds`."""
        t0 = time.perf_counter()
        p = self.config.probe
        # The teacher's view (SPEC 4): EMA leaves in place, leaf by leaf (a
        # partial `ema_params`, e.g. audio 1.0's shared conv positions, keeps
        # the student's other leaves of the same module).
        view = (train_state.teacher_view(params, ema_params, self.config)
                if p.params == "teacher" else params)
        fx, sx = self.features(view, "fit"), self.features(view, "scored")
        fy, sy = self.labels["fit"], self.labels["scored"]
        out = {}
        if "knn" in p.kinds:
            out["probe_knn"] = score(knn_predict(fx, fy, sx, int(p.k), self.classify,
                                                 self.num_classes), sy, self.classify)
        if "linear" in p.kinds:
            out["probe_linear"] = score(ridge_predict(fx, fy, sx, float(p.ridge), self.classify,
                                                      self.num_classes), sy, self.classify)
        out["probe_seconds"] = time.perf_counter() - t0
        return out


def run_offline(workdir: str, probe_config: ml_collections.ConfigDict,
                step: int | None = None) -> dict[str, float]:
    """The probe on a saved pretraining run with `probe_config` as its `probe`
    section (e.g. `experiments/common.py:probe(...)`): compares finished runs,
    including ones that ran without a probe."""
    restored, config = checkpoint.restore_params(workdir, step, subtrees=("params", "ema_params"))
    config = ml_collections.ConfigDict(config.to_dict())
    config.probe = ml_collections.ConfigDict(probe_config.to_dict())
    return OnlineProbe(config)(restored["params"], restored["ema_params"])
