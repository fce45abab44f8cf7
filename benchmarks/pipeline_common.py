"""What `pipeline_bench.py` (ours) and `pipeline_peer_torch.py` (the torch
DataLoader peer) share: the synthetic data sets and the timing of a batch
iterator. numpy, PIL and soundfile only (no d2v_jax, no torch), so the peer can
import it from another interpreter (a venv with torchvision).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

# ImageNet's typical JPEG: 500 x 375, quality ~75-90 (the mode of its sizes).
IMAGE_SIZE = (500, 375)
JPEG_QUALITY = 85
AUDIO_RATE = 16_000


def synth_jpegs(root: str, count: int, seed: int = 0, size=IMAGE_SIZE, classes: int = 2) -> str:
    """`count` RGB JPEGs in an ImageFolder tree root/c<k>/<i>.jpg, each smooth
    gradients + blobs + noise (natural-image-like entropy, so the decoder works
    as on photos: ~40-80 kB each at quality 85). Reused when already there."""
    from PIL import Image

    stamp = os.path.join(root, f".done-{count}-{size[0]}x{size[1]}-{seed}")
    if os.path.exists(stamp):
        return root
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            a, b, ph = rng.uniform(-1, 1, 3)
            img[..., c] = 128 + 60 * np.sin(a * xx / 40 + b * yy / 55 + 6 * ph)
        for _ in range(6):  # soft blobs: objects
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            img += blob[..., None] * rng.uniform(-90, 90, 3)
        img += rng.normal(0, 12, img.shape)  # texture / sensor noise
        d = os.path.join(root, f"c{i % classes}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(d, f"{i:05d}.jpg"), quality=JPEG_QUALITY)
    open(stamp, "w").close()
    return root


def synth_wavs(root: str, count: int, seed: int = 0, min_s: float = 2.0, max_s: float = 10.0,
               rate: int = AUDIO_RATE) -> str:
    """`count` mono 16-bit WAVs of min_s..max_s seconds (tones + noise) in root/."""
    import soundfile as sf

    stamp = os.path.join(root, f".done-{count}-{min_s}-{max_s}-{seed}")
    if os.path.exists(stamp):
        return root
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.uniform(min_s, max_s) * rate)
        t = np.arange(n) / rate
        x = sum(rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(80, 3000) * t)
                for _ in range(4)) + rng.normal(0, 0.05, n)
        sf.write(os.path.join(root, f"{i:05d}.wav"), np.clip(x, -1, 1).astype(np.float32), rate,
                 subtype="PCM_16")
    open(stamp, "w").close()
    return root


def _tree_pids(root: int) -> list[int]:
    """root and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds of this process and every live descendant
    (grain / DataLoader workers) — the cores a pipeline really uses."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _tree_pids(os.getpid() if root is None else root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def time_batches(it: Iterator, warmup: int, batches: int,
                 count: Callable[[Any], int]) -> dict[str, float]:
    """Pulls `warmup` batches (worker start-up, first decodes), then times
    `batches` more: samples, wall seconds, CPU seconds of the process tree."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    startup = time.perf_counter() - t0
    cpu0, t1 = tree_cpu_seconds(), time.perf_counter()
    samples = 0
    for _ in range(batches):
        samples += count(next(it))
    wall = time.perf_counter() - t1
    cpu = tree_cpu_seconds() - cpu0
    return {"samples": samples, "wall_s": wall, "cpu_s": cpu, "startup_s": startup,
            "samples_per_s": samples / wall,
            "samples_per_cpu_s": samples / cpu if cpu > 0 else float("nan")}


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)
