r"""Input pipeline throughput: our grain pipelines vs a torch DataLoader peer on
the same files, decoded and augmented samples/s and per core; a table and JSON.

    python benchmarks/pipeline_bench.py --torch_python /work/venv-tv/bin/python \
        --workers 0,2 --json /tmp/pipeline_bench.json

Kinds, each on synthetic files made once under `--data_dir`:
- image: `--images` JPEGs of 500 x 375 (ImageNet's typical size; smooth
  gradients, blobs and noise, quality 85) in an ImageFolder tree; ours is the
  2.0 image recipe (`experiments/image.py:base_v2` on `image_folder`: decode,
  RandomResizedCrop 224 scale (0.2, 1) bicubic, flip, uint8 out, plus the 16
  clones' inverse block masks), the peer torchvision's ImageFolder +
  RandomResizedCrop(224, bicubic) + flip + PILToTensor (uint8, no masks);
- audio: `--clips` 16 kHz 16-bit WAVs of 2-10 s; ours `experiments/audio.py:
  base_v2` on `audio_folder` (read, crop, normalize, pad to the bucket,
  masks), fixed batches (`data.max_tokens=0`); the peer soundfile + crop +
  normalize + pad collate;
- text: the packaged stdlib docstrings (`data.source=python_docs`); ours
  tokenizes the corpus once when the pipeline is built (`setup`, reported
  apart) and then pads rows and draws the 1.0/2.0 masks per row; the peer
  tokenizes every document in the loader with the same tokenizer file. The
  unit is tokens (ours packs documents into full rows, the peer has one row
  per document).

Every variant runs in its own process (ours in this interpreter, the peer in
`--torch_python`, which needs torch, torchvision, soundfile and tokenizers),
alternating ours / peer, with the same number of worker processes (`--workers`;
0 = the main process alone; each worker single-threaded: grain
`num_threads=1`, torch `set_num_threads(1)`). Measured per variant after
`--warmup` batches: samples/s (wall), the CPU seconds of the process tree
(main + workers, from /proc), and samples per CPU-second = the rate of one
fully busy core. The headline divides the GPU's consumption
(`--gpu_images_per_s`, ViT-B data2vec 2.0 at 45% MFU on an H100: ~1,100 images/s)
by our image rate per core.

`--run ours|profile` are the child modes (internal).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from pipeline_common import emit, synth_jpegs, synth_wavs, time_batches, tree_cpu_seconds

IMAGE_CONFIG = os.path.join(ROOT, "experiments", "image.py") + ":base_v2"
AUDIO_CONFIG = os.path.join(ROOT, "experiments", "audio.py") + ":base_v2"
TEXT_CONFIG = os.path.join(ROOT, "experiments", "text.py") + ":base_v2"
BATCH = {"image": 32, "audio": 8, "text": 64}
# ~1-10 s of CPU each on the 2-core VM: CPU time comes in 10 ms ticks (audio at 40
# batches was ~0.25 s, +-10% between identical runs).
BATCHES = {"image": 12, "audio": 150, "text": 60}
# 413 GFLOP per image (d2v_jax.flops, base_v2 x 16 clones) at 45% of 989 TFLOP/s.
GPU_IMAGES_PER_S = 1100.0


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ ours (child)


def ours_config(kind: str, path: str, batch: int, workers: int, data_dir: str):
    from d2v_jax.config import load_config

    if kind == "image":
        return load_config(IMAGE_CONFIG, {"data.source": "image_folder", "data.path": path,
                                          "data.batch_size": batch, "data.num_workers": workers,
                                          "data.holdout_fraction": 0.0})
    if kind == "audio":
        return load_config(AUDIO_CONFIG, {"data.source": "audio_folder", "data.path": path,
                                          "data.batch_size": batch, "data.max_tokens": 0,
                                          "data.num_workers": workers})
    from d2v_jax.modalities.text import data as text_data

    config = load_config(TEXT_CONFIG, {"data.source": "python_docs", "data.batch_size": batch,
                                       "data.num_workers": workers,
                                       "tokenizer.vocab_size": 8000})
    # Trained once (a few seconds) and reused, by the peer too.
    return text_data.prepare(config, os.path.join(data_dir, "text"))


def predraw_masks(kind: str) -> None:
    """The peer draws no masks; for a like-for-like row the mask functions
    return a mask drawn once per shape (everything else runs as in training).
    Audio: once per bucket (frame count), not per (bucket, clip length): keyed
    by clip length, every clip's first batches (a third of the timed window
    with 120 clips) still drew masks. Patched at module level in this process
    (so used with workers=0 only)."""
    import functools

    if kind == "image":
        from d2v_jax.modalities.image import masking as mod
        name, key = "image_masks", lambda rng, grid, cfg: tuple(grid)
    elif kind == "audio":
        from d2v_jax.modalities.audio import masking as mod
        name, key = "sequence_masks", lambda rng, frames, valid, cfg: frames
    else:
        from d2v_jax.modalities.text import masking as mod
        name, key = "text_masks", None
    real = getattr(mod, name)
    if key is None:  # text: a dict of arrays that depends on the row; not cached
        return
    cache: dict = {}

    @functools.wraps(real)
    def cached(*a):
        k = key(*a)
        if k not in cache:
            cache[k] = real(*a)
        return cache[k].copy()

    setattr(mod, name, cached)


def run_ours(args) -> dict:
    import numpy as np

    from d2v_jax import modalities

    if args.predrawn_masks:
        predraw_masks(args.kind)
    config = ours_config(args.kind, args.path, args.batch, args.workers, args.data_dir)
    cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
    ds = modalities.get(config).pretrain_dataset(config, num_threads=1)
    setup = {"setup_s": time.perf_counter() - t0, "setup_cpu_s": tree_cpu_seconds() - cpu0}
    it = iter(ds)
    if args.kind == "image":
        def count(batch):
            assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (224, 224, 3)
            return batch["image"].shape[0]
    elif args.kind == "audio":
        def count(batch):
            return batch["audio"].shape[0]
    else:
        def count(batch):
            return int((~batch["padding_mask"]).sum())  # tokens
    r = time_batches(it, args.warmup, args.batches, count)
    if hasattr(it, "close"):
        it.close()
    return {"bench": "d2v_jax_grain" + ("_predrawn_masks" if args.predrawn_masks else ""),
            "kind": args.kind, "workers": args.workers,
            "batch": args.batch, **r, **setup}


def run_profile(args) -> dict:
    """Per-image CPU milliseconds of each step of our image transform, one thread."""
    import numpy as np
    from PIL import Image

    from d2v_jax.data.rng import AUG_STREAM, MASK_STREAM, example_rng
    from d2v_jax.modalities.image import masking
    from d2v_jax.modalities.image import transforms as T
    from d2v_jax.modalities.image.sources import make_source

    config = ours_config("image", args.path, args.batch, 0, args.data_dir)
    src = make_source(config, as_pil=True)  # as the pretraining pipeline reads
    t = T.PretrainTransform(config)
    n = min(len(src), 100)
    files = src.files[:n]

    def per(fn):  # CPU time of this (single-threaded) process: robust to a loaded machine
        t0 = time.process_time()
        for i in range(n):
            fn(i)
        return 1e3 * (time.process_time() - t0) / n

    def read_bytes(i):
        with open(files[i], "rb") as f:
            f.read()

    def decode(i):  # torchvision's pil_loader, and our earlier source: a full-size array copy
        with Image.open(files[i]) as im:
            np.asarray(im.convert("RGB"))

    def decode_pil(i):  # ours: the decoded PIL image, no copy
        src[i]

    decoded = [src[i]["image"] for i in range(n)]

    def crop(i):
        rng = example_rng(0, 0, i, AUG_STREAM)
        T.maybe_flip(rng, T.random_resized_crop(rng, decoded[i], t.size, t.crop_scale, t.crop_ratio))

    def masks(i):
        masking.image_masks(example_rng(0, 0, i, MASK_STREAM), t.grid, t.masking_cfg)

    def whole(i):
        t(src[i], 0)

    return {"bench": "profile", "kind": "image", "images": n,
            "ms_per_image": {"read_file": per(read_bytes), "decode_convert_to_array": per(decode),
                             "decode_source_pil": per(decode_pil),
                             "crop_resize_flip": per(crop), "masks_16_clones": per(masks),
                             "whole_transform": per(whole)}}


# ------------------------------------------------------------------ orchestration


def child(cmd: list[str], timeout: float) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"pipeline_bench: {' '.join(cmd)} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def text_peer_inputs(data_dir: str, config_dir: str) -> tuple[str, str]:
    """The corpus as a JSON list (documents may hold blank lines) and the tokenizer file."""
    from d2v_jax.config import load_config
    from d2v_jax.modalities.text import data as text_data

    config = load_config(TEXT_CONFIG, {"data.source": "python_docs"})
    docs = os.path.join(data_dir, "python_docs.json")
    if not os.path.exists(docs):
        with open(docs, "w") as f:
            json.dump(list(text_data.read_corpus(config).texts), f)
    # text_data.prepare saves the tokenizer at <workdir>/tokenizer (SubwordTokenizer.save).
    return docs, os.path.join(config_dir, "tokenizer", "tokenizer.json")


def table(rows: list[dict]) -> str:
    out = [("| kind | pipeline | workers | samples/s | CPU s / wall s | samples per CPU-second "
            "| samples/s per worker core | unit |"),
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cores = max(r["workers"], 1)
        out.append(f"| {r['kind']} | {r['bench']} | {r['workers']} | {r['samples_per_s']:.1f} | "
                   f"{r['cpu_s'] / r['wall_s']:.2f} | {r['samples_per_cpu_s']:.1f} | "
                   f"{r['samples_per_s'] / cores:.1f} | "
                   f"{'tokens' if r['kind'] == 'text' else r['kind'] + 's'} |")
    return "\n".join(out)


def summarize(rows: list[dict]) -> list[dict]:
    """Median over rounds of each (kind, pipeline, workers), in first-seen order."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["bench"], r["workers"]), []).append(r)
    out = []
    for (kind, bench, workers), rs in groups.items():
        med = {k: float(np.median([r[k] for r in rs]))
               for k in ("samples_per_s", "samples_per_cpu_s", "cpu_s", "wall_s")}
        out.append({"kind": kind, "bench": bench, "workers": workers, "rounds": len(rs), **med})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", choices=["all", "ours", "profile"], default="all")
    p.add_argument("--kind", choices=["image", "audio", "text"], default="image")
    p.add_argument("--kinds", default="image,audio,text")
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts to compare")
    p.add_argument("--torch_python", default=sys.executable,
                   help="interpreter with torch, torchvision, soundfile, tokenizers for the peer")
    p.add_argument("--data_dir", default="/tmp/d2v_pipeline_bench")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--clips", type=int, default=120)
    p.add_argument("--path", default="")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=None,
                   help="timed batches (default per kind: image 12, audio 150, text 60)")
    p.add_argument("--rounds", type=int, default=1, help="alternations of ours / peer")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--gpu_images_per_s", type=float, default=GPU_IMAGES_PER_S)
    p.add_argument("--predrawn_masks", action="store_true",
                   help="(child) masks drawn once per shape: the peer's work, no mask cost")
    p.add_argument("--no_predrawn_row", action="store_true",
                   help="skip the like-for-like row of ours with pre-drawn masks")
    p.add_argument("--json", default="", help="write all results here")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = BATCH[args.kind]
    if args.batches is None and args.run != "all":
        args.batches = BATCHES[args.kind]
    if args.run == "ours":
        args.workers = int(args.workers)
        return emit(run_ours(args))
    if args.run == "profile":
        return emit(run_profile(args))

    os.makedirs(args.data_dir, exist_ok=True)
    paths = {"image": synth_jpegs(os.path.join(args.data_dir, "images"), args.images),
             "audio": synth_wavs(os.path.join(args.data_dir, "wavs"), args.clips)}
    kinds = [k for k in args.kinds.split(",") if k]
    workers = [int(w) for w in args.workers.split(",")]
    load = os.getloadavg()
    results: list[dict] = []
    for kind in kinds:
        b = BATCH[kind] if args.batch is None or args.kind != kind else args.batch
        nb = args.batches or BATCHES[kind]
        common = ["--batch", str(b), "--warmup", str(args.warmup), "--batches", str(nb)]
        for w in workers:
            for r in range(args.rounds):
                ours_cmd = [sys.executable, os.path.abspath(__file__), "--run", "ours", "--kind",
                            kind, "--path", paths.get(kind, ""), "--workers", str(w),
                            "--data_dir", args.data_dir] + common
                out = child(ours_cmd, args.timeout)
                results.append({**out, "round": r})
                log(json.dumps(results[-1]))
                # In-process only: grain's workers are spawned (re-imported), unpatched.
                if kind != "text" and w == 0 and not args.no_predrawn_row:
                    out = child(ours_cmd + ["--predrawn_masks"], args.timeout)
                    results.append({**out, "round": r})
                    log(json.dumps(results[-1]))
                if kind == "text":
                    docs, tok = text_peer_inputs(args.data_dir, os.path.join(args.data_dir, "text"))
                    peer_args = ["--path", docs, "--tokenizer", tok, "--max_len", "512"]
                else:
                    peer_args = ["--path", paths[kind]]
                peer_cmd = [args.torch_python, os.path.join(HERE, "pipeline_peer_torch.py"),
                            "--kind", kind, "--workers", str(w)] + peer_args + common
                out = child(peer_cmd, args.timeout)
                results.append({**out, "round": r})
                log(json.dumps(results[-1]))
    profile = child([sys.executable, os.path.abspath(__file__), "--run", "profile", "--path",
                     paths["image"], "--data_dir", args.data_dir], args.timeout) \
        if "image" in kinds else None

    summary = {"machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                           "python": platform.python_version(), "loadavg_at_start": load,
                           "loadavg_at_end": os.getloadavg()},
               "results": results, "profile": profile}
    summary["median_over_rounds"] = medians = summarize(results)
    ours_img = [r["samples_per_cpu_s"] for r in results
                if r["kind"] == "image" and r["bench"] == "d2v_jax_grain"]
    if ours_img:
        import numpy as np

        # Our full image pipeline (masks included), median over every run of it.
        rate = float(np.median(ours_img))
        summary["headline"] = {
            "gpu_images_per_s": args.gpu_images_per_s,
            "ours_images_per_cpu_s": rate,
            "cores_per_gpu": args.gpu_images_per_s / rate,
        }
    print(table(results))
    if args.rounds > 1:
        print(f"median over {args.rounds} rounds:")
        print(table(medians))
    if profile:
        print("profile, ms per image (one thread):", json.dumps(profile["ms_per_image"]))
    if "headline" in summary:
        h = summary["headline"]
        print(f"headline: {h['gpu_images_per_s']:.0f} images/s per GPU / "
              f"{h['ours_images_per_cpu_s']:.1f} images per CPU-second = "
              f"{h['cores_per_gpu']:.1f} cores per GPU")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps({"pipeline_bench": summary.get("headline"), "load": load}))
    return summary


if __name__ == "__main__":
    main()
