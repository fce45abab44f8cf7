"""What a compiled step communicates: every collective of the optimized HLO,
the bytes it moves, and whether it moves the train state or per-example data.

FSDP is meant to all-gather *parameters* (and reduce-scatter their gradients);
an all-gather or all-to-all of *activations* means the partitioner could not
keep the batch split across the devices (e.g. a gather it cannot partition)
and moves whole activations every step. On CPU such a program may even
deadlock; on a GPU or TPU it is silently slow. This module reads the program
XLA actually runs (`jax.stages.Compiled.as_text()`, or an `--xla_dump_to`
file) and traces each collective's operand back to the entry parameters, whose
metadata JAX names after the step's arguments (`state.params[...]`,
`batch['image']`, `rng`). A collective whose inputs derive from the state alone
(plus constants) moves parameters; one that reads the batch moves
activations (or gradients, for reductions).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m d2v_jax.collectives --config experiments/image.py:base_v2 \
        --config.mesh.data=2 --config.mesh.fsdp=-1

compiles a config's train step for a mesh (abstractly, on fake devices) and
prints the table; a training run on a multi-device mesh checks its own step
(`parallel.check_collectives`, docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import sys
from collections import Counter
from typing import Callable, Iterable

import jax
import ml_collections
import numpy as np

from d2v_jax import modalities, optim, parallel
from d2v_jax.errors import RunStopped
from d2v_jax.train_state import create_train_state
from d2v_jax.train_step import make_train_step_fn

# Collective opcodes (async starts count once; their -done halves are skipped).
GATHERS = ("all-gather", "all-gather-start")
RESHARDS = ("all-to-all", "collective-permute", "collective-permute-start", "ragged-all-to-all")
REDUCTIONS = ("all-reduce", "all-reduce-start", "reduce-scatter")
COLLECTIVES = GATHERS + RESHARDS + REDUCTIONS
# What `activation_transfers` checks. A collective-permute of data-derived values
# is, in practice, a gradient shard moved to the device that owns its parameter
# shard (parameter-sized), so permutes are reported but not counted.
ACTIVATION_CHECKED = GATHERS + ("all-to-all", "ragged-all-to-all")
_LEAVES = ("constant", "iota", "partition-id", "replica-id", "rng-get-and-update-state",
           "rng-bit-generator")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
          "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Instr:
    name: str
    type: str
    opcode: str
    operands: tuple[str, ...]
    attrs: str
    computation: str
    args: str = ""  # the raw text between the parentheses (a parameter's number)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the compiled program.

    sources: what its input derives from: 'state' (an entry parameter whose
      metadata starts with `state`), 'data' (`batch...`), 'rng', 'other'
      (an entry parameter without such metadata); constants add nothing.
    """

    opcode: str
    name: str
    computation: str
    type: str
    bytes: int
    sources: frozenset[str]
    op_name: str
    groups: tuple[tuple[int, ...], ...] | None  # device (partition) ids; None = all

    @property
    def moves_data(self) -> bool:
        """True when the input is not derived from the train state alone."""
        return bool(self.sources - {"state"})

    @property
    def kind(self) -> str:
        base = self.opcode.removesuffix("-start")
        return f"{base} of {'state' if not self.moves_data else '+'.join(sorted(self.sources))}"


def _balanced(s: str, i: int) -> int:
    """Index just past the bracket group opening at s[i]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = [pairs[s[i]]]
    j = i + 1
    while stack:
        c = s[j]
        if c == '"':
            j = s.index('"', j + 1)
        elif c in pairs:
            stack.append(pairs[c])
        elif c == stack[-1]:
            stack.pop()
        j += 1
    return j


def _parse_instruction(line: str, computation: str) -> Instr | None:
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.index(" ") if " " in rest else len(rest)
    typ, rest = rest[:end], rest[end:].lstrip()
    om = re.match(r"([a-z][\w\-]*)\(", rest)
    if not om:
        return None
    close = _balanced(rest, om.end() - 1)
    operands = tuple(re.findall(r"%([\w.\-]+)", rest[om.end():close - 1]))
    return Instr(m.group(1), typ, om.group(1), operands, rest[close:], computation,
                 rest[om.end():close - 1])


def parse(hlo: str) -> tuple[dict[str, dict[str, Instr]], dict[str, str], str]:
    """HLO text -> ({computation: {instruction: Instr}}, {computation: root}, entry)."""
    comps: dict[str, dict[str, Instr]] = {}
    roots: dict[str, str] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        head = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            comps[current] = {}
            if head.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is None:
            continue
        ins = _parse_instruction(line, current)
        if ins is not None:
            comps[current][ins.name] = ins
            if line.lstrip().startswith("ROOT"):
                roots[current] = ins.name
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, roots, entry


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _op_name(attrs: str) -> str:
    m = re.search(r'op_name="([^"]*)"', attrs)
    return m.group(1) if m else ""


def array_bytes(typ: str) -> int:
    """Bytes of an HLO type (a tuple's elements summed)."""
    return sum(_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _ARRAY.findall(typ))


class _Tracer:
    """Sources of each value, following fusion, call and while boundaries."""

    def __init__(self, hlo: str):
        self.comps, self.roots, self.entry = parse(hlo)
        # callee computation -> [(caller Instr, how)]
        self.callers: dict[str, list[tuple[Instr, str]]] = {}
        for instrs in self.comps.values():
            for ins in instrs.values():
                for key in ("calls", "body", "condition", "to_apply"):
                    callee = _attr(ins.attrs, key)
                    if callee:
                        self.callers.setdefault(callee, []).append((ins, key))
                m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                for callee in re.findall(r"%?([\w.\-]+)", m.group(1)) if m else ():
                    self.callers.setdefault(callee, []).append((ins, "branch"))
        self.memo: dict[tuple[str, str, int | None], frozenset[str]] = {}

    def sources(self, comp: str, name: str, index: int | None = None) -> frozenset[str]:
        """The labels of the entry parameters value `name` (tuple element
        `index`) derives from. An explicit stack rather than recursion: a
        deep model's HLO chains more values than Python's recursion limit. A
        value met again while it is being evaluated (a while loop's carry)
        adds nothing: its initial value and the loop body decide."""
        root = (comp, name, index)
        if root in self.memo:
            return self.memo[root]
        stack = [[root, *self._deps(root), frozenset()]]
        active = {root}
        while stack:
            frame = stack[-1]
            key, leaf, deps, acc = frame
            if deps:
                dep = deps.pop()
                if dep in self.memo:
                    frame[3] = acc | self.memo[dep]
                elif dep not in active:
                    active.add(dep)
                    stack.append([dep, *self._deps(dep), frozenset()])
                continue
            stack.pop()
            active.discard(key)
            self.memo[key] = value = leaf | acc
            if stack:
                stack[-1][3] |= value
        return self.memo[root]

    def _union(self, comp: str, names: Iterable[str]) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for n in names:
            out |= self.sources(comp, n)
        return out

    def _deps(self, key: tuple[str, str, int | None]
              ) -> tuple[frozenset[str], list[tuple[str, str, int | None]]]:
        """(labels of the value itself, the values it is computed from)."""
        comp, name, index = key
        ins = self.comps[comp][name]
        op = ins.opcode
        if op in _LEAVES:
            return frozenset(), []
        if op == "parameter":
            return self._parameter(comp, ins, index)
        if op == "get-tuple-element":
            return frozenset(), [(comp, ins.operands[0], int(_attr(ins.attrs, "index")))]
        if op == "tuple" and index is not None:
            return frozenset(), [(comp, ins.operands[index], None)]
        if op == "while":
            body = _attr(ins.attrs, "body")
            return frozenset(), ([(comp, o, index) for o in ins.operands]
                                 + [(body, self.roots[body], index)])
        if op == "call":
            callee = _attr(ins.attrs, "to_apply") or _attr(ins.attrs, "calls")
            if callee in self.roots:
                return frozenset(), [(callee, self.roots[callee], index)]
        return frozenset(), [(comp, o, None) for o in ins.operands]

    def _parameter(self, comp: str, ins: Instr, index: int | None
                   ) -> tuple[frozenset[str], list[tuple[str, str, int | None]]]:
        if comp == self.entry:
            name = _op_name(ins.attrs)
            for prefix, label in (("state", "state"), ("batch", "data"), ("rng", "rng")):
                if name.startswith(prefix):
                    return frozenset({label}), []
            return frozenset({"other"}), []
        number = int(ins.args)
        deps = []
        for caller, how in self.callers.get(comp, ()):
            if how in ("body", "condition"):  # the while's single tuple operand
                deps.append((caller.computation, caller.operands[0], index))
                if how == "body":
                    deps.append((comp, self.roots[comp], index))
            elif number < len(caller.operands):
                deps.append((caller.computation, caller.operands[number], index))
        return frozenset(), deps


def _iota(spec: str) -> np.ndarray:
    """`[G,S]<=[d0,d1,...]T(p...)` -> the [G, S] device ids (HLO's iota format)."""
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    if not m:
        raise ValueError(f"unparsed iota device list {spec!r}")
    shape = [int(d) for d in m.group(1).split(",")]
    dims = [int(d) for d in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(p) for p in m.group(3).split(",")])
    return ids.reshape(shape)


def replica_groups(attrs: str) -> tuple[tuple[int, ...], ...] | None:
    """The device groups of a collective's attributes (every HLO spelling:
    explicit `{{0,1},{2,3}}`, iota `[4,2]<=[2,4]T(1,0)`, and the named-mesh
    form `mesh['axis_0'=4,'axis_1'=2], device_ids=(...) {'axis_0'}`); None
    when the collective spans all devices (`{}` or no groups)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))? \{([^}]*)\}",
                  attrs)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names = [a for a, _ in axes]
        sizes = [int(n) for _, n in axes]
        if m.group(2):
            spec = m.group(2)
            ids = _iota(f"[{','.join(map(str, sizes))}]<={spec}" if not spec.startswith("[")
                        else f"[{','.join(map(str, sizes))}]<={spec}")
        else:
            ids = np.arange(math.prod(sizes)).reshape(sizes)
        over = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(3))]
        rest = [i for i in range(len(sizes)) if i not in over]
        grouped = ids.transpose(rest + over).reshape(-1, math.prod(sizes[i] for i in over))
        return tuple(tuple(int(d) for d in g) for g in grouped)
    m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
    if m:
        return tuple(tuple(int(d) for d in g) for g in _iota(m.group(1)))
    m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", attrs)
    if m and m.group(1).strip():
        return tuple(tuple(int(d) for d in re.findall(r"\d+", g))
                     for g in re.findall(r"\{([\d,\s]*)\}", m.group(1)))
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if m:  # collective-permute: each pair is a group
        return tuple(tuple(int(d) for d in p.split(","))
                     for p in re.findall(r"\{(\d+,\d+)", m.group(1) + "}"))
    return None


def collectives(hlo: str) -> list[Collective]:
    """Every collective of an optimized HLO module's text, with its sources."""
    tracer = _Tracer(hlo)
    found = []
    for comp, instrs in tracer.comps.items():
        for ins in instrs.values():
            if ins.opcode not in COLLECTIVES:
                continue
            found.append(Collective(
                ins.opcode, ins.name, comp, ins.type, array_bytes(ins.type),
                tracer._union(comp, ins.operands), _op_name(ins.attrs),
                replica_groups(ins.attrs)))
    return found


def crosses_batch_shards(c: Collective, mesh_shape: dict[str, int],
                         batch_axes: tuple[str, ...]) -> bool:
    """Whether a group of `c` holds devices of different batch shards.

    Partition id i is device i of the mesh in row-major order (how jit lays a
    NamedSharding's mesh onto partitions); two devices hold the same rows iff
    their coordinates on the batch axes agree.
    """
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    n = math.prod(sizes)
    groups = c.groups if c.groups is not None else (tuple(range(n)),)
    keep = [names.index(a) for a in batch_axes if a in names]
    for g in groups:
        coords = {tuple(np.unravel_index(d, sizes)[i] for i in keep) for d in g if d < n}
        if len(coords) > 1:
            return True
    return False


def activation_transfers(found: list[Collective], mesh_shape: dict[str, int] | None = None,
                         batch_axes: tuple[str, ...] = ("data", "fsdp")) -> list[Collective]:
    """The all-gathers and all-to-all / permutes that move per-example data
    between batch shards: what a batch-split program should never need. With
    `mesh_shape`, transfers inside a batch shard (a tensor-parallel group
    gathering its activations) are allowed; without, every one counts."""
    out = [c for c in found if c.moves_data and c.opcode in ACTIVATION_CHECKED]
    if mesh_shape is not None:
        out = [c for c in out if crosses_batch_shards(c, mesh_shape, batch_axes)]
    return out


def summary(found: list[Collective]) -> list[tuple[str, int, int]]:
    """[(kind, count, bytes)] sorted by kind."""
    count: Counter = Counter()
    size: Counter = Counter()
    for c in found:
        count[c.kind] += 1
        size[c.kind] += c.bytes
    return [(k, count[k], size[k]) for k in sorted(count)]


def format_report(found: list[Collective], mesh_shape: dict[str, int] | None = None,
                  file=sys.stdout) -> None:
    """A table of the collectives by kind, then each activation transfer
    between batch shards."""
    print(f"{'collective':<40}{'count':>7}{'KiB per device':>16}", file=file)
    for kind, n, b in summary(found):
        print(f"{kind:<40}{n:>7}{b / 1024:>16.1f}", file=file)
    bad = activation_transfers(found, mesh_shape)
    if not bad:
        print("no all-gather / all-to-all of activations", file=file)
    for c in bad:
        print(f"ACTIVATION {c.opcode} {c.type} ({c.op_name})", file=file)


# --- the train step's collectives ------------------------------------------------------
class ActivationTransferError(RunStopped):
    """The compiled step moves activations between batch shards
    (`parallel.check_collectives='error'`)."""


def check_collectives(config: ml_collections.ConfigDict, plan: parallel.ParallelPlan,
                      step: Callable, args: tuple) -> str | None:
    """Compiles `step` (a jitted step of `plan`) for `args` ahead of time and
    reads its collectives (`d2v_jax.collectives`): returns a one-line summary,
    and warns or raises (`config.parallel.check_collectives`) when the program
    all-gathers or all-to-alls per-example data between batch shards, which
    a batch-split program never needs. The jit reuses this compilation.
    None on one device, under pmap, or with the check off."""
    how = parallel.parallel_config(config)["check_collectives"]
    if how == "off" or plan.mode == "pmap" or plan.mesh is None or plan.mesh.size == 1:
        return None
    found = collectives(step.lower(*args).compile().as_text())
    shape = dict(plan.mesh.shape)
    bad = activation_transfers(found, shape, parallel.BATCH_AXES)
    parts = [f"{kind} {n} ({size / 2**20:.2f} MiB)" for kind, n, size in summary(found)]
    line = (f"collectives per step and device: {', '.join(parts) or 'none'}; "
            f"{len(bad)} activation transfer(s) between batch shards")
    if bad:
        worst = max(bad, key=lambda c: c.bytes)
        msg = (f"the compiled step moves activations between batch shards ({len(bad)} "
               f"collective(s), e.g. {worst.opcode} {worst.type.split('{')[0]} at "
               f"{worst.op_name!r}): mesh {shape} cannot keep the batch split there "
               "(docs/scaling.md)")
        if how == "error":
            raise ActivationTransferError(
                msg, hint="parallel.check_collectives='warn' runs it anyway")
        logging.warning("%s", msg)
    return line


def step_collectives(config: ml_collections.ConfigDict, batch_size: int | None = None
                     ) -> tuple[list[Collective], dict[str, int]]:
    """(the collectives of the compiled train step, the mesh shape) for
    `config` on this process's devices, found abstractly: the step is lowered
    for ShapeDtypeStructs carrying the plan's shardings and compiled, nothing
    is allocated. `batch_size`: the global batch (default data.batch_size)."""
    model = modalities.build_model(config)
    tx, schedule = optim.make_optimizer(config)
    plan = parallel.make_plan(config, model, tx)
    if plan.mode == "pmap":
        raise ValueError("parallel.mode='pmap' compiles per device; read the collectives of "
                         "parallel.mode='shard_map', its equivalent")
    step = plan.compile(make_train_step_fn(config, model=model, tx=tx, schedule=schedule,
                                           axis_name=plan.axis_name,
                                           batch_sharding=plan.step_batch_sharding))
    state = jax.eval_shape(lambda r: create_train_state(config, r, tx, model),
                           jax.random.key(0))
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         state, plan.state_shardings)
    batch = modalities.dummy_batch(config, batch_size or int(config.data.batch_size))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=plan.batch_sharding), batch)
    text = step.lower(state, batch, jax.random.key(0)).compile().as_text()
    return collectives(text), dict(plan.mesh.shape)


def _main(argv) -> None:
    del argv
    config = parallel.with_tokenizer_vocab(_CONFIG.value)
    found, shape = step_collectives(config)
    print(f"train step of {config.modality} {config.version}, global batch "
          f"{config.data.batch_size}, mesh {shape} ({jax.device_count()} devices):")
    format_report(found, shape)


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file and arg.",
                                              lock_config=True)
    app.run(_main)
