r"""Fine-tuning and linear probes of a data2vec encoder on labeled data.

  python -m d2v_jax.finetune --config experiments/finetune.py:mnist_5k \
      --init_from runs/tiny_v2 --workdir runs/ft   [--config.data.label_fraction=0.05 ...]

`--init_from` names a pretraining work dir: its checkpoint's student (or, with
`init.params=teacher`, EMA teacher) weights initialize the encoder, exactly;
the architecture and input normalization come from that checkpoint's config.
Without it the `backbone` (an experiment, or a pretraining work dir: its
architecture) trains from scratch.

Modes (`config.mode`):
- `linear_probe`: the encoder is frozen (features under stop_gradient, its
  updates set to zero), a LayerNorm + linear head on mean-pooled or CLS
  features is trained.
- `finetune`: everything trains; block i of L gets lr * layer_decay^(L - i),
  the front-end layer_decay^(L + 1), the head 1 (BEiT / data2vec recipe). The
  scale is applied per slice of the scanned `blocks` axis.

Heads: classification (cross-entropy; accuracy and macro-F1) or regression
(squared error on standardized targets; RMSE and MAE in the target's units).
Test metrics are on the split fixed by `data.split_seed`, at the last step (no
model selection on the test set). Writes `workdir/results.json`,
`workdir/metrics.jsonl` and `workdir/finetune.png`.
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from d2v_jax import metrics as metrics_lib
from d2v_jax import checkpoint, modalities, optim
from d2v_jax.config import load_config, parse_overrides
from d2v_jax.data import labeled

MODES = ("finetune", "linear_probe")
POOLS = ("mean", "cls")
HEAD_NORMS = ("batch", "layer", "none")
INIT_PARAMS = ("student", "teacher")


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------

def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"config.{field}: {msg}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ValueError naming the first impossible field of a fine-tune config."""
    _check(config.mode in MODES, "mode", f"{config.mode!r} not in {MODES}")
    _check(config.task in labeled.TASKS, "task", f"{config.task!r} not in {labeled.TASKS}")
    _check(config.head.pool in POOLS, "head.pool", f"{config.head.pool!r} not in {POOLS}")
    _check(config.head.norm in HEAD_NORMS, "head.norm", f"{config.head.norm!r} not in {HEAD_NORMS}")
    _check(config.init.params in INIT_PARAMS, "init.params",
           f"{config.init.params!r} not in {INIT_PARAMS}")
    _check(0 < config.optim.layer_decay <= 1, "optim.layer_decay",
           f"{config.optim.layer_decay} is not in (0, 1]")
    _check(config.data.batch_size >= 1, "data.batch_size", f"{config.data.batch_size} < 1")
    _check(config.data.eval_batch_size >= 1, "data.eval_batch_size",
           f"{config.data.eval_batch_size} < 1")
    _check(config.optim.schedule in ("cosine", "constant"), "optim.schedule",
           f"{config.optim.schedule!r} is not 'cosine' or 'constant'")
    _check(0 <= config.loss.label_smoothing < 1, "loss.label_smoothing",
           f"{config.loss.label_smoothing} is not in [0, 1)")
    return config


def num_steps(config: ml_collections.ConfigDict, num_labels: int) -> int:
    """`train.num_steps` if set, else ceil(epochs * labels / batch) clipped to
    [min_steps, max_steps]."""
    t = config.train
    if t.num_steps is not None:
        _check(t.num_steps >= 1, "train.num_steps", f"{t.num_steps} < 1")
        return int(t.num_steps)
    steps = math.ceil(t.epochs * num_labels / config.data.batch_size)
    return int(min(max(steps, t.min_steps), t.max_steps))


# --------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------

def load_pretrained(workdir: str, which: str = "student", step: int | None = None
                    ) -> tuple[dict, ml_collections.ConfigDict]:
    """(encoder params, pretraining config) from a pretraining work dir.

    `which='teacher'` returns the teacher's view: the student's params with the
    EMA subtrees (SPEC 4) in place of the student's. Only the params are read,
    never the optimizer state.
    """
    if which not in INIT_PARAMS:
        raise ValueError(f"init.params={which!r}; expected one of {INIT_PARAMS}")
    subtrees = ("params", "ema_params") if which == "teacher" else ("params",)
    restored, config = checkpoint.restore_params(workdir, step, subtrees=subtrees)
    if which == "teacher":
        return {**restored["params"], **restored["ema_params"]}, config
    return restored, config


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

class FinetuneModel(nn.Module):
    """The pretraining model's `encode` (as `backbone`), pooled, then a head.

    `freeze_backbone` stops gradients at the features: a probe never
    differentiates through the encoder.
    """

    backbone_config: ml_collections.ConfigDict
    num_outputs: int
    pool: str = "mean"
    norm: str = "layer"
    bn_momentum: float = 0.9
    init_std: float = 2e-5
    freeze_backbone: bool = False

    def setup(self):
        self.backbone = modalities.build_model(self.backbone_config)
        if self.norm == "layer":
            self.fc_norm = nn.LayerNorm(epsilon=1e-6, name="fc_norm")
        elif self.norm == "batch":
            # MAE's probe: per-channel standardization over the batch, no affine.
            # Pooled features share a large common component that per-sample
            # LayerNorm keeps; a linear head then needs huge weights.
            self.fc_norm = nn.BatchNorm(momentum=self.bn_momentum, epsilon=1e-6, use_bias=False,
                                        use_scale=False, name="fc_norm")
        self.head = nn.Dense(self.num_outputs, name="head",
                             kernel_init=nn.initializers.truncated_normal(self.init_std))

    def features(self, batch: dict[str, jax.Array]) -> jax.Array:
        h = self.backbone.encode(batch)  # [B, T, D]
        # Models with a CLS (or <s>) position put it first; others pool every position.
        cls_first = getattr(self.backbone, "cls_first", False)
        if self.pool == "cls":
            if not cls_first:
                raise ValueError(f"head.pool='cls': the {self.backbone_config.modality} "
                                 "model has no CLS position")
            f = h[:, 0]
        else:
            keep = jnp.ones(h.shape[:2], h.dtype)
            pad = batch.get("padding_mask")
            if pad is not None and hasattr(self.backbone, "frame_padding"):
                # Audio: the mask is over samples; the encoder's positions are conv frames.
                pad = self.backbone.frame_padding(batch, h.shape[1])
            if pad is not None:
                keep = keep * (~pad).astype(h.dtype)
            if cls_first:
                keep = keep.at[:, 0].set(0)
            f = jnp.einsum("btd,bt->bd", h, keep) / jnp.maximum(keep.sum(1, keepdims=True), 1)
        return jax.lax.stop_gradient(f) if self.freeze_backbone else f

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> jax.Array:
        f = self.features(batch)
        if self.norm == "layer":
            f = self.fc_norm(f)
        elif self.norm == "batch":
            f = self.fc_norm(f, use_running_average=not train)
        return self.head(f.astype(jnp.float32))


def build_model(config: ml_collections.ConfigDict, backbone_config: ml_collections.ConfigDict,
                num_outputs: int) -> FinetuneModel:
    h = config.head
    return FinetuneModel(backbone_config, num_outputs, pool=h.pool, norm=h.norm,
                         bn_momentum=h.bn_momentum,
                         init_std=h.init_std, freeze_backbone=config.mode == "linear_probe")


def load_backbone_into(params: dict, pretrained: dict) -> dict:
    """`params` with its `backbone` subtree replaced by the matching subtrees of
    `pretrained` (exact arrays). The pretraining-only parts (decoder, prediction
    head) are dropped; a missing key or a shape mismatch is an error naming it."""
    want = flax.traverse_util.flatten_dict(params["backbone"], sep="/")
    have = flax.traverse_util.flatten_dict(pretrained, sep="/")
    missing = sorted(k for k in want if k not in have)
    if missing:
        raise ValueError(f"the pretrained checkpoint lacks encoder params {missing[:5]} "
                         f"(of {len(missing)}); it has {sorted(have)[:5]}...")
    bad = [(k, have[k].shape, want[k].shape) for k in want if have[k].shape != want[k].shape]
    if bad:
        raise ValueError(f"pretrained param shapes differ from the model's: {bad[:5]}")
    backbone = flax.traverse_util.unflatten_dict({k: jnp.asarray(have[k]) for k in want}, sep="/")
    return {**params, "backbone": backbone}


# --------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------

def _keys(path) -> list[str]:
    return [str(getattr(k, "key", k)) for k in path]


def layer_scales(params: Any, depth: int, decay: float, top: tuple[str, ...] = ()) -> Any:
    """Per-parameter lr multipliers (BEiT's layer-wise decay), one pytree.

    Scanned block params are stacked [L, ...]: their multiplier is an array
    [L, 1, ...] with decay^(L - i) for block i, so one update scales each layer's
    slice. Front-end params get decay^(L + 1); everything else (final norm,
    head, names in `top`) gets 1.
    """
    layer_scale = (decay ** (depth - np.arange(depth))).astype(np.float32)

    def scale(path, leaf):
        keys = _keys(path)
        if keys[0] != "backbone" or any(t in keys for t in top):
            return np.float32(1.0)
        if any(k in optim.SCANNED_MODULES for k in keys):
            if leaf.shape[0] != depth:
                raise ValueError(f"scanned param {'/'.join(keys)} has leading axis "
                                 f"{leaf.shape[0]}, expected model.depth={depth}")
            return layer_scale.reshape((depth,) + (1,) * (leaf.ndim - 1))
        if "frontend" in keys:
            return np.float32(decay ** (depth + 1))
        return np.float32(1.0)

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by its entry of `scales` (broadcast)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def make_schedule(config: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    o = config.optim
    warmup = min(o.warmup_steps, max(steps - 1, 0))
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(steps, warmup + 1),
                                                  o.lr * o.end_lr_ratio)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, max(warmup, 1)), optax.constant_schedule(o.lr)], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, params: Any, depth: int, steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (no decay on 1-D params) with layer-wise lr decay; for a linear
    probe the backbone's updates are exactly zero (and it keeps no Adam state)."""
    o = config.optim
    schedule = make_schedule(config, steps)
    parts = []
    if o.clip_norm and o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=optim.decay_mask))
    if o.layer_decay < 1:
        parts.append(scale_by_tree(layer_scales(params, depth, o.layer_decay,
                                                tuple(o.layer_decay_top))))
    tx = optax.chain(*parts)
    if config.mode == "linear_probe":
        labels = {k: ("frozen" if k == "backbone" else "train") for k in params}
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


# --------------------------------------------------------------------------
# Steps and metrics
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------

HEADLINE = {"classification": "accuracy", "regression": "rmse"}


def backbone_config_for(config: ml_collections.ConfigDict, init_from: str | None):
    """(pretrained encoder params or None, the backbone's pretraining config)."""
    if init_from:
        params, bconfig = load_pretrained(init_from, config.init.params, config.init.step)
        if bconfig.modality != config.modality:
            raise ValueError(f"--init_from={init_from!r} holds a {bconfig.modality!r} model; "
                             f"config.modality is {config.modality!r}")
        return params, bconfig
    if os.path.isdir(config.backbone):  # a pretraining run: its architecture, fresh weights
        return None, checkpoint.restore_config(config.backbone)
    return None, load_config(config.backbone)


def prepare_backbone(bconfig: ml_collections.ConfigDict, init_from: str | None,
                     workdir: str | None) -> ml_collections.ConfigDict:
    """The modality's run-level set-up of the backbone config (its
    `Modality.prepare_backbone`, e.g. the text tokenizer), on a copy."""
    bconfig = ml_collections.ConfigDict(bconfig.to_dict())
    return modalities.get(bconfig).prepare_backbone(bconfig, init_from, workdir)


def make_labeled_data(config: ml_collections.ConfigDict,
                      backbone_config: ml_collections.ConfigDict) -> labeled.LabeledData:
    """The task of `config` (a fine-tune config) read with `backbone_config`'s
    preprocessing by the modality's `labeled_parts`; splits as in
    `data.labeled.labeled_data`."""
    entry = modalities.get(config)
    if entry.labeled_parts is None:
        raise ValueError(f"config.modality={config.modality!r} has no labeled data for "
                         "fine-tuning (its Modality record sets no labeled_parts)")
    if config.task not in labeled.TASKS:
        raise ValueError(f"config.task={config.task!r}; expected one of {labeled.TASKS}")
    return labeled.labeled_data(config, *entry.labeled_parts(config, backbone_config))


def label_efficiency_arms(init_from: str, both: str, pretrained: str, scratch: str) -> dict:
    """{arm: fine-tune config overrides}. Scratch builds the pretraining run's own
    architecture (its saved config, --pretrain_overrides included) unless its
    overrides name another `backbone`: the arms differ only in the initial weights."""
    common = parse_overrides(both)
    return {"pretrained": {**common, **parse_overrides(pretrained)},
            "scratch": {"backbone": init_from, **common, **parse_overrides(scratch)}}


def held_out_of_pretraining(config: ml_collections.ConfigDict,
                            bconfig: ml_collections.ConfigDict) -> bool:
    """Whether the pretraining run kept this fine-tune's test split out: same
    source, and its `data.holdout_fraction` / `holdout_seed` equal to our
    `data.test_fraction` / `split_seed` (data/pipeline.py `holdout_split`)."""
    d, b = config.data, bconfig.data
    return (b.get("source") == d.source and b.get("path", "") == d.get("path", "")
            and float(b.get("holdout_fraction", 0.0)) == float(d.test_fraction)
            and int(b.get("holdout_seed", -1)) == int(d.split_seed))


@dataclasses.dataclass
class Run:
    """Everything a fine-tune run needs, built by `prepare` before any step."""

    config: ml_collections.ConfigDict
    backbone_config: ml_collections.ConfigDict
    data: labeled.LabeledData
    model: FinetuneModel
    state: FinetuneState
    train_step: Any
    predict_step: Any
    num_steps: int
    init_from: str | None


def prepare(config: ml_collections.ConfigDict, init_from: str | None = None,
            *, pretrained: tuple[dict, ml_collections.ConfigDict] | None = None,
            workdir: str | None = None) -> Run:
    """Data, model, jitted steps and the initial state: the head from
    `config.seed`, the encoder from the `init_from` checkpoint (exact weights)
    or from `config.seed` too when training from scratch.

    `pretrained` = (params, config) skips reading `init_from` again (the
    benchmark restores once for many runs); `init_from` is then just recorded.
    `workdir` holds what a scratch backbone builds (the text tokenizer).
    """
    validate(config)
    if pretrained is not None:
        init_params, bconfig = pretrained
    else:
        init_params, bconfig = backbone_config_for(config, init_from)
    bconfig = prepare_backbone(bconfig, init_from if init_params is not None else None, workdir)
    data = make_labeled_data(config, bconfig)
    classify = config.task == "classification"
    num_outputs = config.head.num_outputs or (data.num_classes if classify else 1)
    if classify and num_outputs < data.num_classes:
        raise ValueError(f"config.head.num_outputs={num_outputs} < {data.num_classes} classes in the data")
    target_stats = (0.0, 1.0)
    if not classify and config.loss.standardize_targets:
        used = data.labels[data.train]
        target_stats = (float(used.mean()), float(used.std()) or 1.0)
    steps = num_steps(config, len(data.train))

    model = build_model(config, bconfig, num_outputs)
    sample = labeled.eval_arrays(data, data.test[:1], 1)[0]
    sample.pop("valid")
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(config.seed), sample))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    if init_params is not None:
        params = load_backbone_into(params, init_params)
    # The seed and label fraction do not change the compiled program.
    cache_key = json.dumps([_without(config, ("seed",), ("data", "label_fraction")),
                            bconfig.model.to_json_best_effort(), num_outputs, steps, target_stats])
    if cache_key not in _STEP_CACHE:
        tx, schedule = make_optimizer(config, params, bconfig.model.depth, steps)
        _STEP_CACHE[cache_key] = (tx, *make_steps(config, model, tx, schedule, target_stats))
    tx, train_step, predict_step = _STEP_CACHE[cache_key]
    # Fresh buffers: the train step donates the state.
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    state = FinetuneState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          batch_stats=batch_stats)
    return Run(config, bconfig, data, model, state, train_step, predict_step, steps, init_from)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       init_from: str | None = None, *,
                       pretrained: tuple[dict, ml_collections.ConfigDict] | None = None
                       ) -> tuple[FinetuneState, dict]:
    """Trains a head (and, unless probing, the encoder) on the task's labels.
    Returns the final state and the results dict written to `workdir/results.json`."""
    t0 = time.perf_counter()
    run = prepare(config, init_from, pretrained=pretrained, workdir=workdir)
    data, steps, state = run.data, run.num_steps, run.state
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    logging.info("%s %s on %s: %d training labels (%.1f%% of %d), %d test, %d steps, init %s",
                 config.mode, config.task, config.data.source, len(data.train),
                 100 * config.data.label_fraction, len(data.train_pool), len(data.test), steps,
                 init_from or "scratch")
    eval_batches = labeled.eval_arrays(data, data.test, config.data.eval_batch_size)
    batches = iter(labeled.train_dataset(data, config.data.batch_size, config.seed,
                                         num_threads=config.data.num_threads))

    writer = metrics_lib.MetricWriter(workdir, tensorboard=False)
    history, pending = [], None
    log_every, eval_every = max(config.train.log_every, 1), config.train.eval_every
    t_train = time.perf_counter()
    for step in range(steps):
        state, step_metrics = run.train_step(state, next(batches))
        if pending is not None:  # fetched after the next step is dispatched
            _write(writer, *pending)
            pending = None
        done = step + 1
        if done % log_every == 0 or done == steps:
            pending = (done, step_metrics)
        if eval_every and done % eval_every == 0 and done < steps:
            history.append({"step": done, **evaluate(run.predict_step, state,
                                                     eval_batches, config.task)})
    if pending is not None:
        _write(writer, *pending)
    writer.close()
    train_time = time.perf_counter() - t_train
    final = evaluate(run.predict_step, state, eval_batches, config.task)
    history.append({"step": steps, **final})

    results = {
        "task": config.data.source, "modality": config.modality, "kind": config.task,
        "mode": config.mode, "init_from": os.path.abspath(init_from) if init_from else None,
        "init_params": config.init.params if init_from else "scratch",
        "seed": int(config.seed), "label_fraction": float(config.data.label_fraction),
        "num_labels": int(len(data.train)), "num_train_pool": int(len(data.train_pool)),
        "num_test": int(len(data.test)), "split_seed": int(config.data.split_seed),
        "class_names": data.class_names,  # label id i is class_names[i]
        "test_held_out_of_pretraining": (held_out_of_pretraining(config, run.backbone_config)
                                         if init_from else None),
        "num_steps": steps, "metrics": final, "headline": HEADLINE[config.task],
        "history": history, "train_seconds": train_time,
        "wall_seconds": time.perf_counter() - t0,
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(workdir, results)
    logging.info("test %s", json.dumps(final))
    return state, results


def _write(writer, step, device_metrics):
    scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not np.isfinite(scalars["loss"]):
        raise FloatingPointError(f"fine-tune loss is {scalars['loss']} at step {step}")
    writer.write(step, scalars)


# Jitted steps by everything that shapes the program (not seed / labels / weights),
# so the benchmark's many runs compile once per arm.
_STEP_CACHE: dict[str, tuple] = {}


def _without(config: ml_collections.ConfigDict, *paths: tuple[str, ...]) -> str:
    d = json.loads(config.to_json_best_effort())
    for path in paths:
        node = d
        for k in path[:-1]:
            node = node[k]
        node.pop(path[-1], None)
    return json.dumps(d, sort_keys=True)


def plot(workdir: str, results: dict) -> None:
    """Train loss and the test metric against step -> workdir/finetune.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(workdir, "metrics.jsonl")
    rows = metrics_lib.read_jsonl(path) if os.path.exists(path) else []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax1.set(xlabel="step", ylabel="train loss", title=f"{results['mode']} on {results['task']}")
    key = results["headline"]
    hist = results["history"]
    ax2.plot([h["step"] for h in hist], [h[key] for h in hist], marker="o")
    ax2.set(xlabel="step", ylabel=f"test {key}",
            title=f"{results['num_labels']} labels, init {results['init_params']}")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "finetune.png"), dpi=100)
    plt.close(fig)


def _define_flags() -> None:
    # Defined only when run as a program, so that importing this module next to
    # d2v_jax.train (which owns --config/--workdir at import) does not clash.
    config_flags.DEFINE_config_file(
        "config", None, "Fine-tune experiment and arg, e.g. experiments/finetune.py:mnist_5k.",
        lock_config=True)
    flags.DEFINE_string("init_from", None, "Pretraining work dir to initialize the encoder from; "
                        "absent = train from scratch.")
    flags.DEFINE_string("workdir", None, "Directory for results.json, metrics and the plot.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    pylogging.getLogger("absl").setLevel(pylogging.INFO)
    f = flags.FLAGS
    train_and_evaluate(f.config, f.workdir, f.init_from)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
