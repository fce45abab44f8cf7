r"""Times the compiled data2vec train step and prints one JSON line.

    python benchmarks/step_bench.py --config experiments/image.py:base_v2 --batch 64 --steps 50

What it does:
- builds the state born sharded over all devices (`parallel.make_mesh` +
  `create_sharded_train_state`, the train loop's main `jit` path) and the
  jitted step with the state donated;
- puts a few distinct batches of the pipeline's shapes on the devices first
  (random inputs, masks of the masker's exact counts), so the timed loop
  measures the step alone (the train loop overlaps input with
  `train.device_prefetch`);
- runs `--warmup` steps (compilation), then `--steps` steps, blocking on each
  step's outputs; reports median, p10 and p90 of the per-step wall times;
- counts XLA compilations (a `jax.monitoring` listener) and fails if any
  happens after the first step, or if the jit cache holds more than one entry;
- FLOPs: analytic (`d2v_jax.flops`, the MFU numerator) and XLA's
  `cost_analysis()` of the same step lowered with the layer scans unrolled
  (XLA counts a loop body once), with their ratio;
- MFU = model FLOPs / step time / (peak FLOP/s per device x devices).

Peak FLOP/s per device (dense, no sparsity), by `device_kind`: the bf16 tensor
core numbers of the data sheets (a float32 run against them reads low on
purpose: bf16 is what the hardware is for):

    H100 / H200 (SXM)   989 TFLOP/s    A100   312 TFLOP/s
    TPU v4              275            TPU v5e 197      TPU v5p 459

CPU has no data-sheet entry: the peak is measured here as the best float32
matmul rate of XLA:CPU on this machine (`--peak_tflops` overrides any entry).

`--dtype auto` computes in bfloat16 on GPU/TPU and float32 on CPU (params,
optimizer state and the EMA stay float32 either way); `--set key=value`
overrides any config field, e.g. `--set model.attention_impl=cudnn`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import d2v_jax
from d2v_jax import errors, flops, modalities, parallel
from d2v_jax.models import layers
from d2v_jax.config import set_field, validate
from d2v_jax.train_step import make_train_step

# device_kind substring (lower case) -> peak dense bf16 FLOP/s per device.
PEAK_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("tpu v5 lite", 197e12),  # v5e reports itself as "TPU v5 lite"
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def measured_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best float32 matmul FLOP/s of one device of the default backend."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, a))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(mm(a, a))
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops_per_device(device: jax.Device, override_tflops: float | None) -> tuple[float, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak_tflops"
    kind = device.device_kind.lower()
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak, f"table: {key} bf16 dense"
    if device.platform == "cpu":
        return measured_matmul_peak(), "measured float32 matmul (XLA:CPU, 2048^3)"
    raise SystemExit(f"step_bench: no peak FLOP/s known for device_kind {device.device_kind!r}; "
                     "pass --peak_tflops")


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as cudnn


def load(spec: str, batch: int | None, dtype: str, sets: list[str]):
    config = d2v_jax.load_config(spec)
    if config.modality == "text" and config.model.vocab_size is None:
        # Set by the tokenizer in a real run; FLOPs and step time barely depend
        # on it (an embedding gather), RoBERTa's size is the realistic one.
        set_field(config, "model.vocab_size", 50265)
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    set_field(config, "model.dtype", dtype)
    if batch is not None:
        set_field(config, "data.batch_size", batch)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"step_bench: --set expects key=value, got {item!r}")
        set_field(config, key, parse_value(value))
    validate(config)
    return config


def make_batches(config, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` batches of the pipeline's shapes: random inputs and masks with
    the maskers' exact per-row counts (random positions: FLOPs and shapes are
    what matter here, not the block pattern)."""
    rng = np.random.default_rng(seed)
    b = int(config.data.batch_size)
    out = []
    for _ in range(count):
        batch = dict(modalities.dummy_batch(config, b))
        if "image" in batch:  # uint8 pixels, as the pipeline ships them (normalized on device)
            batch["image"] = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
        if "audio" in batch:
            batch["audio"] = rng.standard_normal(batch["audio"].shape).astype(np.float32)
        if "tokens" in batch:
            batch["tokens"] = rng.integers(4, config.model.vocab_size, batch["tokens"].shape,
                                           dtype=np.int32)
            if "inputs" in batch:
                batch["inputs"] = np.repeat(batch["tokens"][:, None], config.masking.num_clones, 1)
        mask = batch["mask"]
        k = int(mask[0, 0].sum())  # dummy_batch's count is the masker's exact count
        scores = rng.random(mask.shape)
        batch["mask"] = scores < np.sort(scores, axis=-1)[..., k:k + 1] if k < mask.shape[-1] \
            else np.ones_like(mask)
        out.append(batch)
    return out


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while active."""

    EVENT = "backend_compile_duration"

    def __init__(self):
        self.count = 0

    def _listener(self, name, *args, **kwargs):
        if name.endswith(self.EVENT):
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def xla_step_flops(config) -> float:
    """XLA's FLOPs of the whole (global-batch, single-program) step, scans unrolled."""
    abstract = jax.eval_shape(lambda: d2v_jax.create_train_state(config, jax.random.PRNGKey(0)))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         modalities.dummy_batch(config, int(config.data.batch_size)))
    with flops.unrolled_scans():
        return flops.xla_flops(make_train_step(config), abstract, batch,
                               jax.ShapeDtypeStruct((2,), jnp.uint32))


def percentiles(times: list[float]) -> dict[str, float]:
    t = np.asarray(times)
    return {"median": float(np.median(t)), "p10": float(np.percentile(t, 10)),
            "p90": float(np.percentile(t, 90)), "min": float(t.min()), "mean": float(t.mean())}


def time_parts(config, state, batch, steps: int) -> dict[str, float]:
    """Median seconds of the step's pieces, each jitted alone on the same batch:
    the teacher (targets), the student forward+backward (given targets), the
    2.0 decoder forward+backward alone, and the optimizer + EMA update."""
    from d2v_jax import train_step as ts
    from d2v_jax.train_state import teacher_params
    model = modalities.build_model(config)
    rng = jax.random.PRNGKey(1)
    tparams = teacher_params(state.params, state.ema_params, config)

    teacher = jax.jit(lambda tp, b: ts.compute_targets(model, tp, b, config)[0])
    y = teacher(tparams, batch)

    student = jax.jit(jax.grad(lambda p, b, y: ts.student_loss(model, p, b, y, config, rng)[0]))
    fns = {"teacher_forward": (teacher, (tparams, batch)),
           "student_forward_backward": (student, (state.params, batch, y))}
    if "decoder" in state.params:
        rows = batch["mask"].shape[0] * batch["mask"].shape[1]
        seq = batch["mask"].shape[-1]
        x = jnp.zeros((rows, seq, config.model.dim), layers.dtype_of(config.model.dtype))

        def dec_loss(p, x):
            out = model.apply({"params": p}, x, method=lambda mdl, h: mdl.decoder(h))
            return jnp.sum(jnp.square(out.astype(jnp.float32)))

        fns["decoder_forward_backward"] = (jax.jit(jax.grad(dec_loss)), (state.params, x))
    out = {}
    for name, (fn, args) in fns.items():
        jax.block_until_ready(fn(*args))
        ts_ = []
        for _ in range(steps):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts_.append(time.perf_counter() - t)
        out[name] = float(np.median(ts_))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="experiments/<modality>.py:<arg>")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak per device, TFLOP/s")
    p.add_argument("--no_xla_check", action="store_true",
                   help="skip XLA's cost analysis (one extra compile with unrolled scans)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time teacher / student / decoder alone")
    p.add_argument("--profile_dir", default=None,
                   help="write a jax.profiler trace of 3 steps here (TensorBoard / Perfetto)")
    args = p.parse_args(argv)

    config = load(args.config, args.batch, args.dtype, args.set)
    devices = jax.devices()
    b = int(config.data.batch_size)
    if b % len(devices):
        raise SystemExit(f"step_bench: --batch {b} does not split over {len(devices)} devices")
    log(f"step_bench: {args.config} batch {b} on {len(devices)} x {devices[0].device_kind}")

    mesh = parallel.make_mesh(config)
    with CompileCounter() as compiles:
        state, shardings = parallel.create_sharded_train_state(
            config, jax.random.PRNGKey(config.seed), mesh)
        step = parallel.make_jit_train_step(config, mesh, shardings)
        sharding = parallel.batch_sharding(mesh)
        batches = [parallel.global_batch(x, sharding) for x in make_batches(config, 4)]
        rng = jax.random.PRNGKey(0)
        jax.block_until_ready((state, batches))
        before_first = compiles.count
        t0 = time.perf_counter()
        for i in range(max(args.warmup, 1)):
            state, metrics = step(state, batches[i % len(batches)], rng)
            jax.block_until_ready((state, metrics))
            if i == 0:
                first_step_s = time.perf_counter() - t0
                after_first = compiles.count
        times = []
        for i in range(args.steps):
            t = time.perf_counter()
            state, metrics = step(state, batches[i % len(batches)], rng)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t)
        recompiles = compiles.count - after_first
    cache = step._cache_size() if hasattr(step, "_cache_size") else None
    if recompiles or (cache is not None and cache != 1):
        raise SystemExit(f"step_bench: the step recompiled after the first step "
                         f"({recompiles} compilations, jit cache size {cache})")
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise SystemExit(f"step_bench: non-finite loss {loss}")

    if args.profile_dir:
        jax.profiler.start_trace(args.profile_dir)
        for i in range(3):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                state, metrics = step(state, batches[i % len(batches)], rng)
        jax.block_until_ready((state, metrics))
        jax.profiler.stop_trace()

    parts = time_parts(config, state, jax.tree.map(np.asarray, make_batches(config, 1, 7)[0]),
                       max(3, args.steps // 4)) if args.breakdown else None

    count = flops.step_flops(config, b)
    xla = None if args.no_xla_check else xla_step_flops(config)
    peak, peak_source = peak_flops_per_device(devices[0], args.peak_tflops)
    t = percentiles(times)
    step_s = t["median"]
    tokens = count.tokens["teacher"]  # input tokens (patches / frames / tokens) per example
    result = {
        "bench": "d2v_jax",
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "device_count": len(devices),
        "config": args.config,
        "overrides": args.set,
        "dtype": config.model.dtype,
        "global_batch": b,
        "clones": count.clones,
        "tokens_per_example": count.tokens,
        "steps": args.steps,
        "step_time_s": t,
        "first_step_s": first_step_s,
        "compilations_first_step": after_first - before_first,
        "recompilations_after_first": recompiles,
        "samples_per_s": b / step_s,
        "tokens_per_s": b * tokens / step_s,
        "model_flops_per_step": count.model,
        "executed_flops_per_step": count.executed,
        "flops_by_part": count.by_group(),
        "xla_flops_per_step": xla,
        "xla_over_executed": None if xla is None else xla / count.executed,
        "model_tflops_per_s": count.model / step_s / 1e12,
        "model_tflops_per_s_per_device": count.model / step_s / 1e12 / len(devices),
        "peak_tflops_per_device": peak / 1e12,
        "peak_source": peak_source,
        "mfu": count.model / step_s / (peak * len(devices)),
        "loss": loss,
        "part_times_s": parts,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    # A user error (bad config key or value) is one `error:` line, exit 2 (d2v_jax/errors.py).
    # main returns its result dict (for callers); the exit code is 0 on success.
    sys.exit(errors.run(lambda: main() and 0, debug=errors.debug_requested(sys.argv)))
