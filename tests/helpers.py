"""Helpers that more than one test module uses: the repository's paths, the
tiny config of each modality, small data builders and the CLI runner.

Plain functions and constants live here so that test modules can import them
(`from helpers import ...`; pytest puts tests/ on sys.path); tests/conftest.py
wraps the ones a test takes as a fixture. Test modules never import each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import soundfile as sf
from PIL import Image

from d2v_jax import checkpoint, modalities
from d2v_jax.config import load_config
from d2v_jax.train_state import create_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
IMAGE = os.path.join(EXPERIMENTS, "image.py")
AUDIO = os.path.join(EXPERIMENTS, "audio.py")
TEXT = os.path.join(EXPERIMENTS, "text.py")
MOLECULES = os.path.join(EXPERIMENTS, "molecules.py")
FINETUNE = os.path.join(EXPERIMENTS, "finetune.py")

# ----------------------------------------------------------------------------- tiny configs
# The smallest models the tests build: one block, 32 wide, so a test compiles
# in seconds. Tests that need another size say so as a delta from these.

TINY_IMAGE = {"model.depth": 1, "model.dim": 32, "model.num_heads": 2, "target.top_k": 1,
              "decoder.layers": 1, "decoder.dim": 32}
TINY_AUDIO = {"model.dim": 32, "model.depth": 1, "model.num_heads": 2, "model.conv_dims": (8,) * 7,
              "model.pos_conv_width": 8, "model.pos_conv_depth": 1, "model.pos_conv_groups": 2,
              "target.top_k": 1, "decoder.dim": 16, "decoder.layers": 1, "decoder.groups": 2,
              "data.max_sample_size": 4000, "data.min_sample_size": 400,
              "data.buckets": (4000,)}
TINY_TEXT = {"model.dim": 32, "model.depth": 1, "model.num_heads": 2, "model.max_positions": 24,
             "data.max_len": 24, "target.top_k": 1, "decoder.dim": 16, "decoder.layers": 1,
             "tokenizer.vocab_size": 300}
# SMILES: the text model on a SMILES file (experiments/molecules.py); pass data.path.
TINY_MOLECULES = {**TINY_TEXT, "data.source": "smiles"}



def image_folder_run(data_path, num_steps=60, checkpoint_every=10) -> dict:
    """Overrides of experiments/image.py:tiny_v2 for short train runs on an image
    folder (helpers.make_image_folder): TINY_IMAGE on 16x16 images, batches of 4."""
    return {"model.image_size": 16, **TINY_IMAGE, "masking.num_clones": 2,
            "data.source": "image_folder", "data.path": str(data_path), "data.batch_size": 4,
            "data.prefetch": 2, "train.log_every": 1, "train.checkpoint_every": checkpoint_every,
            "train.num_steps": num_steps, "train.keep_checkpoints": 2}


TINY = {"image": (IMAGE, TINY_IMAGE), "audio": (AUDIO, TINY_AUDIO), "text": (TEXT, TINY_TEXT),
        "molecules": (MOLECULES, TINY_MOLECULES)}


def tiny_config(modality: str, arg: str = "tiny_v2", **overrides):
    """experiments/<modality>.py:<arg> with the modality's TINY_* overrides and
    `overrides` (dotted keys: `**{"data.path": p}`) on top."""
    path, tiny = TINY[modality]
    return load_config(f"{path}:{arg}", {**tiny, **overrides})


def finetune_config(arg: str = "mnist_5k", **overrides):
    """experiments/finetune.py:<arg> with dotted-key overrides."""
    return load_config(f"{FINETUNE}:{arg}", overrides)


def init_state(config, rng, **kwargs):
    """create_train_state(config, rng, **kwargs) as one jitted call: the same values
    as the op-by-op call, which compiles every init op on its own (seconds)."""
    return jax.jit(lambda r: create_train_state(config, r, **kwargs))(rng)


def pretrain_dataset(config, **kwargs):
    """The modality's pipeline as the train loop builds it (no config validation)."""
    return modalities.get(config).pretrain_dataset(config, **kwargs)


def flat(tree) -> dict:
    """{keystr(path): numpy array} of a pytree's leaves."""
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------- data builders


def make_image_folder(root, n=24, size=12, seed=0, classes=("a",)):
    """Class folders of `n` small random grayscale PNGs each; returns `root` (a str)."""
    root = str(root)
    rng = np.random.default_rng(seed)
    for cls in classes:
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
                os.path.join(root, cls, f"{i:03d}.png"))
    return root


WAV_CLASS_SIZES = {"go": 5, "stop": 4, "yes": 3}


def write_wav_class_folders(root, sizes=WAV_CLASS_SIZES, rate=16_000, seed=0):
    """<root>/<class>/<j>.wav: Gaussian noise of 1,500-6,000 samples, 16-bit PCM.
    Returns {"<class>/<j>.wav": number of samples}."""
    rng = np.random.default_rng(seed)
    lengths = {}
    for word, n in sizes.items():
        os.makedirs(os.path.join(root, word), exist_ok=True)
        for j in range(n):
            length = int(rng.integers(1500, 6000))
            sf.write(os.path.join(root, word, f"{j}.wav"),
                     rng.normal(0, 0.1, length).astype(np.float32), rate, subtype="PCM_16")
            lengths[f"{word}/{j}.wav"] = length
    return lengths


def write_text(path, content: bytes | str) -> str:
    """Writes `content` (bytes as they are, str as UTF-8) to `path`; returns it as a str."""
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as f:
        f.write(content)
    return str(path)


# Three one-sentence "documents", one per class of the small labeled text set.
WORDS = {"net": "the socket sends bytes over the network to a remote host and port",
         "disk": "the file is written to a folder on the local disk and closed",
         "math": "the function returns the square root of a positive number"}


def write_text_corpus(path, docs=tuple(WORDS.values()), copies=1) -> str:
    """A line-per-document corpus file (`data.doc_sep='line'`): `docs` joined by
    newlines, that text `copies` times, then a newline."""
    return write_text(path, "\n".join(docs) * copies + "\n")


# ----------------------------------------------------------------------------- CLI


def cli_args(module: str, *args) -> list[str]:
    """The argv of `python -m d2v_jax.<module> args...` with this interpreter."""
    return [sys.executable, "-m", f"d2v_jax.{module}", *map(str, args)]


class CliRun(tuple):
    """(returncode, stdout + stderr); .stdout and .stderr hold each stream alone."""

    def __new__(cls, returncode, stdout, stderr):
        run = super().__new__(cls, (returncode, stdout + stderr))
        run.stdout, run.stderr = stdout, stderr
        return run

    @property
    def returncode(self):
        return self[0]

    @property
    def output(self):
        return self[1]


def xla_env(devices: int | None = None, **extra) -> dict:
    """os.environ for a subprocess on the CPU platform: the suite's XLA_FLAGS
    (tests/conftest.py) kept, `devices` fake host devices when given."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), **extra)


def run_cli(module: str, *args, env=None, timeout=300) -> CliRun:
    """Runs `python -m d2v_jax.<module> args...` in a subprocess from the
    repository root; returns (returncode, stdout + stderr)."""
    proc = subprocess.run(cli_args(module, *args), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return CliRun(proc.returncode, proc.stdout, proc.stderr)


# ----------------------------------------------------------------------------- runs stopped and resumed


def env_with_cache(cache_dir):
    return xla_env(None, JAX_COMPILATION_CACHE_DIR=cache_dir,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def start(workdir, overrides, env, experiment=None, log=None):
    """`python -m d2v_jax.train` on `experiment` (image tiny_v2) in the
    background, its output appended to `log` (default `<workdir>.log`)."""
    args = cli_args("train", f"--config={experiment or IMAGE + ':tiny_v2'}", f"--workdir={workdir}",
                    *[f"--config.{k}={v}" for k, v in overrides.items()])
    log = open(log or os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"),
               "ab")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def checkpoint_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def wait_for(cond, proc, what, timeout=240):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def finish(proc, timeout=240):
    return proc.wait(timeout=timeout)


def load_state(workdir, step):
    """The saved TrainState as a flat {path: numpy array}, read onto this
    process's device whatever device count saved it."""
    tree, _ = checkpoint.restore_params(workdir, step,
                                        subtrees=("step", "params", "ema_params", "opt_state"))
    return {"/" + checkpoint.path_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}
