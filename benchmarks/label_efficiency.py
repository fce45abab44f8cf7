r"""Label efficiency: fine-tune a pretrained encoder vs the same one from scratch.

For one data set: pretrain once (or reuse a pretraining work dir), then
fine-tune pretrained and scratch models at each label fraction over several
seeds, and write a markdown table, a plot (metric vs fraction, both curves,
mean +- std over seeds) and every run's results.json.

  python benchmarks/label_efficiency.py --workdir runs/le_mnist \
      --pretrain experiments/image.py:digits_v2 --finetune experiments/finetune.py:mnist_5k \
      --fractions 0.01,0.05,0.2,1.0 --seeds 0,1,2

  # the headline check only (5% labels, 3 seeds; pretraining included):
  python benchmarks/label_efficiency.py --workdir runs/le_mnist_5pct --fractions 0.05

Each arm takes config overrides (`--pretrained_overrides`, `--scratch_overrides`,
`--overrides` for both, as `key=value,key=value`). The scratch arm builds the
pretraining run's own architecture (the config saved with its checkpoint) unless
`--scratch_overrides` sets `backbone`. Everything runs in one process, so each
arm compiles once and every seed reuses it. For SMILES regression and text
classification the table also has the baselines of benchmarks/baselines.py
(fingerprints + random forest / ridge, TF-IDF + logistic regression) on the
same rows, fractions and seeds (`--nobaselines` leaves them out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags, logging

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, _ROOT)

import baselines  # noqa: E402  (benchmarks/baselines.py)
from arms import chosen_arms, label_efficiency_arms, reuse_meta, reuse_note, run_grid  # noqa: E402  (benchmarks/arms.py, next to this script)
from d2v_jax import checkpoint, errors  # noqa: E402
from d2v_jax.config import load_config, parse_overrides  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (pretraining, runs, table, plot).")
_PRETRAIN = flags.DEFINE_string("pretrain", "experiments/image.py:digits_v2", "Pretraining experiment.")
_PRETRAIN_OVERRIDES = flags.DEFINE_string("pretrain_overrides", "", "key=value,... for pretraining.")
_INIT_FROM = flags.DEFINE_string("init_from", None,
                                 "Reuse this pretraining work dir instead of pretraining.")
_FINETUNE = flags.DEFINE_string("finetune", "experiments/finetune.py:mnist_5k", "Fine-tune experiment.")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.01", "0.05", "0.2", "1.0"], "Label fractions.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Fine-tune seeds.")
_OVERRIDES = flags.DEFINE_string("overrides", "", "key=value,... for both arms.")
_PRETRAINED_OVERRIDES = flags.DEFINE_string("pretrained_overrides", "", "key=value,... pretrained arm.")
_SCRATCH_OVERRIDES = flags.DEFINE_string(
    "scratch_overrides", "optim.layer_decay=1.0",
    "key=value,... for the scratch arm (layer decay means nothing for random weights).")
_ARMS = flags.DEFINE_list("arms", ["pretrained", "scratch"],
                          "Which arms to fine-tune (e.g. one arm's variant: --arms pretrained "
                          "--pretrained_overrides ...).")
_TITLE = flags.DEFINE_string("title", None, "Plot/table title (default: the fine-tune experiment).")
_BASELINES = flags.DEFINE_bool(
    "baselines", True, "Add the rows of benchmarks/baselines.py (Morgan fingerprints + random "
    "forest / ridge for SMILES regression, TF-IDF + logistic regression for text "
    "classification) on the same splits, fractions and seeds; tasks without one skip it.")


def sequences_of(init_from: str, pretrained) -> str:
    """'protein' when the pretraining run's tokenizer reads protein sequences (so
    a text_tsv's baselines are the peptide k-mer ones), else 'auto'."""
    if pretrained is not None:  # (params, the pretraining config)
        config = pretrained[1].to_dict()
    else:
        try:
            with open(os.path.join(init_from, "config.json")) as f:
                config = json.load(f)
        except (OSError, ValueError):
            config = {}
    return "protein" if config.get("tokenizer", {}).get("kind") == "protein" else "auto"


def machine_load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable"


def summarize(runs: list[dict], arms: list[str], fractions: list[float]) -> dict:
    """{arm: {fraction: {"mean", "std", "values", "num_labels"}}} of the headline metric."""
    import numpy as np

    out = {}
    for arm in arms:
        out[arm] = {}
        for f in fractions:
            rows = [r for r in runs if r["arm"] == arm and r["label_fraction"] == f]
            vals = np.array([r["metrics"][r["headline"]] for r in rows])
            out[arm][f] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                           "values": vals.tolist(), "num_labels": rows[0]["num_labels"],
                           "seeds": [r["seed"] for r in rows]}
    return out


def write_table(path: str, summary: dict, headline: str, title: str, meta: dict) -> str:
    arms = list(summary)
    fractions = list(summary[arms[0]])
    scale = 100.0 if headline == "accuracy" else 1.0
    unit = " (%)" if headline == "accuracy" else ""
    digits = 1 if headline == "accuracy" else 3  # RMSE / MAE in the target's units
    lines = [f"### {title}", "",
             f"| labels | {' | '.join(f'{a} {headline}{unit}' for a in arms)} | pretrained - scratch |",
             "|---|" + "---|" * (len(arms) + 1)]
    for f in fractions:
        cells = [f"{scale * summary[a][f]['mean']:.{digits}f} +- {scale * summary[a][f]['std']:.{digits}f}"
                 for a in arms]
        delta = ""
        if "pretrained" in summary and "scratch" in summary:
            delta = f"{scale * (summary['pretrained'][f]['mean'] - summary['scratch'][f]['mean']):+.{digits}f}"
        n = summary[arms[0]][f]["num_labels"]
        lines.append(f"| {100 * f:g}% ({n}) | {' | '.join(cells)} | {delta} |")
    lines += ["", f"Mean +- sample std over seeds {meta['seeds']}; test split of {meta['num_test']} "
              f"examples fixed by data.split_seed. Pretraining {meta['pretrain_seconds']:.0f} s, "
              f"fine-tuning {meta['finetune_seconds']:.0f} s{reuse_note(meta)}, all told "
              f"{meta['total_seconds']:.0f} s "
              f"({meta['total_seconds'] / 60:.1f} min).", "",
              f"Load at start: `{meta['load_start']}`  ", f"Load at end: `{meta['load_end']}`", ""]
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text)
    return text


def plot(path: str, summary: dict, headline: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    scale = 100.0 if headline == "accuracy" else 1.0
    for arm, rows in summary.items():
        fs = sorted(rows)
        ax.errorbar([100 * f for f in fs], [scale * rows[f]["mean"] for f in fs],
                    yerr=[scale * rows[f]["std"] for f in fs], marker="o", capsize=4, label=arm)
    ax.set_xscale("log")
    ax.set(xlabel="labels used (% of the training split)",
           ylabel=f"test {headline}" + (" (%)" if headline == "accuracy" else ""), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    t0 = time.perf_counter()
    load_start = machine_load()
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    fractions = [float(f) for f in _FRACTIONS.value]
    seeds = [int(s) for s in _SEEDS.value]

    # 1. Pretrain once (resumes / reuses a finished run in the same work dir).
    init_from = _INIT_FROM.value
    pretrain_seconds = 0.0
    if not init_from:
        init_from = os.path.join(workdir, "pretrain")
        pconfig = load_config(_PRETRAIN.value, parse_overrides(_PRETRAIN_OVERRIDES.value))
        mgr_steps = []
        if os.path.isdir(checkpoint.checkpoint_dir(init_from)):
            mgr_steps = [int(d) for d in os.listdir(checkpoint.checkpoint_dir(init_from)) if d.isdigit()]
        if pconfig.train.num_steps not in mgr_steps:
            t = time.perf_counter()
            # The user's own command, in a subprocess (d2v_jax.train owns its flags).
            cmd = [sys.executable, "-m", "d2v_jax.train", f"--config={_PRETRAIN.value}",
                   f"--workdir={init_from}"] + [f"--config.{k}={v}" for k, v in
                                                parse_overrides(_PRETRAIN_OVERRIDES.value).items()]
            logging.info("pretraining: %s", " ".join(cmd))
            subprocess.run(cmd, check=True, cwd=_ROOT)
            pretrain_seconds = time.perf_counter() - t
            logging.info("pretrained in %.0f s", pretrain_seconds)

    # 2. Fine-tune both arms; the checkpoint is read once per `init.params`.
    arms = label_efficiency_arms(init_from, _OVERRIDES.value, _PRETRAINED_OVERRIDES.value,
                                 _SCRATCH_OVERRIDES.value)
    arms, pretrained = chosen_arms(arms, _ARMS.value, _FINETUNE.value, init_from)
    t_ft = time.perf_counter()

    def report(arm, f, seed, res):
        logging.info("%s f=%g seed=%d: %s (%.0f s)", arm, f, seed, json.dumps(res["metrics"]),
                     res["wall_seconds"])

    runs = run_grid(arms, _FINETUNE.value, "data.label_fraction", fractions, seeds, workdir,
                    init_from, pretrained, report, tag="f")
    finetune_seconds = time.perf_counter() - t_ft
    reuse = reuse_meta(runs)  # the fine-tunes only, before the baselines' rows join
    names = list(arms)
    if _BASELINES.value:  # the (first) arm's data fields: the same rows
        opts = baselines.Options(sequences=sequences_of(init_from, pretrained))
        extra = baselines.grid_rows(_FINETUNE.value, next(iter(arms.values())), fractions, seeds,
                                    opts)
        runs += extra
        names += list(dict.fromkeys(r["arm"] for r in extra))

    headline = runs[0]["headline"]
    summary = summarize(runs, names, fractions)
    meta = {"seeds": seeds, "num_test": runs[0]["num_test"], "pretrain_seconds": pretrain_seconds,
            "finetune_seconds": finetune_seconds, **reuse, "total_seconds": time.perf_counter() - t0,
            "load_start": load_start, "load_end": machine_load(), "init_from": init_from,
            "pretrain": _PRETRAIN.value, "finetune": _FINETUNE.value, "arms": arms,
            "command": " ".join([os.path.relpath(sys.argv[0], _ROOT)] + sys.argv[1:])}
    title = _TITLE.value or f"{_FINETUNE.value.split(':')[-1]}: pretrained vs scratch"
    table = write_table(os.path.join(workdir, "label_efficiency.md"), summary, headline, title, meta)
    plot(os.path.join(workdir, "label_efficiency.png"), summary, headline, title)
    with open(os.path.join(workdir, "results.json"), "w") as fh:
        json.dump({"meta": meta, "summary": {a: {str(k): v for k, v in s.items()}
                                             for a, s in summary.items()},
                   "runs": runs}, fh, indent=2)
    print(table)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    # A user error (bad flag, config key or value, data) is one `error:` line, exit 2
    # (d2v_jax/errors.py); --debug shows its traceback.
    sys.exit(errors.absl_main(None, lambda fv: main(sys.argv[:1]), None, doc=__doc__,
                              flag_values=flags.FLAGS))
