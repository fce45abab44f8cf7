r"""Speech recognition label efficiency: CTC fine-tuning of a pretrained speech
encoder vs the same encoder from scratch, at several amounts of transcribed
audio (minutes), over seeds; CER and WER on held-out voices.

  python benchmarks/asr_efficiency.py --workdir runs/le_asr \
      --minutes 2,10,74 --seeds 0,1,2

Pretrains `--pretrain` (with `--pretrain_overrides`; by default the log-mel
tiny encoder for 3,000 steps) on the unlabeled training audio of the espeak-ng
sentence set (its train.tsv: the 5 training voices; the test voice is never
heard) unless `--init_from` names a pretraining work dir. Every fine-tune runs in
this process (each arm compiles once); a finished run with the same config is
reused. Writes `asr_efficiency.md` (the table), `results.json` and each run's
results.json under runs/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import flags, logging

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from arms import chosen_arms, label_efficiency_arms, reuse_meta, reuse_note, run_grid  # noqa: E402
from d2v_jax import checkpoint, errors  # noqa: E402
from d2v_jax.config import load_config, parse_overrides  # noqa: E402
from d2v_jax.modalities.audio import sentence_set  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_PRETRAIN = flags.DEFINE_string("pretrain", "experiments/audio.py:tiny_v2_logmel",
                                "Pretraining experiment.")
_PRETRAIN_OVERRIDES = flags.DEFINE_string(
    "pretrain_overrides", "train.num_steps=3000,ema.anneal_steps=3000",
    "key=value,... for the pretraining run (passed as --config.key=value).")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Reuse this pretraining work dir.")
_FINETUNE = flags.DEFINE_string("finetune", "experiments/finetune.py:asr_espeak", "CTC experiment.")
_MINUTES = flags.DEFINE_list("minutes", ["2", "10", "74"], "Transcribed minutes per run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Fine-tune seeds (subset, init, order).")
_OVERRIDES = flags.DEFINE_string("overrides", "", "key=value,... for both arms.")
_PRETRAINED_OVERRIDES = flags.DEFINE_string("pretrained_overrides", "", "key=value,... pretrained.")
# A random conv front-end frozen would handicap scratch: it trains everything from step 0.
_SCRATCH_OVERRIDES = flags.DEFINE_string(
    "scratch_overrides", "encoder.feature_grad_mult=1.0,optim.freeze_finetune_updates=0",
    "key=value,... for the scratch arm.")
# Scratch does not depend on the pretraining weights (only on its saved config), so
# its runs can train while the pretraining run is still going.
_ARMS = flags.DEFINE_list("arms", ["pretrained", "scratch"], "Which arms to fine-tune.")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def table(runs: list[dict], minutes: list[float], meta: dict) -> str:
    lines = ["| transcribed audio | pretrained CER | scratch CER | CER ratio | pretrained WER "
             "| scratch WER |", "|---|---|---|---|---|---|"]
    for m in minutes:
        cell = {}
        for arm in ("pretrained", "scratch"):
            rows = [r for r in runs if r["arm"] == arm and r["minutes_asked"] == m]
            if not rows:
                cell[arm, "cer"] = cell[arm, "wer"] = (float("nan"), "-")
                continue
            for k in ("cer", "wer"):
                v = np.array([r["metrics"][k] for r in rows])
                sd = f" +- {v.std(ddof=1):.3f}" if len(v) > 1 else ""
                cell[arm, k] = (v.mean(), f"{v.mean():.3f}{sd}")
        got = [r["train_minutes"] for r in runs if r["minutes_asked"] == m]
        n = max(sum(r["arm"] == arm for r in runs if r["minutes_asked"] == m)
                for arm in ("pretrained", "scratch"))
        lines.append(f"| {m:g} min ({np.mean(got):.1f} min, n={n}) | "
                     f"{cell['pretrained', 'cer'][1]} | {cell['scratch', 'cer'][1]} | "
                     f"{cell['pretrained', 'cer'][0] / max(cell['scratch', 'cer'][0], 1e-9):.2f} | "
                     f"{cell['pretrained', 'wer'][1]} | {cell['scratch', 'wer'][1]} |")
    lines += ["", f"Seeds {meta['seeds']}; {meta['num_test']} test utterances by the held-out "
              f"voice(s) {meta['test_speakers']}. Pretraining {meta['pretrain_seconds']:.0f} s, "
              f"fine-tuning {meta['finetune_seconds']:.0f} s{reuse_note(meta)}, all told "
              f"{meta['total_seconds'] / 60:.1f} min.", "",
              f"Load at start: `{meta['load_start']}`  ", f"Load at end: `{meta['load_end']}`", ""]
    return "\n".join(lines)


def main(argv):
    del argv
    t0 = time.perf_counter()
    load_start = _uptime()
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    minutes = [float(m) for m in _MINUTES.value]
    seeds = [int(s) for s in _SEEDS.value]

    init_from, pretrain_seconds = _INIT_FROM.value, 0.0
    if not init_from:
        init_from = os.path.join(workdir, "pretrain")
        poverrides = parse_overrides(_PRETRAIN_OVERRIDES.value)
        pconfig = load_config(_PRETRAIN.value, poverrides)
        ckdir = checkpoint.checkpoint_dir(init_from)
        done = os.path.isdir(ckdir) and str(pconfig.train.num_steps) in os.listdir(ckdir)
        if not done:
            train_tsv = os.path.join(sentence_set.ensure_sentence_set(), "train.tsv")
            cmd = [sys.executable, "-m", "d2v_jax.train", f"--config={_PRETRAIN.value}",
                   f"--workdir={init_from}", "--config.data.source=manifest",
                   f"--config.data.path={train_tsv}"] + [
                       f"--config.{k}={v}" for k, v in poverrides.items()]
            logging.info("pretraining: %s", " ".join(cmd))
            t = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=_ROOT)
            pretrain_seconds = time.perf_counter() - t

    arms = label_efficiency_arms(init_from, _OVERRIDES.value, _PRETRAINED_OVERRIDES.value,
                                 _SCRATCH_OVERRIDES.value)
    arms, pretrained = chosen_arms(arms, _ARMS.value, _FINETUNE.value, init_from)
    t_ft = time.perf_counter()

    def report(arm, m, seed, res):
        res["minutes_asked"] = m
        print(f"{arm} {m:g} min seed {seed}: CER {res['metrics']['cer']:.3f} WER "
              f"{res['metrics']['wer']:.3f} ({res['wall_seconds']:.0f} s)", flush=True)

    runs = run_grid(arms, _FINETUNE.value, "data.train_minutes", minutes, seeds, workdir,
                    init_from, pretrained, report, tag="m")
    meta = {"seeds": seeds, "num_test": runs[0]["num_test"],
            "test_speakers": runs[0]["test_speakers"], "pretrain_seconds": pretrain_seconds,
            "finetune_seconds": time.perf_counter() - t_ft, **reuse_meta(runs),
            "total_seconds": time.perf_counter() - t0, "load_start": load_start,
            "load_end": _uptime(), "init_from": init_from, "arms": arms,
            "command": " ".join([os.path.relpath(sys.argv[0], _ROOT)] + sys.argv[1:])}
    text = table(runs, minutes, meta)
    with open(os.path.join(workdir, "asr_efficiency.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=2)
    print(text)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    # A user error (bad flag, config key or value, data) is one `error:` line, exit 2
    # (d2v_jax/errors.py); --debug shows its traceback.
    sys.exit(errors.absl_main(None, lambda fv: main(sys.argv[:1]), None, doc=__doc__,
                              flag_values=flags.FLAGS))
