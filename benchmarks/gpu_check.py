r"""The GPU check: every accelerator target on one GPU, most important
first, inside one time budget; one JSON line per run, one PASS/FAIL line per
target. Run it through `benchmarks/gpu_check.sh` (wheels, caches, env).

    bash benchmarks/gpu_check.sh                 # on the GPU machine, <= --budget_s
    bash benchmarks/gpu_check.sh --smoke         # CPU: tiny configs, short timeouts
    bash benchmarks/gpu_check.sh --dry_run       # print the plan, run nothing

Runs, in order (each its own process under a timeout, never past the budget):
1. image 2.0 ViT-B/16, batch 64 x 16 clones (`step_bench.py`, MFU from
   `d2v_jax.flops`)                                  -> target: MFU >= 45%
2. image 1.0 ViT-B/16: ours, the PyTorch peer eager, the peer compiled
   (`peer_torch.py`)                                 -> target: ours >= 1.5x the peer's best
3. audio and text base 2.0 steps                     -> targets: MFU >= 40% each
4. variants for the record (no target): image 2.0 with the XLA attention,
   with `model.remat=save_dots`, and `--breakdown` (teacher / student / decoder).

Targets on GPU; in `--smoke` mode the same lines come from tiny configs on the
CPU (the PASS/FAIL verdicts then say nothing about a GPU: they test the plumbing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The targets (docs/performance.md).
TARGET_IMAGE_V2_MFU = 0.45
TARGET_V1_OVER_PEER = 1.5
TARGET_AUDIO_TEXT_MFU = 0.40


def plan(smoke: bool, steps: int) -> list[dict]:
    """The runs, most important first: name, argv (after the interpreter), timeout."""
    bench = os.path.join(HERE, "step_bench.py")
    peer = os.path.join(HERE, "peer_torch.py")
    s = ["--steps", str(steps), "--warmup", "2", "--no_xla_check"]
    if smoke:  # tiny configs, the shapes of the real runs scaled down
        img2 = ["--config", "experiments/image.py:tiny_v2", "--batch", "8"]
        img1 = ["--config", "experiments/image.py:tiny_v1", "--batch", "8"]
        audio = ["--config", "experiments/audio.py:tiny_v2", "--batch", "4"]
        text = ["--config", "experiments/text.py:tiny_v2", "--batch", "8"]
        t_long, t_short = 240, 180
    else:
        img2 = ["--config", "experiments/image.py:base_v2", "--batch", "64"]
        img1 = ["--config", "experiments/image.py:base_v1", "--batch", "128"]
        audio = ["--config", "experiments/audio.py:base_v2", "--batch", "8"]
        text = ["--config", "experiments/text.py:base_v2", "--batch", "64"]
        t_long, t_short = 240, 150
    return [
        {"name": "image_v2", "argv": [bench] + img2 + s, "timeout": t_long},
        {"name": "image_v1", "argv": [bench] + img1 + s, "timeout": t_short},
        {"name": "image_v1_peer_eager", "argv": [peer] + img1 + s[:4], "timeout": t_short},
        {"name": "image_v1_peer_compiled", "argv": [peer, "--compile"] + img1 + s[:4],
         "timeout": t_long},
        {"name": "audio_v2", "argv": [bench] + audio + s, "timeout": t_short},
        {"name": "text_v2", "argv": [bench] + text + s, "timeout": t_short},
        {"name": "image_v2_xla_attention", "argv": [bench] + img2 + s
         + ["--set", "model.attention_impl=xla"], "timeout": t_short},
        {"name": "image_v2_remat_save_dots", "argv": [bench] + img2 + s
         + ["--set", "model.remat=save_dots"], "timeout": t_short},
        {"name": "image_v2_breakdown", "argv": [bench] + img2 + s + ["--breakdown"],
         "timeout": t_long},
    ]


def run_one(item: dict, timeout: float) -> dict:
    """One run in its own process; its last JSON line, or why there is none."""
    t0 = time.perf_counter()
    cmd = [sys.executable] + item["argv"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              check=False)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines and rc == 0 else None
    return {"check": item["name"], "cmd": " ".join(["python"] + item["argv"]), "rc": rc,
            "wall_s": round(time.perf_counter() - t0, 1), "timeout_s": round(timeout),
            "result": result, "stderr_tail": None if result else err[-1500:]}


def verdicts(runs: dict[str, dict]) -> list[dict]:
    """One line per target: PASS / FAIL with the measured value, or MISSING."""
    def res(name):
        r = runs.get(name)
        return r["result"] if r and r["result"] else None

    out = []

    def mfu_target(name, check, threshold):
        r = res(check)
        if r is None:
            out.append({"target": name, "verdict": "MISSING", "threshold": threshold,
                        "why": (runs.get(check) or {}).get("rc", "not run")})
        else:
            out.append({"target": name, "verdict": "PASS" if r["mfu"] >= threshold else "FAIL",
                        "value": r["mfu"], "threshold": threshold,
                        "samples_per_s": r["samples_per_s"], "device": r["device_kind"]})

    mfu_target("image_v2_vit_b16_mfu", "image_v2", TARGET_IMAGE_V2_MFU)
    ours, peers = res("image_v1"), [res("image_v1_peer_eager"), res("image_v1_peer_compiled")]
    peers = [p for p in peers if p]
    if ours is None or not peers:
        out.append({"target": "image_v1_over_best_peer", "verdict": "MISSING",
                    "threshold": TARGET_V1_OVER_PEER,
                    "why": {k: (runs.get(k) or {}).get("rc", "not run") for k in
                            ("image_v1", "image_v1_peer_eager", "image_v1_peer_compiled")}})
    else:
        best = max(peers, key=lambda p: p["samples_per_s"])
        ratio = ours["samples_per_s"] / best["samples_per_s"]
        out.append({"target": "image_v1_over_best_peer",
                    "verdict": "PASS" if ratio >= TARGET_V1_OVER_PEER else "FAIL",
                    "value": ratio, "threshold": TARGET_V1_OVER_PEER,
                    "ours_samples_per_s": ours["samples_per_s"],
                    "best_peer": best["bench"], "best_peer_samples_per_s": best["samples_per_s"],
                    "peers_measured": len(peers)})
    mfu_target("audio_v2_base_mfu", "audio_v2", TARGET_AUDIO_TEXT_MFU)
    mfu_target("text_v2_base_mfu", "text_v2", TARGET_AUDIO_TEXT_MFU)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny configs on any backend (CPU)")
    p.add_argument("--dry_run", action="store_true", help="print the plan; run nothing")
    p.add_argument("--budget_s", type=float, default=420.0,
                   help="stop starting runs past this (the command's share of 8 device minutes)")
    p.add_argument("--min_run_s", type=float, default=45.0,
                   help="do not start a run with less than this left")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (GPU 30, smoke 3)")
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--out", default=os.environ.get("OUT", ""),
                   help="folder for gpu_check.jsonl (default $OUT, else none)")
    args = p.parse_args(argv)
    steps = args.steps or (3 if args.smoke else 30)
    items = plan(args.smoke, steps)
    if args.only:
        keep = set(args.only.split(","))
        items = [i for i in items if i["name"] in keep]
    sink = os.path.join(args.out, "gpu_check.jsonl") if args.out else None

    def emit(obj):
        line = json.dumps(obj)
        print(line, flush=True)
        if sink:  # appended line by line: a run killed mid-way keeps what came before
            with open(sink, "a") as f:
                f.write(line + "\n")

    start = time.perf_counter()
    runs: dict[str, dict] = {}
    for item in items:
        left = args.budget_s - (time.perf_counter() - start)
        if args.dry_run:
            emit({"check": item["name"], "cmd": " ".join(["python"] + item["argv"]),
                  "timeout_s": item["timeout"], "rc": "dry_run"})
            continue
        if left < args.min_run_s:
            runs[item["name"]] = {"check": item["name"], "rc": "skipped: budget", "result": None}
            emit(runs[item["name"]])
            continue
        runs[item["name"]] = run_one(item, min(item["timeout"], left))
        emit(runs[item["name"]])
    lines = verdicts(runs)
    for v in lines:
        emit({"gpu_check": "target", "smoke": args.smoke, "dry_run": args.dry_run, **v})
    for v in lines:
        value = f"{v['value']:.3f}" if "value" in v else "-"
        print(f"{v['verdict']} {v['target']} {value} (target >= {v['threshold']})"
              + (" [smoke: CPU tiny configs, not a GPU verdict]" if args.smoke else ""),
              flush=True)
    print(f"gpu_check: {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
