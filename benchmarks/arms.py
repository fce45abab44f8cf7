"""The arms of the label-efficiency benchmarks (benchmarks/label_efficiency.py,
benchmarks/asr_efficiency.py) and the grid of fine-tuning runs they share.

A plain module with no absl flags, so that tests can import it next to
`d2v_jax.train` (whose flags a flag-defining benchmark script would clash with).
"""

from __future__ import annotations

import json
import os
from typing import Callable

from d2v_jax import errors, finetune
from d2v_jax.config import load_config, parse_overrides


def label_efficiency_arms(init_from: str, both: str, pretrained: str, scratch: str) -> dict:
    """{arm: fine-tune config overrides}. Scratch builds the pretraining run's own
    architecture (its saved config, --pretrain_overrides included) unless its
    overrides name another `backbone`: the arms differ only in the initial weights."""
    common = parse_overrides(both)
    return {"pretrained": {**common, **parse_overrides(pretrained)},
            "scratch": {"backbone": init_from, **common, **parse_overrides(scratch)}}


def chosen_arms(arms: dict, names, finetune_config: str, init_from: str) -> tuple[dict, tuple | None]:
    """The arms that `--arms` names (a misspelt one is a ConfigError naming the
    valid ones), and the pretrained weights when the pretrained arm is among
    them (read once for all its runs), else None."""
    unknown = sorted(set(names) - set(arms))
    if unknown or not names:
        raise errors.ConfigError(f"--arms: unknown {unknown}; expected some of {sorted(arms)}")
    arms = {k: v for k, v in arms.items() if k in names}
    if "pretrained" not in arms:
        return arms, None
    base = load_config(finetune_config, arms["pretrained"])
    return arms, finetune.load_pretrained(init_from, base.init.params, base.init.step)


def _same_spelling(config: dict) -> dict:
    """`config` with a `backbone` that names a run directory written as its real
    path: `--init_from runs/x/pretrain` and `/abs/runs/x/pretrain` are one run."""
    backbone = config.get("backbone")
    if isinstance(backbone, str) and backbone and os.path.isdir(backbone):
        return {**config, "backbone": os.path.realpath(backbone)}
    return config


def finished_run(rundir: str, config) -> dict | None:
    """The results of a finished run in `rundir` made with exactly `config`
    (a rerun with more points or seeds only trains what is missing); the scratch
    arm's backbone directory may be spelt relative or absolute."""
    try:
        with open(os.path.join(rundir, "config.json")) as f:
            same = (_same_spelling(json.load(f))
                    == _same_spelling(json.loads(config.to_json_best_effort())))
        with open(os.path.join(rundir, "results.json")) as f:
            return json.load(f) if same else None
    except (OSError, ValueError):
        return None


def run_grid(arms: dict, finetune_config: str, field: str, points, seeds, workdir: str,
             init_from: str, pretrained, report: Callable[[str, float, int, dict], None],
             tag: str) -> list[dict]:
    """Fine-tunes every arm at every value of config `field` (a label fraction,
    minutes of transcribed audio) and seed into `<workdir>/runs/<arm>_<tag><point>_s<seed>`,
    reusing finished runs; `report(arm, point, seed, results)` after each.
    Returns the runs' results, each with its `arm` and whether it was `reused`."""
    runs = []
    for point in points:
        for seed in seeds:
            for arm, overrides in arms.items():
                config = load_config(finetune_config, {**overrides, "seed": seed, field: point})
                rundir = os.path.join(workdir, "runs", f"{arm}_{tag}{point:g}_s{seed}")
                res = finished_run(rundir, config)
                reused = res is not None
                if not reused:
                    mine = arm == "pretrained"
                    _, res = finetune.train_and_evaluate(
                        config, rundir, init_from if mine else None,
                        pretrained=pretrained if mine else None)
                res["arm"], res["reused"] = arm, reused
                report(arm, point, seed, res)
                runs.append(res)
    return runs


def reuse_meta(runs: list[dict]) -> dict:
    """How many of `run_grid`'s runs an earlier invocation trained, and their own
    wall time then (this invocation's fine-tuning time leaves them out)."""
    reused = [r for r in runs if r.get("reused")]
    return {"num_runs": len(runs), "runs_reused": len(reused),
            "reused_seconds": float(sum(r.get("wall_seconds", 0.0) for r in reused))}


def reuse_note(meta: dict) -> str:
    """' (k of n runs reused from an earlier invocation: s s when they ran)' for a
    table's footnote, or '' when every run trained now."""
    if not meta.get("runs_reused"):
        return ""
    return (f" ({meta['runs_reused']} of {meta['num_runs']} runs reused from an earlier invocation: "
            f"{meta['reused_seconds']:.0f} s when they ran)")
