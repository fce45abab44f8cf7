"""benchmarks/gpu_check.sh: the plan (most important first, each under a
timeout), the PASS/FAIL arithmetic of the GPU targets, and (slow) a CPU
smoke run that produces the JSON and verdict lines from real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check


def _lines(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def test_dry_run_lists_the_plan_and_a_line_per_target(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                           "--dry_run", "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = _lines(proc.stdout)
    runs = [ln for ln in lines if "check" in ln]
    # The 2.0 MFU target first, then 1.0 vs the peer, audio/text, the variants.
    assert [r["check"] for r in runs][:6] == ["image_v2", "image_v1", "image_v1_peer_eager",
                                              "image_v1_peer_compiled", "audio_v2", "text_v2"]
    assert "experiments/image.py:base_v2 --batch 64" in runs[0]["cmd"]
    assert all("--no_xla_check" in r["cmd"] for r in runs if "step_bench" in r["cmd"])
    assert all(r["timeout_s"] > 0 and r["rc"] == "dry_run" for r in runs)
    targets = [ln for ln in lines if ln.get("gpu_check") == "target"]
    assert [t["target"] for t in targets] == ["image_v2_vit_b16_mfu", "image_v1_over_best_peer",
                                              "audio_v2_base_mfu", "text_v2_base_mfu"]
    assert all(t["verdict"] == "MISSING" for t in targets)
    assert proc.stdout.count("MISSING ") == 4
    # The same lines land in $OUT/gpu_check.jsonl.
    assert _lines((tmp_path / "gpu_check.jsonl").read_text()) == lines


def _run(name, mfu=None, samples=None, bench="d2v_jax"):
    result = {"mfu": mfu, "samples_per_s": samples, "device_kind": "H100", "bench": bench}
    return {"check": name, "rc": 0, "result": result}


def test_verdicts_apply_the_thresholds():
    runs = {r["check"]: r for r in [
        _run("image_v2", mfu=0.46, samples=1100.0),
        _run("image_v1", samples=300.0),
        _run("image_v1_peer_eager", samples=150.0, bench="torch_hf_eager"),
        _run("image_v1_peer_compiled", samples=210.0, bench="torch_hf_compiled"),
        _run("audio_v2", mfu=0.39, samples=10.0),
        {"check": "text_v2", "rc": "timeout", "result": None},
    ]}
    got = {v["target"]: v for v in gpu_check.verdicts(runs)}
    assert got["image_v2_vit_b16_mfu"]["verdict"] == "PASS"
    v1 = got["image_v1_over_best_peer"]
    # Against the faster peer (compiled, 210/s): 300 / 210 = 1.43 < 1.5.
    assert v1["verdict"] == "FAIL" and v1["value"] == pytest.approx(300 / 210)
    assert v1["best_peer"] == "torch_hf_compiled"
    assert got["audio_v2_base_mfu"]["verdict"] == "FAIL"  # 0.39 < 0.40
    assert got["text_v2_base_mfu"]["verdict"] == "MISSING"
    assert got["text_v2_base_mfu"]["why"] == "timeout"
    # One peer missing: the ratio uses the one measured, and says so.
    del runs["image_v1_peer_compiled"]
    v1 = {v["target"]: v for v in gpu_check.verdicts(runs)}["image_v1_over_best_peer"]
    assert v1["verdict"] == "PASS" and v1["peers_measured"] == 1


@pytest.mark.slow  # one real step run on the CPU (tiny config); the peers' lines are unit-tested above
def test_smoke_mode_measures_and_prints_verdicts(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--smoke",
                           "--only", "image_v2", "--steps", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {r["check"]: r for r in _lines(proc.stdout) if "check" in r}
    for name in ("image_v2",):
        assert runs[name]["rc"] == 0, runs[name]["stderr_tail"]
        assert runs[name]["result"]["samples_per_s"] > 0
    assert runs["image_v2"]["result"]["config"] == "experiments/image.py:tiny_v2"
    verdict_lines = [ln for ln in proc.stdout.splitlines()
                     if ln.split(" ")[0] in ("PASS", "FAIL", "MISSING")]
    assert len(verdict_lines) == 4
    assert verdict_lines[0].split(" ")[0] in ("PASS", "FAIL")  # measured
    assert verdict_lines[1].startswith("MISSING image_v1")  # not run (--only)
    assert verdict_lines[2].startswith("MISSING audio_v2_base_mfu")
    assert (tmp_path / "gpu_check.jsonl").exists()
