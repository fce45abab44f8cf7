"""The config sections every pretraining experiment repeats: the run, the
mesh and parallel mode (docs/scaling.md), and the collapse guard (SPEC 3).

Experiment files are loaded by path (`--config experiments/image.py:tiny_v2`),
so they import this module by putting their own folder on `sys.path`.
"""

import os

import ml_collections


def num_workers(value="auto") -> ml_collections.FieldReference:
  """`config.data.num_workers`: grain worker processes, an int (0 = in-process)
  or "auto" (d2v_jax.data.pipeline.resolve_num_workers: 0 on <= 2 cores, else
  one per core but the train loop's, at most 32). A field of type object, so
  an int can override "auto" and back."""
  return ml_collections.FieldReference(value, field_type=object)


def bad_samples(dt: ml_collections.ConfigDict) -> None:
  """`data.on_bad_sample` / `data.max_bad_fraction` (docs/checkpoints.md): an
  unreadable sample met during training (a truncated file, a file that is not
  what its extension says) is replaced by the next readable one, counted
  (metric `bad_samples`) and listed once in <workdir>/bad_samples.jsonl
  ("skip": a run of days does not stop for one file), or stops the run naming
  it ("error"). Past `max_bad_fraction` of the samples read (at least one
  epoch's worth) the run stops either way: a broken mount must not hide."""
  dt.on_bad_sample = "skip"  # skip | error
  dt.max_bad_fraction = 1e-3


def train(num_steps: int, *, log_every: int, checkpoint_every: int) -> ml_collections.ConfigDict:
  """`config.train`: length, logging and checkpoint retention of a run."""
  r = ml_collections.ConfigDict()
  r.num_steps = num_steps
  r.log_every = log_every
  r.checkpoint_every = checkpoint_every  # 0 = only at the end (and on SIGTERM)
  r.keep_checkpoints = 2  # the latest N steps ...
  r.keep_every = 0  # ... plus every multiple of this step (0 = none)
  r.nonfinite = "stop"  # NaN/inf loss or gradients: stop | skip (drop that update)
  return r


def mesh() -> ml_collections.ConfigDict:
  """`config.mesh`: the device mesh (docs/scaling.md)."""
  ms = ml_collections.ConfigDict()
  ms.data = -1  # data-parallel replicas; -1 = the devices the other axes leave
  ms.fsdp = 1  # ZeRO-3: params, grads, Adam moments and ema_params split over it
  ms.tensor = 1  # Megatron-style split of the mlp / qkv / heads axes
  # ((logical_name, mesh_axis | (axes...) | None), ...) overriding
  # parallel.DEFAULT_RULES, e.g. (("embed", None),) to keep embeddings whole.
  ms.rules = ()
  return ms


def parallel() -> ml_collections.ConfigDict:
  """`config.parallel`: how the step is compiled over the mesh."""
  pl = ml_collections.ConfigDict()
  pl.mode = "jit"  # jit (NamedSharding; main path) | pmap | shard_map (data parallel)
  pl.distributed = "auto"  # auto | on | off: jax.distributed.initialize()
  # warn | error | off: read the compiled step's collectives on a multi-device
  # mesh and warn (or stop) if it moves activations between batch shards.
  pl.check_collectives = "warn"
  # Several processes: a process silent this long (killed, its node gone) is
  # lost, and the others stop with exit code 43 instead of hanging in a
  # collective; a relaunch resumes from the last checkpoint (docs/checkpoints.md).
  pl.peer_timeout_s = 60.0
  return pl


def collapse(after_step: int) -> ml_collections.ConfigDict:
  """`config.collapse`: the representation-collapse guard (SPEC 3)."""
  g = ml_collections.ConfigDict()
  g.min_target_var = 0.1
  g.min_pred_var = 0.01
  # Positional collapse: targets that position alone explains (metric
  # target_pos_share, losses.position_share) teach nothing about content.
  g.max_target_pos_share = 0.9
  g.after_step = after_step
  g.action = "warn"  # warn | stop
  return g


def probe(task: str = "", every: int = 0) -> ml_collections.ConfigDict:
  """`config.probe`: the online representation check (d2v_jax/probe.py). Every
  `every` steps (and at the end) kNN and ridge probes of the teacher's pooled
  features, fitted on `num_train` rows of a fine-tuning task's training pool and
  scored on `num_eval` rows of its test split; logged as probe_knn /
  probe_linear (accuracy, or RMSE for regression) beside the loss. "" = off."""
  p = ml_collections.ConfigDict()
  p.task = task  # a fine-tuning experiment, e.g. experiments/finetune.py:stdlib_docs
  p.overrides = ""  # dotted overrides of that experiment, "data.path=x,data.test_fraction=0.2"
  p.every = every  # steps; 0 = off
  p.kinds = ("knn", "linear")
  p.params = "teacher"  # teacher (ema_params over params) | student
  p.pool = "mean"  # mean (valid positions, CLS / <s> excluded) | cls
  p.num_train = 500  # fitted rows, drawn once from the training pool (seed)
  p.num_eval = 500  # scored rows: the first of the test split
  p.k = 20  # kNN neighbours (DINO's 20)
  p.ridge = 1e-2  # ridge penalty per fitted row, on standardized features
  p.batch_size = 256
  p.seed = 0
  return p


def finetune_task(task: str) -> str:
  """`experiments/finetune.py:<task>` by absolute path (any working directory)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune.py") + ":" + task


def add_run_sections(c: ml_collections.ConfigDict, *, collapse_after: int,
                     probe_task: str = "", probe_every: int = 0) -> None:
  """Adds `mesh`, `parallel`, `collapse` and `probe` to experiment config `c`."""
  c.mesh = mesh()
  c.parallel = parallel()
  c.collapse = collapse(collapse_after)
  c.probe = probe(probe_task, probe_every)
