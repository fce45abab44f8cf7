r"""Every official fine-tuning protocol end to end on this machine: the small
stand-in data of benchmarks/protocol_data.py, each protocol's own recipe with
fewer updates (and smaller batches) set on the command line, one
`python -m d2v_jax.finetune` per protocol; a markdown table of the command,
its wall time and its headline metric.

  python benchmarks/finetune_protocols.py --workdir runs/protocols \
      [--image_init_from runs/le_protocols/mnist_folders/pretrain] [--only glue_rte,...]

Backbones: the image protocols fine-tune `--image_init_from` (a digits
pretraining on the same folders, test split held out) or, without it, the
digits ViT from scratch; `imagenet_v1` needs a 1.0 (BEiT) encoder and trains
`experiments/image.py:digits_v1` from scratch. GLUE trains the tiny text
model from scratch (its tokenizer trained on its own corpus), LibriSpeech the
tiny log-mel speech model. These runs check that each protocol runs; with so
few updates their metrics say little about the recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))

import protocol_data  # noqa: E402  (benchmarks/protocol_data.py)

GLUE_DIRS = {"cola": "CoLA", "mnli": "MNLI", "mrpc": "MRPC", "qnli": "QNLI", "qqp": "QQP",
             "rte": "RTE", "sst_2": "SST-2", "sts_b": "STS-B"}


def commands(data: str, image_init_from: str | None) -> dict[str, list[str]]:
    """{protocol: the finetune CLI overrides} for the small runs."""
    folders = os.path.join(data, "mnist_folders")
    image = [f"--config.data.path={folders}", "--config.data.batch_size=32",
             "--config.train.num_steps=100", "--config.optim.warmup_steps=10"]
    init = ([f"--init_from={image_init_from}"] if image_init_from
            else ["--config.backbone=experiments/image.py:digits_v2"])
    out = {name: image + init for name in ("imagenet_v2", "imagenet_v2_large")}
    out["imagenet_v1"] = image + ["--config.backbone=experiments/image.py:digits_v1"]
    for task, folder in GLUE_DIRS.items():
        out[f"glue_{task}"] = [f"--config.data.path={os.path.join(data, 'glue', folder)}",
                               "--config.backbone=experiments/text.py:tiny_v2",
                               "--config.train.num_steps=60", "--config.optim.warmup_steps=6",
                               "--config.data.too_long=truncate"]  # the tiny model has 64 positions
    for split in ("10m", "1h", "10h", "100h", "960h"):
        out[f"librispeech_{split}"] = [
            f"--config.data.path={os.path.join(data, 'librispeech')}",
            "--config.backbone=experiments/audio.py:tiny_v2_logmel",
            "--config.train.num_steps=40", "--config.optim.freeze_finetune_updates=10",
            "--config.data.max_tokens=640000", "--config.data.batch_size=2",
            "--config.masking.mask_channel_length=8"]
    return out


def run(name: str, overrides: list[str], workdir: str) -> dict:
    rundir = os.path.join(workdir, name)
    cmd = [sys.executable, "-m", "d2v_jax.finetune",
           f"--config=experiments/finetune.py:{name}", f"--workdir={rundir}"] + overrides
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(rundir, "results.json")) as f:
        r = json.load(f)
    return {"protocol": name, "command": " ".join(["python -m d2v_jax.finetune",
                                                   f"--config experiments/finetune.py:{name}"]
                                                  + overrides),
            "wall_seconds": wall, "headline": r["headline"], "value": r["metrics"][r["headline"]],
            "metrics": r["metrics"], "num_steps": r["num_steps"], "num_labels": r["num_labels"],
            "num_test": r["num_test"]}


def table(rows: list[dict]) -> str:
    lines = ["| protocol | steps | wall (s) | headline metric | value |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['protocol']}` | {r['num_steps']} | {r['wall_seconds']:.0f} | "
                     f"{r['headline']} | {r['value']:.3f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", default="", help="protocol_data.py's folder (default <workdir>/data)")
    p.add_argument("--image_init_from", default=None)
    p.add_argument("--only", default="", help="comma-separated protocols (default: all)")
    a = p.parse_args()
    data = a.data or os.path.join(a.workdir, "data")
    protocol_data.write_mnist_folders(os.path.join(data, "mnist_folders"))
    protocol_data.write_glue(os.path.join(data, "glue"))
    protocol_data.write_librispeech(os.path.join(data, "librispeech"))
    cmds = commands(data, a.image_init_from)
    names = [n for n in a.only.split(",") if n] or list(cmds)
    rows = []
    for name in names:
        rows.append(run(name, cmds[name], a.workdir))
        print(f"{name}: {rows[-1]['headline']} {rows[-1]['value']:.3f} "
              f"({rows[-1]['wall_seconds']:.0f} s)", flush=True)
    with open(os.path.join(a.workdir, "protocols.json"), "w") as f:
        json.dump(rows, f, indent=2)
    text = table(rows)
    with open(os.path.join(a.workdir, "protocols.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
