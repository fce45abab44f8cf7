"""The run: set-up (`prepare`), the training loop with its evaluation, the
results and the plot."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from d2v_jax import errors
from d2v_jax import metrics as metrics_lib
from d2v_jax.data import bad_samples, labeled
from d2v_jax.finetune.backbone import (backbone_config_for, held_out_of_pretraining,
                                       make_labeled_data, prepare_backbone,
                                       with_encoder_overrides)
from d2v_jax.finetune.config import num_steps, validate
from d2v_jax.finetune.model import FinetuneModel, build_model, load_backbone_into
from d2v_jax.finetune.optim import make_optimizer
from d2v_jax.finetune.steps import CTCPredict, FinetuneState, ctc_inputs, evaluate, make_steps

HEADLINE = {"classification": "accuracy", "regression": "rmse", "ctc": "cer"}


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
    bconfig = _prepare_backbone(config, bconfig, init_from if init_params is not None else None,
                                workdir)
    bconfig = with_encoder_overrides(config, bconfig)
    data = make_labeled_data(config, bconfig)
    classify, is_ctc = config.task == "classification", config.task == "ctc"
    # CTC: one output per letter unit (data.num_classes = the vocabulary size).
    num_outputs = config.head.num_outputs or (data.num_classes if classify or is_ctc else 1)
    if classify and num_outputs < data.num_classes:
        raise errors.ConfigError(f"config.head.num_outputs={num_outputs} < {data.num_classes} "
                                 "classes in the data")
    target_stats = (0.0, 1.0)
    if config.task == "regression" and config.loss.standardize_targets:
        used = data.labels[data.train]
        target_stats = (float(used.mean()), float(used.std()) or 1.0)
    steps = num_steps(config, len(data.train))

    model = build_model(config, bconfig, num_outputs)
    if is_ctc:
        sample = ctc_inputs(data.eval_batches(1)[0])
    else:
        sample = labeled.eval_arrays(data, data.test[:1], 1)[0]
        sample.pop("valid")
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(config.seed), sample))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    if init_params is not None:
        params = load_backbone_into(params, init_params)
    # The seed and label fraction do not change the compiled program.
    # The task's in-step augmentation (images: erasing noise, mixup / cutmix).
    augment = getattr(getattr(data, "train_transform", None), "device_augment", None)
    cache_key = json.dumps([_without(config, ("seed",), ("data", "label_fraction"),
                                     ("data", "train_minutes")),
                            bconfig.model.to_json_best_effort(), num_outputs, steps, target_stats,
                            repr(augment)])
    if cache_key not in _STEP_CACHE:
        tx, schedule = make_optimizer(config, params, bconfig.model.depth, steps)
        _STEP_CACHE[cache_key] = (tx, *make_steps(config, model, tx, schedule, target_stats,
                                                  augment))
    tx, train_step, predict_step = _STEP_CACHE[cache_key]
    # Fresh buffers: the train step donates the state.
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    state = FinetuneState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          batch_stats=batch_stats,
                          rng=jax.random.PRNGKey(config.seed))
    # Committed to the device, as the step's outputs are: an uncommitted first
    # state (the optimizer's fresh counters) would compile the step a second time.
    state = jax.device_put(state, jax.devices()[0])
    if is_ctc:  # decoding needs the vocabulary and the references
        predict_step = CTCPredict(predict_step, data.vocab,
                                  {name: data.references(name) for name in data.eval_sets},
                                  config.eval.num_examples)
    return Run(config, bconfig, data, model, state, train_step, predict_step, steps, init_from)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       init_from: str | None = None, *,
                       pretrained: tuple[dict, ml_collections.ConfigDict] | None = None
                       ) -> tuple[FinetuneState, dict]:
    """Trains a head (and, unless probing, the encoder) on the task's labels.
    Returns the final state and the results dict written to `workdir/results.json`."""
    t0 = time.perf_counter()
    # Checks before writes: the config, the backbone, the labels, every test
    # example and the first training batch are read before the work dir is
    # touched; a refused run leaves it as it was (a scratch text backbone's
    # newly trained tokenizer is removed again).
    errors.check_workdir(workdir)
    with errors.undo_additions(workdir):
        run = prepare(config, init_from, pretrained=pretrained, workdir=workdir)
        data, steps, state = run.data, run.num_steps, run.state
        if config.task == "ctc":  # length-bucketed transcribed speech
            eval_batches = {name: data.eval_batches(config.data.eval_batch_size, name)
                            for name in data.eval_sets}
            batches = data.train_batches(config.data.batch_size, config.seed)
        else:
            eval_batches = [labeled.eval_arrays(data, data.test, config.data.eval_batch_size, v)
                             for v in range(data.num_eval_views)]
            batches = iter(labeled.train_dataset(
                data, config.data.batch_size, config.seed, num_threads=config.data.num_threads,
                on_bad_sample=bad_samples.settings(config)[0]))
        batches = itertools.chain([next(batches)], batches)
    errors.make_workdir(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    n = jax.device_count()
    if pretrained is None:  # the benchmark's many runs stay quiet
        # The share actually drawn (data.train_minutes draws by minutes, not label_fraction).
        share = 100 * len(data.train) / max(len(data.train_pool), 1)
        print(f"finetune: {config.mode} {config.task} on {config.data.source}, "
              f"{len(data.train)} labels ({share:.1f}% of "
              f"{len(data.train_pool)}), {len(data.test)} test, {steps} steps, init "
              f"{init_from or 'scratch'}; {n} {jax.default_backend()} device{'s' if n != 1 else ''}"
              f", runs on 1 (jit, no mesh)", flush=True)

    writer = metrics_lib.MetricWriter(workdir, tensorboard=False)
    history, pending = [], None
    log_every, eval_every = max(config.train.log_every, 1), config.train.eval_every
    # Unreadable training examples replaced (data.on_bad_sample), counted and listed.
    bad = bad_samples.BadSampleLog(config, workdir, len(data.train))
    t_train = time.perf_counter()
    for step in range(steps):
        batch, bad_fields = bad_samples.host_fields(next(batches))
        bad.add(bad_fields, step + 1)
        state, step_metrics = run.train_step(state, batch)
        if pending is not None:  # fetched after the next step is dispatched
            _write(writer, *pending)
            pending = None
        done = step + 1
        if done % log_every == 0 or done == steps:
            count = bad.check(done * int(config.data.batch_size))
            pending = (done, dict(step_metrics, bad_samples=count))
        if eval_every and done % eval_every == 0 and done < steps:
            history.append({"step": done, **_evaluate(run, state, eval_batches)})
    if pending is not None:
        _write(writer, *pending)
    writer.close()
    train_time = time.perf_counter() - t_train
    final = _evaluate(run, state, eval_batches)
    history.append({"step": steps, **final})

    results = {
        "task": config.data.source, "modality": config.modality, "kind": config.task,
        "mode": config.mode, "init_from": os.path.abspath(init_from) if init_from else None,
        "init_params": config.init.params if init_from else "scratch",
        "seed": int(config.seed), "label_fraction": float(config.data.label_fraction),
        "num_labels": int(len(data.train)), "num_train_pool": int(len(data.train_pool)),
        "num_test": int(len(data.test)), "split_seed": int(config.data.split_seed),
        # predictions averaged over this many inputs per test example (test-time views)
        "test_views": getattr(data, "num_eval_views", 1),
        "class_names": data.class_names,  # label id i is class_names[i]
        "test_held_out_of_pretraining": (held_out_of_pretraining(config, run.backbone_config, data)
                                         if init_from else None),
        "num_steps": steps, "metrics": final, "headline": headline(config),
        "history": history, "train_seconds": train_time,
        "bad_samples": bad.total,  # unreadable training examples replaced
        "wall_seconds": time.perf_counter() - t0,
    }
    if config.task == "ctc":
        results.update(_ctc_results(data, run.predict_step))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(workdir, results)
    logging.info("test %s", json.dumps(final))
    return state, results


def headline(config: ml_collections.ConfigDict) -> str:
    """The metric a run reports first: `eval.headline`, or the task kind's."""
    return config.get("eval", {}).get("headline", "") or HEADLINE[config.task]


def _evaluate(run: Run, state: FinetuneState, eval_batches) -> dict[str, float]:
    """`steps.evaluate` with the config's extra metrics (`eval.metrics`) and the
    data's test groups (MNLI's matched / mismatched)."""
    metrics = tuple(run.config.get("eval", {}).get("metrics", ()))
    return evaluate(run.predict_step, state, eval_batches, run.config.task, metrics=metrics,
                    groups=getattr(run.data, "test_groups", None))


def _prepare_backbone(config, bconfig, init_from, workdir):
    """`backbone.prepare_backbone`, its errors naming where the backbone came
    from: a scratch text backbone trains its tokenizer on the corpus of its
    pretraining config, which an experiment file's default does not name."""
    try:
        return prepare_backbone(bconfig, init_from, workdir)
    except errors.UserError as e:
        if init_from or not str(e).startswith("config.data.path is empty"):
            raise
        raise errors.ConfigError(
            f"config.backbone={config.backbone!r}: a scratch {bconfig.modality} backbone is set "
            "up as its pretraining would be (its tokenizer is trained on the backbone's corpus), "
            f"but the backbone config names no corpus ({e})",
            hint="pass --config.backbone=<a pretraining work dir> (its architecture and "
                 "tokenizer, fresh weights), or --init_from=<that work dir> for its weights "
                 "too") from e


def _ctc_results(data, predict: CTCPredict) -> dict:
    """The transcribed amounts and the decoded test examples of a CTC run
    (`test_*`: the first evaluation set, the headline one)."""
    rate = data.sample_rate
    return {"eval_sets": {name: {"utterances": len(s), "minutes": s.minutes(None, rate)}
                          for name, s in data.eval_sets.items()},
            "train_minutes": data.train_set.minutes(data.train, rate),
            "train_pool_minutes": data.train_set.minutes(None, rate),
            "test_minutes": data.test_set.minutes(None, rate),
            "test_speakers": sorted(set(data.test_set.speakers)),
            "train_speakers": sorted({data.train_set.speakers[i] for i in data.train}),
            "vocab": list(data.vocab.tokens), "examples": predict.last_examples}


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
