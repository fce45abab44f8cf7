"""The train state, loss, jitted train / predict steps, evaluation and metrics."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


@flax.struct.dataclass
class FinetuneState:
    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any  # the head's BatchNorm statistics ({} without one)


def compute_loss(config: ml_collections.ConfigDict, outputs: jax.Array, labels: jax.Array,
                 target_stats: tuple[float, float]) -> jax.Array:
    if config.task == "classification":
        onehot = jax.nn.one_hot(labels, outputs.shape[-1])
        onehot = optax.smooth_labels(onehot, config.loss.label_smoothing)
        return jnp.mean(optax.softmax_cross_entropy(outputs, onehot))
    mean, std = target_stats
    y = (labels.astype(jnp.float32) - mean) / std
    return jnp.mean(jnp.square(outputs[:, 0] - y))


def make_steps(config, model, tx, schedule, target_stats):
    """(train_step, predict_step), jitted; the train state is donated."""

    def train_step(state: FinetuneState, batch):
        def loss_fn(params):
            out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                        batch, train=True, mutable=["batch_stats"])
            loss = compute_loss(config, out, batch["label"], target_stats)
            return loss, new_vars.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             batch_stats=batch_stats), metrics

    def predict_step(params, batch_stats, batch):
        out = model.apply({"params": params, "batch_stats": batch_stats}, batch)
        if config.task == "regression":
            mean, std = target_stats
            return out[:, 0] * std + mean
        return out

    return jax.jit(train_step, donate_argnums=(0,)), jax.jit(predict_step)


def macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in `labels`
    or `preds` (sklearn's `f1_score(average='macro')`; 0 where undefined)."""
    classes = np.union1d(labels, preds)
    f1 = []
    for c in classes:
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        denom = 2 * tp + fp + fn
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    preds = np.argmax(logits, axis=-1)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return {"accuracy": float(np.mean(preds == labels)), "macro_f1": macro_f1(labels, preds),
            "loss": float(-np.mean(logp[np.arange(len(labels)), labels]))}


def regression_metrics(preds: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    err = preds.astype(np.float64) - targets.astype(np.float64)
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err)))}


def evaluate(predict_step, state: FinetuneState, batches, task: str) -> dict[str, float]:
    outs, labels = [], []
    for b in batches:
        out = np.asarray(predict_step(state.params, state.batch_stats,
                                      {k: v for k, v in b.items() if k != "valid"}))
        outs.append(out[b["valid"]])
        labels.append(b["label"][b["valid"]])
    outs, labels = np.concatenate(outs), np.concatenate(labels)
    if task == "classification":
        return classification_metrics(outs.astype(np.float64), labels)
    return regression_metrics(outs, labels)
