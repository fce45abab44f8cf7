"""The config sections every pretraining experiment repeats: the run, the
mesh and parallel mode (docs/scaling.md), and the collapse guard (SPEC 3).

Experiment files are loaded by path (`--config experiments/image.py:tiny_v2`),
so they import this module by putting their own folder on `sys.path`.
"""

import ml_collections


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


def add_run_sections(c: ml_collections.ConfigDict, *, collapse_after: int) -> None:
  """Adds `mesh`, `parallel` and `collapse` to experiment config `c`."""
  c.mesh = mesh()
  c.parallel = parallel()
  c.collapse = collapse(collapse_after)
