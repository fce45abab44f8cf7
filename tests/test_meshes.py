"""Scale-out through the CLI: every mesh the docs offer, for every modality
and both versions, logs the 1-device losses, and a run saved on one mesh
resumes on another with the same losses (docs/scaling.md, "What is tested").

Per modality x version, two subprocesses run `d2v_jax.train.main` (the
`python -m d2v_jax.train` entry point, argv and all) in-process, so that the
imports, the data preparation and JAX's start-up are paid once per process:

- 1 CPU device: the reference, 4 steps;
- 8 fake CPU devices: FSDP 4 x tensor 2, pmap, shard_map (4 steps each), and
  the resume chain FSDP-8 (steps 1-2, checkpoint) -> DP 2 x FSDP 4 (step 3)
  -> DP-8 (step 4) in one work dir: every mesh of docs/scaling.md, each step
  compared with the 1-device step.

Every 8-device run sets `parallel.check_collectives=error`: a compiled step
that all-gathers or all-to-alls activations between batch shards stops the
run (exit 3) instead of training; the test also fails on XLA's "Involuntary
full rematerialization" warning anywhere in the process's output. Dropout,
drop path and the decoder's noise are off, since pmap / shard_map devices draw
their own (the jit path draws the 1-device numbers: tests/test_parallel.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, TINY, xla_env

STEPS = 4
RTOL = 1e-5
# No randomness in the step (see the module docstring), a probe-free run, every
# step logged (one compiled variant), nothing written but what the test reads.
COMMON = {"train.num_steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 0,
          "probe.every": 0, "data.batch_size": 16,
          **{f"model.{k}": 0.0 for k in ("dropout", "attn_dropout", "activation_dropout",
                                         "drop_path", "layerdrop")},
          "decoder.input_dropout": 0.0, "decoder.mask_noise_std": 0.0}
PER_MODALITY = {"image": {}, "text": {},
                "audio": {"model.dropout_input": 0.0, "model.prenet_dropout": 0.0}}
MESHES = {  # name -> overrides; each runs STEPS steps on 8 devices (DP-8, FSDP-8 and
    # DP 2 x FSDP 4 run in the resume chain below, each checked step by step)
    "fsdp4_tensor2": {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2},
    "pmap": {"parallel.mode": "pmap"},
    "shard_map": {"parallel.mode": "shard_map"},
}
# One work dir, three meshes: saved under FSDP-8, resumed on 2 x 4, then on DP-8.
RESUME_CHAIN = (("fsdp8", {"mesh.data": 1, "mesh.fsdp": -1}, 2),
                ("dp2_fsdp4", {"mesh.data": 2, "mesh.fsdp": 4}, 3),
                ("dp8", {"mesh.data": -1}, 4))
CASES = [(m, v) for m in ("image", "audio", "text") for v in ("tiny_v1", "tiny_v2")]
REMAT_WARNING = "Involuntary full rematerialization"


def overrides(modality: str, arg: str) -> dict:
    path, tiny = TINY[modality]
    return {**tiny, **COMMON, **PER_MODALITY[modality]}


def _argv(modality, arg, workdir, kw) -> list[str]:
    path = TINY[modality][0]
    argv = ["--config", f"{path}:{arg}", "--workdir", workdir]
    for key, value in kw.items():
        argv.append(f"--config.{key}={','.join(map(str, value)) if isinstance(value, tuple) else value}")
    return argv


def _run(name, modality, arg, workdir, kw) -> dict:
    """One CLI run in this process: its exit code, console lines and losses."""
    from d2v_jax import train

    print(f"=== run {name}", file=sys.stderr, flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train.main(["train", *_argv(modality, arg, workdir, kw)])
    losses = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                losses[row["step"]] = row["loss"]
    lines = [ln for ln in out.getvalue().splitlines() if "collectives per step" in ln]
    return {"code": code, "losses": losses, "collectives": lines,
            "tail": out.getvalue()[-1500:]}


def _worker(modality: str, arg: str, root: str, devices: int, tokenizer: str) -> dict:
    import jax

    assert jax.device_count() == devices, jax.devices()
    kw = overrides(modality, arg)
    if tokenizer:  # the reference run's, so that both processes see the same tokens
        kw["tokenizer.path"] = tokenizer
    if devices == 1:
        return {"ref": _run("ref", modality, arg, os.path.join(root, "ref"), kw)}
    kw["parallel.check_collectives"] = "error"
    report = {name: _run(name, modality, arg, os.path.join(root, name), {**kw, **mesh})
              for name, mesh in MESHES.items()}
    chain = os.path.join(root, "chain")
    for name, mesh, steps in RESUME_CHAIN:
        report[f"chain_{name}"] = _run(f"chain_{name}", modality, arg, chain,
                                       {**kw, **mesh, "train.num_steps": steps,
                                        "train.checkpoint_every": 1})
    return report


def _subprocess(modality, arg, root, devices, tokenizer="") -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), modality, arg, str(root), str(devices),
         tokenizer], cwd=ROOT, env=xla_env(devices), capture_output=True, text=True,
        timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= RTOL * abs(want)


@pytest.mark.slow  # two subprocesses, eight CLI runs on 8 fake devices
@pytest.mark.parametrize("modality,arg", CASES)
def test_every_mesh_logs_the_one_device_losses(modality, arg, tmp_path):
    ref, _ = _subprocess(modality, arg, tmp_path, 1)
    ref = ref["ref"]
    assert ref["code"] == 0, ref["tail"]
    want = {int(k): v for k, v in ref["losses"].items()}
    assert sorted(want) == list(range(1, STEPS + 1)), want
    # The losses move: the comparison below is not between constants.
    assert len({round(v, 6) for v in want.values()}) == STEPS, want
    tokenizer = os.path.join(tmp_path, "ref", "tokenizer") if modality == "text" else ""
    report, stderr = _subprocess(modality, arg, tmp_path, 8, tokenizer)
    assert REMAT_WARNING not in stderr, stderr[stderr.index(REMAT_WARNING) - 2000:][:3000]

    for name, run in report.items():
        assert run["code"] == 0, (name, run["tail"])
        got = {int(k): v for k, v in run["losses"].items()}
        steps = sorted(got)
        if name.startswith("chain_"):  # the work dir's metrics: every step so far
            last = dict((n, s) for n, _, s in RESUME_CHAIN)[name.removeprefix("chain_")]
            assert steps == list(range(1, last + 1)), (name, steps)
        else:
            assert steps == list(range(1, STEPS + 1)), (name, steps)
        bad = {s: (got[s], want[s]) for s in steps if not _close(got[s], want[s])}
        assert not bad, f"{modality} {arg} {name}: step: (loss, 1-device loss) {bad}"
        if name not in ("pmap",):  # pmap has no compiled-program check
            assert len(run["collectives"]) == 1, (name, run["tail"])
            assert run["collectives"][0].endswith(
                "0 activation transfer(s) between batch shards"), (name, run["collectives"])
    # Each leg of the chain started where the previous one saved.
    for name, _, steps in RESUME_CHAIN[1:]:
        assert f"resumed from" in report[f"chain_{name}"]["tail"], report[f"chain_{name}"]["tail"]


if __name__ == "__main__":
    modality, arg, root, devices, tokenizer = sys.argv[1:6]
    result = _worker(modality, arg, root, int(devices), tokenizer)
    print(json.dumps(result))
