"""d2v_jax/collectives.py: reading a compiled program's collectives.

The parser is checked on HLO written here (every spelling of replica groups
XLA prints, a while loop carrying parameters and activations), and on real
programs: on a 2 x 4 mesh, the visible-token gather written with an explicit
row index (a general gather the partitioner cannot split) all-gathers its
input, and the vmapped one the models use does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from d2v_jax import collectives as C
from helpers import ROOT, xla_env


def test_replica_groups_in_every_spelling():
    assert C.replica_groups("channel_id=1, replica_groups={{0,1},{2,3}}, dimensions={0}") == (
        (0, 1), (2, 3))
    assert C.replica_groups("replica_groups=[2,4]<=[8], dimensions={0}") == (
        (0, 1, 2, 3), (4, 5, 6, 7))
    # iota [2,4] transposed: column-major groups
    assert C.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), x") == (
        (0, 4), (1, 5), (2, 6), (3, 7))
    # named mesh: devices along axis_0 with axis_1 fixed
    assert C.replica_groups("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, x") == (
        (0, 2, 4, 6), (1, 3, 5, 7))
    # named mesh with its own device order (iota [2,4] transposed = [[0,4],[1,5],...])
    assert C.replica_groups(
        "replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_1'}") == (
        (0, 4), (1, 5), (2, 6), (3, 7))
    assert C.replica_groups("replica_groups={}, dimensions={0}") is None


HLO = """HloModule step

%body (p: (s32[], f32[4,8], f32[2,8,8])) -> (s32[], f32[4,8], f32[2,8,8]) {
  %p = (s32[], f32[4,8], f32[2,8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %w = f32[2,8,8]{2,1,0} get-tuple-element(%p), index=2
  %wi = f32[1,8,8]{2,1,0} dynamic-slice(%w, %i, %i, %i), dynamic_slice_sizes={1,8,8}
  %wg = f32[1,8,32]{2,1,0} all-gather(%wi), replica_groups=[2,4]<=[8], dimensions={2}
  %xg = f32[16,8]{1,0} all-gather(%x), replica_groups=[2,4]<=[8], dimensions={0}
  %y = f32[4,8]{1,0} add(%x, %x)
  ROOT %t = (s32[], f32[4,8], f32[2,8,8]) tuple(%i, %y, %w)
}

%cond (c: (s32[], f32[4,8], f32[2,8,8])) -> pred[] {
  %c = (s32[], f32[4,8], f32[2,8,8]) parameter(0)
  ROOT %k = pred[] constant(true)
}

ENTRY %main (a: f32[2,8,8], b: f32[4,8]) -> f32[4,8] {
  %a = f32[2,8,8]{2,1,0} parameter(0), sharding={replicated}, metadata={op_name="state.params['w']"}
  %b = f32[4,8]{1,0} parameter(1), sharding={devices=[8,1]<=[8]}, metadata={op_name="batch['x']"}
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8], f32[2,8,8]) tuple(%zero, %b, %a)
  %loop = (s32[], f32[4,8], f32[2,8,8]) while(%init), condition=%cond, body=%body
  %out = f32[4,8]{1,0} get-tuple-element(%loop), index=1
  %r = f32[4,8]{1,0} all-reduce(%out), replica_groups={}, to_apply=%cond
  ROOT %s = f32[4,8]{1,0} copy(%r)
}
"""


def test_sources_follow_while_loops_to_the_entry_parameters():
    found = {c.name: c for c in C.collectives(HLO)}
    assert set(found) == {"wg", "xg", "r"}
    assert found["wg"].sources == {"state"} and not found["wg"].moves_data
    assert found["xg"].sources == {"data"} and found["xg"].moves_data
    assert found["r"].sources == {"data"}
    assert found["wg"].bytes == 8 * 32 * 4 and found["xg"].bytes == 16 * 8 * 4
    # On a mesh data=2 x fsdp=4 the groups [2,4]<=[8] are the fsdp rows: different
    # batch shards, so the gather of `x` is an activation transfer; the reduction is not.
    bad = C.activation_transfers(list(found.values()), {"data": 2, "fsdp": 4, "tensor": 1})
    assert [c.name for c in bad] == ["xg"]
    # Inside a batch shard (a tensor-parallel group), the same gather is allowed.
    assert C.activation_transfers([found["xg"]], {"data": 1, "fsdp": 2, "tensor": 4}) == []
    assert [k for k, n, b in C.summary(list(found.values()))] == [
        "all-gather of data", "all-gather of state", "all-reduce of data"]


def _gather_worker() -> dict:
    """On 8 fake devices (2 x 4): the collectives of the student's visible-token
    gather written two ways, with its gradient, on [B, T, D] patches sharded by
    rows and M = 4 clones per sample."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from d2v_jax.models import visible

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    b, m, t, d, k = 16, 4, 12, 32, 4

    def explicit(x, keep):  # x[r // M, keep[r]]: a 2-D gather with an explicit row index
        r = (jnp.arange(keep.shape[0]) // m)[:, None]
        return x.at[r, keep].get(mode="promise_in_bounds")

    def vmapped(x, keep):
        return visible.gather(x, keep, clones=m)

    out = {}
    for name, fn in (("explicit", explicit), ("vmapped", vmapped)):
        def loss(x, keep, fn=fn):
            y = jax.lax.with_sharding_constraint(fn(x, keep), rows)
            return jnp.sum(y * y)
        x = jax.ShapeDtypeStruct((b, t, d), jnp.float32, sharding=rows)
        keep = jax.ShapeDtypeStruct((b * m, k), jnp.int32, sharding=rows)
        text = jax.jit(jax.grad(loss)).lower(x, keep).compile().as_text()
        # The program's arguments are named x / keep, not state / batch: every
        # transfer of them is of per-example data.
        text = text.replace('op_name="x"', 'op_name="batch[x]"').replace(
            'op_name="keep"', 'op_name="batch[keep]"')
        found = C.collectives(text)
        bad = C.activation_transfers(found, {"data": 2, "fsdp": 4})
        out[name] = [c.opcode for c in bad]
    # Same values either way.
    x = np.random.default_rng(0).normal(size=(b, t, d)).astype(np.float32)
    keep = np.stack([np.sort(np.random.default_rng(i).choice(t, k, replace=False))
                     for i in range(b * m)]).astype(np.int32)
    x, keep = jnp.asarray(x), jnp.asarray(keep)
    out["equal"] = bool(np.array_equal(explicit(x, keep), vmapped(x, keep)))
    return out


@pytest.mark.slow  # a subprocess on 8 fake devices
def test_the_vmapped_gather_keeps_rows_split_and_the_explicit_one_does_not():
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=xla_env(8),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["equal"]
    assert report["explicit"], report  # the partitioner all-gathers the input
    assert report["vmapped"] == [], report


if __name__ == "__main__":
    print(json.dumps(_gather_worker()))
