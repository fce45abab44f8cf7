r"""Our step vs the PyTorch peer, alternating in one invocation, and the ratio.

    python benchmarks/compare.py --config experiments/image.py:tiny_v1 --batch 32 --rounds 2

Each round runs, one after the other, `step_bench.py` (JAX), `peer_torch.py`
(eager) and `peer_torch.py --compile`, each in its own process (so neither
framework's thread pools or allocator see the other's), on the same config,
batch and step count. Alternating spreads slow phases of a shared machine over
all variants. Prints every run's JSON line (`"run"`), then one summary line:
the median samples/s of each variant over the rounds and
`ratio_vs_best_peer` = ours / the faster torch variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable] + cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"compare: {' '.join(cmd)} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="experiments/image.py:tiny_v1")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the JAX step (step_bench.py --set)")
    args = p.parse_args(argv)

    common = ["--config", args.config, "--steps", str(args.steps)]
    if args.batch is not None:
        common += ["--batch", str(args.batch)]
    variants = {
        "jax": [os.path.join(HERE, "step_bench.py")] + common + ["--no_xla_check"]
               + [f"--set={s}" for s in args.set],
        "torch_eager": [os.path.join(HERE, "peer_torch.py")] + common,
    }
    if not args.no_compile:
        variants["torch_compiled"] = [os.path.join(HERE, "peer_torch.py"), "--compile"] + common

    results: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, cmd in variants.items():
            out = run(cmd)
            results[name].append(out)
            print(json.dumps({"run": name, "round": r, **out}), flush=True)

    summary = {name: {"samples_per_s": float(np.median([o["samples_per_s"] for o in outs])),
                      "step_time_s": float(np.median([o["step_time_s"]["median"] for o in outs])),
                      "mfu": float(np.median([o["mfu"] for o in outs]))}
               for name, outs in results.items()}
    peers = [v["samples_per_s"] for k, v in summary.items() if k != "jax"]
    first = results["jax"][0]
    print(json.dumps({
        "compare": args.config, "global_batch": first["global_batch"],
        "device_kind": first["device_kind"], "rounds": args.rounds, "steps": args.steps,
        "variants": summary,
        "ratio_vs_best_peer": summary["jax"]["samples_per_s"] / max(peers),
        "ratio_vs_each": {k: summary["jax"]["samples_per_s"] / v["samples_per_s"]
                          for k, v in summary.items() if k != "jax"},
    }), flush=True)


if __name__ == "__main__":
    main()
