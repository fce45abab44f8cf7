"""Scale-out: device mesh, sharding by logical names, multi-host start, and the
jit / pmap / shard_map versions of the one train step.

Parameters carry logical axis names (`models/layers.py`); `logical_rules` maps
them to the mesh axes `data`, `fsdp` and `tensor`, so that

  data parallel      mesh.data=-1                   params replicated, batch split
  FSDP (ZeRO-3)      mesh.fsdp=-1                   params, grads, Adam moments and
                                                    ema_params split on their `embed`
                                                    axis, batch split
  DP x FSDP          mesh.data=2, mesh.fsdp=-1      both
  + tensor parallel  mesh.tensor=2                  `mlp`/`qkv`/`heads` axes split

are config, not code. The main path (`parallel.mode='jit'`) is one `jax.jit`
with `NamedSharding` in/out shardings: XLA inserts the all-gathers and
reduce-scatters, and the program is the 1-device one, so the numbers are the
same. `pmap` and `shard_map` run `train_step.make_train_step_fn(axis_name=...)`
per device with replicated params: the loss is normalized by the global masked
count and the gradients are psum-ed (SPEC 3).

Multi-host: `maybe_initialize_distributed` starts JAX's runtime (SLURM, Cloud
TPU, or explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
each process feeds its grain shard and `global_batch` assembles the global array.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from d2v_jax import modalities, optim
from d2v_jax.models.sharding import activation_sharding, mesh_spec
from d2v_jax.train_state import TrainState, create_train_state, ema_subtree, init_params
from d2v_jax.train_step import make_train_step_fn

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that holds a different slice of the data.
BATCH_AXES = ("data", "fsdp")
MODES = ("jit", "pmap", "shard_map")

# logical name -> mesh axis (or tuple of axes, or None = replicated). The
# per-block `layers` axis of the scanned encoder stays whole: FSDP splits each
# block's matrices instead, so the scan body sees the same layout every step.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("layers", None),
    ("embed", "fsdp"),
    ("embed_out", "tensor"),
    ("mlp", "tensor"),
    # The fused q|k|v axis stays whole: tensor parallelism splits heads
    # (models/layers.QKVProjection), which a contiguous cut of it would not.
    ("qkv", None),
    ("heads", "tensor"),
    ("rel_pos", None),
)


# --- config -----------------------------------------------------------------------
_MESH_DEFAULTS = {"data": -1, "fsdp": 1, "tensor": 1, "rules": ()}
_PARALLEL_DEFAULTS = {"mode": "jit", "distributed": "auto", "check_collectives": "warn",
                      "peer_timeout_s": 60.0}
CHECK_MODES = ("warn", "error", "off")


def mesh_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.mesh` with defaults (pure data parallel) for experiment files
    that have no such section."""
    m = config.get("mesh") or {}
    return {k: m.get(k, v) for k, v in _MESH_DEFAULTS.items()}


def parallel_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    p = config.get("parallel") or {}
    out = {k: p.get(k, v) for k, v in _PARALLEL_DEFAULTS.items()}
    if out["mode"] not in MODES:
        raise ValueError(f"config.parallel.mode={out['mode']!r}; expected one of {MODES}")
    if not float(out["peer_timeout_s"]) > 0:
        raise ValueError(f"config.parallel.peer_timeout_s={out['peer_timeout_s']!r} must be > 0")
    if out["check_collectives"] not in CHECK_MODES:
        raise ValueError(f"config.parallel.check_collectives={out['check_collectives']!r}; "
                         f"expected one of {CHECK_MODES}")
    return out


# --- mesh and rules -------------------------------------------------------------
def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) from `config.mesh`; at most one -1 = the remaining devices."""
    sizes = [int(mesh_config(config)[a]) for a in MESH_AXES]
    free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: sizes {dict(zip(MESH_AXES, sizes))} must be positive "
                         "with at most one -1 (= the remaining devices)")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh: {num_devices} devices do not split into "
                             f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices, there are {num_devices}")
    return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices of all processes.

    `jax.make_mesh` orders devices so that the last axes (tensor, then fsdp) are
    the most tightly connected ones (NVLink / ICI) and `data` spans hosts.
    Axis types are Auto: shardings come from the rules, XLA propagates the rest.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with `config.mesh.rules` ((name, axes), ...) taking precedence."""
    rules = dict(DEFAULT_RULES)
    for entry in mesh_config(config)["rules"] or ():
        if len(entry) != 2:
            raise ValueError(f"config.mesh.rules: entry {entry!r} is not (logical_name, mesh_axes)")
        name, axes = entry
        for a in (axes if isinstance(axes, (tuple, list)) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"config.mesh.rules: {name!r} -> {axes!r}: {a!r} is not a "
                                 f"mesh axis {MESH_AXES}")
        rules[name] = tuple(axes) if isinstance(axes, list) else axes
    return tuple(rules.items())


def logical_to_shardings(logical_specs: Any, abstract: Any, mesh: Mesh,
                         rules: tuple[tuple[str, Any], ...]) -> Any:
    """A tree of NamedShardings for `abstract` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, mesh_spec(spec, x.shape, mesh, rules)),
        logical_specs, abstract, is_leaf=lambda x: isinstance(x, P) or x is None)


# --- the sharded train state ------------------------------------------------------
def _boxed_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                 model: nn.Module, rng: jax.Array) -> TrainState:
    """The train state with every parameter-shaped leaf still boxed with its
    logical names (params, their EMA copy, Adam's moments)."""
    params = init_params(config, rng, model)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=ema_subtree(params, config), opt_state=tx.init(params))


def state_shardings(config: ml_collections.ConfigDict, mesh: Mesh,
                    tx: optax.GradientTransformation | None = None,
                    model: nn.Module | None = None) -> TrainState:
    """NamedShardings of the whole TrainState from the logical rules, found
    abstractly (nothing is allocated). `ema_params` and the optimizer moments
    are sharded exactly as the params they mirror; scalars are replicated."""
    model = model or modalities.build_model(config)
    tx = tx or optim.make_optimizer(config)[0]
    boxed = jax.eval_shape(functools.partial(_boxed_state, config, tx, model), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    return logical_to_shardings(specs, nn.unbox(boxed), mesh, logical_rules(config))


def create_sharded_train_state(config: ml_collections.ConfigDict, rng: jax.Array, mesh: Mesh,
                               tx: optax.GradientTransformation | None = None,
                               model: nn.Module | None = None) -> tuple[TrainState, TrainState]:
    """(state, shardings): the state is born sharded (`jit` with out_shardings),
    so no device ever holds the whole unsharded model."""
    model = model or modalities.build_model(config)
    tx = tx or optim.make_optimizer(config)[0]
    shardings = state_shardings(config, mesh, tx, model)
    create = jax.jit(lambda r: create_train_state(config, r, tx, model), out_shardings=shardings)
    return create(rng), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data` x `fsdp`, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global jax.Arrays.

    Each process passes its own shard (`d2v_jax.make_dataset(config,
    process_index=, process_count=)`); the global batch is their concatenation in
    process order. Works unchanged on one host.
    """
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def device_bytes(tree: Any, shardings: Any | None = None) -> tuple[int, int]:
    """(bytes per device, unsharded bytes) of a tree of arrays or
    ShapeDtypeStructs, from the shardings (no data is read)."""
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings) if shardings is not None else [x.sharding for x in leaves]
    per = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shards))
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    return per, total


# --- the parallel plan: built once per run -------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """How a run places its state and batches and compiles its step.

    mode: 'jit' | 'shard_map' | 'pmap' (`config.parallel.mode`).
    mesh: the (data, fsdp, tensor) mesh (unused by pmap, which runs over the
      local devices; None when a pmap step is made without one).
    state_shardings: the TrainState's shardings; None for pmap (host-local
      state on the default device).
    batch_sharding: where the loop puts each global batch: split over
      `data` x `fsdp` (jit), over `data` (shard_map); None for pmap (a
      host-local batch that pmap splits itself).
    """

    mode: str
    mesh: Mesh | None
    state_shardings: Any
    batch_sharding: NamedSharding | None
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

    @property
    def axis_name(self) -> str | None:
        """The axis name `make_train_step_fn` needs in this mode (None for jit)."""
        return None if self.mode == "jit" else "data"

    @property
    def step_batch_sharding(self) -> NamedSharding | None:
        """The `batch_sharding` `make_train_step_fn` takes (jit only: the
        per-device programs of pmap / shard_map see their own rows)."""
        return self.batch_sharding if self.mode == "jit" else None

    def compile(self, step_fn: Callable) -> Callable:
        """Compiles a pure step built with `axis_name=self.axis_name` (and
        `batch_sharding=self.step_batch_sharding`), with the state donated."""
        if self.mode == "pmap":
            return _pmap_step(step_fn)
        replicated = NamedSharding(self.mesh, P())
        if self.mode == "shard_map":
            # The batch axis over `data` only (fsdp = tensor = 1 here): the step's
            # psum runs over `data`, so nothing may vary along the other axes.
            step_fn = jax.shard_map(step_fn, mesh=self.mesh, in_specs=(P(), P("data"), P()),
                                    out_specs=(P(), P()))
        else:
            step_fn = self.pin_activations(step_fn)
        return jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding, replicated),
                       out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))

    def pin_activations(self, fn: Callable) -> Callable:
        """`fn` traced with the models' activation pins active (jit over the
        mesh only: `models/sharding.py`). A no-op wrapper for the other modes."""
        if self.mode != "jit":
            return fn

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            with activation_sharding(self.mesh, self.rules):
                return fn(*args, **kwargs)

        return traced

    def describe(self) -> str:
        """One line for the console: devices, mesh shape and mode."""
        n = jax.device_count()
        devices = f"{n} {jax.default_backend()} device{'s' if n != 1 else ''}"
        if self.mode == "pmap":
            return f"{devices}, pmap over {jax.local_device_count()} local"
        shape = " x ".join(f"{a}={n}" for a, n in self.mesh.shape.items())
        return f"{devices}, mesh {shape}, {self.mode}"


def make_plan(config: ml_collections.ConfigDict, model: nn.Module,
              tx: optax.GradientTransformation) -> ParallelPlan:
    """The run's ParallelPlan from `config.parallel` and `config.mesh`: the mesh
    is made once, the state shardings are found abstractly (nothing allocated)."""
    mode = parallel_config(config)["mode"]
    mesh = make_mesh(config)
    if mode == "pmap":
        _check_data_parallel(config, mode)
        return ParallelPlan(mode, mesh, None, None)
    if mode == "shard_map":
        _check_data_parallel(config, mode)
        return _shard_map_plan(config, mesh, model, tx)
    return _jit_plan(mesh, state_shardings(config, mesh, tx, model), logical_rules(config))


def _jit_plan(mesh: Mesh, shardings: Any, rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
              ) -> ParallelPlan:
    return ParallelPlan("jit", mesh, shardings, batch_sharding(mesh), rules)


def _shard_map_plan(config: ml_collections.ConfigDict, mesh: Mesh, model: nn.Module | None,
                    tx: optax.GradientTransformation | None) -> ParallelPlan:
    abstract = jax.eval_shape(lambda r: create_train_state(config, r, tx, model), jax.random.key(0))
    return ParallelPlan("shard_map", mesh, replicated_shardings(abstract, mesh),
                        NamedSharding(mesh, P("data")))


def _pmap_step(step_fn: Callable) -> Callable:
    """pmap over the local devices: the ordinary (unreplicated) state in and
    out, the host-local batch [B_local, ...] split over the devices."""
    step = jax.pmap(step_fn, axis_name="data", in_axes=(None, 0, None), out_axes=(None, None),
                    donate_argnums=(0,))
    n = jax.local_device_count()

    def run(state, batch, rng):
        def split(x):
            if x.shape[0] % n:
                raise ValueError(f"pmap: batch of {x.shape[0]} rows does not split over {n} devices")
            return x.reshape((n, x.shape[0] // n) + x.shape[1:])
        return step(state, jax.tree.map(split, batch), rng)

    return run


def _check_data_parallel(config: ml_collections.ConfigDict, mode: str) -> None:
    m = mesh_config(config)
    if int(m["fsdp"]) != 1 or int(m["tensor"]) != 1:
        raise ValueError(f"parallel.mode={mode!r} replicates the params (pure data parallel); "
                         f"config.mesh.fsdp={m['fsdp']} and mesh.tensor={m['tensor']} "
                         "must be 1 (use parallel.mode='jit' for FSDP / tensor parallel)")
    if config.target.layer_norm == "batch":
        raise ValueError(f"parallel.mode={mode!r}: target.layer_norm='batch' would normalize over "
                         "each device's shard only; use parallel.mode='jit'")


def replicated_shardings(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


# --- the three execution modes, one step each (tests, benchmarks) --------------------
def make_jit_train_step(config: ml_collections.ConfigDict, mesh: Mesh, shardings: TrainState,
                        **kwargs) -> Callable:
    """The main path: one jit over the mesh, state donated, in/out shardings fixed."""
    plan = _jit_plan(mesh, shardings, logical_rules(config))
    return plan.compile(make_train_step_fn(config, batch_sharding=plan.step_batch_sharding, **kwargs))


def make_pmap_train_step(config: ml_collections.ConfigDict, **kwargs) -> Callable:
    """`jax.pmap` over this process's devices (axis 'data'), for users who need it.

    Takes the ordinary (unreplicated) state and a host-local batch [B_local, ...]
    that it splits over the local devices; returns the updated state (the same
    on every device) and the global metrics.
    """
    _check_data_parallel(config, "pmap")
    plan = ParallelPlan("pmap", None, None, None)
    return plan.compile(make_train_step_fn(config, axis_name=plan.axis_name, **kwargs))


def make_shard_map_train_step(config: ml_collections.ConfigDict, mesh: Mesh, **kwargs) -> Callable:
    """`jax.shard_map` over the mesh inside one jit: the per-device program is
    written out (psum of gradients, global masked count) rather than derived by
    XLA. Params replicated; batch split on its first axis over `data`."""
    _check_data_parallel(config, "shard_map")
    plan = _shard_map_plan(config, mesh, kwargs.get("model"), kwargs.get("tx"))
    return plan.compile(make_train_step_fn(config, axis_name=plan.axis_name, **kwargs))


# --- multi-host --------------------------------------------------------------------
def distributed_env(environ: dict[str, str] | None = None) -> str | None:
    """Which multi-process environment this is: 'explicit', 'slurm', 'tpu' or None."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    return None


def maybe_initialize_distributed(mode: str = "auto", environ: dict[str, str] | None = None) -> bool:
    """`jax.distributed.initialize()` when the environment is multi-process.

    mode: 'auto' (initialize if `distributed_env` finds one), 'on' (always; JAX
    auto-detects SLURM and Cloud TPU), 'off'. 'explicit' reads
    JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID, as
    `launch/local.sh` sets them. Must run before anything touches the devices.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"parallel.distributed={mode!r}; expected 'auto', 'on' or 'off'")
    env = os.environ if environ is None else environ
    kind = distributed_env(env)
    if mode == "off" or (mode == "auto" and kind is None):
        return False
    if kind == "explicit":
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d (%s), %d local / %d global devices",
                 jax.process_index(), jax.process_count(), kind, jax.local_device_count(),
                 jax.device_count())
    return True


def is_host0() -> bool:
    """The one process that writes logs, plots and config files."""
    return jax.process_index() == 0


# --- memory report ------------------------------------------------------------------
def memory_report(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, tuple[int, int]]:
    """{part: (bytes per device, unsharded bytes)} for params, ema_params and
    opt_state under the rules, computed abstractly (nothing is allocated)."""
    model = modalities.build_model(config)
    tx = optim.make_optimizer(config)[0]
    abstract = jax.eval_shape(lambda r: create_train_state(config, r, tx, model), jax.random.key(0))
    sh = state_shardings(config, mesh, tx, model)
    return {part: device_bytes(getattr(abstract, part), getattr(sh, part))
            for part in ("params", "ema_params", "opt_state")}


def with_tokenizer_vocab(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Text configs before their tokenizer exists: the model's vocabulary is
    the tokenizer's target size (what a run's tokenizer sets it to)."""
    if config.get("model", {}).get("vocab_size", 0) is None and "tokenizer" in config:
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.vocab_size = int(config.tokenizer.vocab_size)
    return config


def _main(argv):
    """python -m d2v_jax.parallel --config experiments/image.py:base_v2 --config.mesh.fsdp=-1 ...
    prints the per-device state bytes (fake devices: XLA_FLAGS=--xla_force_host_platform_device_count=8)."""
    del argv
    config = with_tokenizer_vocab(_CONFIG.value)
    mesh = make_mesh(config)
    report = memory_report(config, mesh)
    print(f"mesh {dict(mesh.shape)} ({jax.device_count()} devices)")
    print(f"{'part':<12}{'per device MiB':>16}{'unsharded MiB':>16}")
    tot = [0, 0]
    for part, (per, total) in report.items():
        tot[0] += per
        tot[1] += total
        print(f"{part:<12}{per / 2**20:>16.1f}{total / 2**20:>16.1f}")
    print(f"{'total':<12}{tot[0] / 2**20:>16.1f}{tot[1] / 2**20:>16.1f}")


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file and arg.", lock_config=True)
    app.run(_main)
