"""The train state, loss, jitted train / predict steps, evaluation and metrics
(classification, regression, and CTC speech recognition: `make_ctc_steps`,
`evaluate_ctc`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from d2v_jax.finetune import ctc
from d2v_jax.finetune.metrics import binary_f1, extra_metrics


@flax.struct.dataclass
class FinetuneState:
    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any  # the head's BatchNorm statistics ({} without one)
    rng: Any = None  # the key of dropout, masks and augmentation (folded with the step)


def compute_loss(config: ml_collections.ConfigDict, outputs: jax.Array, labels: jax.Array,
                 target_stats: tuple[float, float], soft_targets: jax.Array | None = None
                 ) -> jax.Array:
    """Cross-entropy (with `loss.label_smoothing`), or against `soft_targets`
    [B, K] when the batch was mixed (timm's SoftTargetCrossEntropy: the mean
    over rows of -sum_k t_k log softmax_k); regression: squared error on the
    standardized targets."""
    if soft_targets is not None:
        return jnp.mean(optax.softmax_cross_entropy(outputs.astype(jnp.float32), soft_targets))
    if config.task == "classification":
        onehot = jax.nn.one_hot(labels, outputs.shape[-1])
        onehot = optax.smooth_labels(onehot, config.loss.label_smoothing)
        return jnp.mean(optax.softmax_cross_entropy(outputs, onehot))
    mean, std = target_stats
    y = (labels.astype(jnp.float32) - mean) / std
    return jnp.mean(jnp.square(outputs[:, 0] - y))


def make_steps(config, model, tx, schedule, target_stats, augment=None):
    """(train_step, predict_step), jitted; the train state is donated.

    `augment` (the task's in-step augmentation, e.g. the image recipes' erasing
    noise and mixup / cutmix: `(inputs, labels, num_classes, key) -> (inputs,
    soft targets)`) runs first, from fold_in(state.rng, step), which also keys
    the encoder's dropout / drop path and the head's dropout."""
    if config.task == "ctc":
        return make_ctc_steps(config, model, tx, schedule)

    def train_step(state: FinetuneState, batch):
        k_aug, k_drop = jax.random.split(jax.random.fold_in(state.rng, state.step))
        labels, soft = batch["label"], None
        if augment is not None:
            inputs = {k: v for k, v in batch.items() if k != "label"}
            inputs, soft = augment(inputs, labels, model.num_outputs, k_aug)
            batch = {**inputs, "label": labels}

        def loss_fn(params):
            out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                        batch, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": k_drop})
            loss = compute_loss(config, out, labels, target_stats, soft)
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
    return float(np.mean([binary_f1(labels, preds, c) for c in np.union1d(labels, preds)]))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    preds = np.argmax(logits, axis=-1)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return {"accuracy": float(np.mean(preds == labels)), "macro_f1": macro_f1(labels, preds),
            "loss": float(-np.mean(logp[np.arange(len(labels)), labels]))}


def regression_metrics(preds: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    err = preds.astype(np.float64) - targets.astype(np.float64)
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err)))}


# Batch keys that are targets or bookkeeping, not model inputs (the inputs are
# the modality's: waveform and padding mask for speech).
CTC_TARGETS = ("labels", "label_paddings", "valid", "index")


def ctc_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in CTC_TARGETS}


def make_ctc_steps(config, model, tx, schedule):
    """(train_step, predict_step) of CTC fine-tuning, jitted; the state is
    donated. Training draws the fine-tuning masks and dropout from
    fold_in(state.rng, step); the loss is `ctc.ctc_loss` with the frame padding
    from the conv arithmetic and the label padding. predict_step returns the
    greedy ids per frame [B, T] and the per-utterance CTC loss [B]."""
    blank, l = config.loss.blank, config.loss

    def frame_paddings(logits, pad):
        if pad is None:
            return jnp.zeros(logits.shape[:2], jnp.float32)
        return pad.astype(jnp.float32)

    def train_step(state: FinetuneState, batch):
        k_mask, k_drop = jax.random.split(jax.random.fold_in(state.rng, state.step))
        inputs = ctc_inputs(batch)

        def loss_fn(params):
            logits, pad = model.apply({"params": params}, inputs, train=True,
                                      rngs={"mask": k_mask, "dropout": k_drop})
            return ctc.ctc_loss(logits, frame_paddings(logits, pad), batch["labels"],
                                batch["label_paddings"], blank=blank, weights=batch["valid"],
                                reduction=l.ctc_reduction, zero_infinity=l.zero_infinity)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def predict_step(params, batch_stats, batch):
        del batch_stats
        inputs = ctc_inputs(batch)
        logits, pad = model.apply({"params": params}, inputs)
        lp = frame_paddings(logits, pad)
        loss = optax.ctc_loss(logits, lp, batch["labels"], batch["label_paddings"], blank_id=blank)
        return ctc.greedy_ids(logits, lp, blank), loss

    return jax.jit(train_step, donate_argnums=(0,)), jax.jit(predict_step)


@dataclasses.dataclass
class CTCPredict:
    """A run's CTC predict step with what evaluation needs to decode: the
    vocabulary, the test references, and the decoded examples of the last
    evaluation (the first `num_examples` test utterances)."""

    step: Any
    vocab: ctc.Vocab
    references: dict[str, list[str]]  # per evaluation set, utterance i's words
    num_examples: int = 8
    last_examples: list = dataclasses.field(default_factory=list)

    def __call__(self, params, batch_stats, batch):
        return self.step(params, batch_stats, batch)


def evaluate_ctc(predict: CTCPredict, state: FinetuneState,
                 batches: dict[str, list]) -> dict[str, float]:
    """Greedy-decodes every utterance of each evaluation set ({name: batches},
    the first is the headline one): corpus WER and CER and the mean CTC loss of
    the utterances whose labels fit their frames, as `wer`, `cer`, `loss` for
    the first set and `wer_<name>`, `cer_<name>`, `loss_<name>` for each set
    when there are several; sets `predict.last_examples` (of the first set)."""
    out = {}
    for k, (name, set_batches) in enumerate(batches.items()):
        m, examples = _decode_set(predict, state, set_batches, predict.references[name])
        if k == 0:
            out.update(m)
            predict.last_examples = examples
        if len(batches) > 1:
            out.update({f"{key}_{name}": v for key, v in m.items()})
    return out


def _decode_set(predict: CTCPredict, state: FinetuneState, batches, references):
    hyps, losses = {}, []
    for b in batches:
        ids, loss = predict(state.params, state.batch_stats,
                            {k: v for k, v in b.items() if k not in ("valid", "index")})
        ids, loss = np.asarray(ids), np.asarray(loss)
        for r in np.flatnonzero(b["valid"] > 0):
            hyps[int(b["index"][r])] = predict.vocab.decode(ctc.collapse(ids[r], predict.vocab.blank))
            if loss[r] < 1e4:  # optax's stand-in for an impossible alignment is ~1e5
                losses.append(float(loss[r]))
    order = sorted(hyps)
    refs, hs = [references[i] for i in order], [hyps[i] for i in order]
    examples = [{"index": i, "reference": r, "hypothesis": h}
                for i, r, h in zip(order[:predict.num_examples], refs, hs)]
    return {"wer": ctc.wer(refs, hs), "cer": ctc.cer(refs, hs),
            "loss": float(np.mean(losses)) if losses else float("nan")}, examples


def evaluate(predict_step, state: FinetuneState, batches, task: str, *,
             metrics: tuple[str, ...] = (), groups: dict[str, np.ndarray] | None = None
             ) -> dict[str, float]:
    """Test metrics. CTC: {set name: batches of utterances}. Otherwise one list
    of batches per test-time view (`labeled.eval_arrays(..., view)`, the same
    examples in the same order); with several views the predictions are
    averaged: regression outputs, and class log-probabilities (a normalized
    geometric mean). `metrics` adds the named ones of finetune/metrics.py;
    `groups` {name: positions in the test order} adds every metric of each
    group as `<metric>_<name>` (MNLI's matched / mismatched dev sets)."""
    if task == "ctc":
        return evaluate_ctc(predict_step, state, batches)
    views = []
    for view in batches:
        outs, labels = [], []
        for b in view:
            out = np.asarray(predict_step(state.params, state.batch_stats,
                                          {k: v for k, v in b.items() if k != "valid"}))
            outs.append(out[b["valid"]])
            labels.append(b["label"][b["valid"]])
        outs = np.concatenate(outs).astype(np.float64)
        if task == "classification":
            outs = outs - np.logaddexp.reduce(outs, axis=-1, keepdims=True)
        views.append(outs)
    outs, labels = np.mean(views, axis=0), np.concatenate(labels)

    def score(o, y):
        m = classification_metrics(o, y) if task == "classification" else regression_metrics(o, y)
        return {**m, **extra_metrics(metrics, o, y, task)}

    out = score(outs, labels)
    for name, positions in (groups or {}).items():
        out.update({f"{k}_{name}": v for k, v in score(outs[positions], labels[positions]).items()})
    return out
