r"""The torch `DataLoader` peer of `pipeline_bench.py`: the same files, the same
per-sample work, as a PyTorch user writes it; one JSON line out.

    python benchmarks/pipeline_peer_torch.py --kind image --path DIR --batch 32 --workers 2

No d2v_jax import, so it runs in another interpreter (torchvision does not
import beside the main venv's torch; `pipeline_bench.py --torch_python`):

- image: `torchvision.datasets.ImageFolder` (PIL decode, convert RGB) ->
  `RandomResizedCrop(size, scale, bicubic)` -> `RandomHorizontalFlip` ->
  `PILToTensor` (uint8 [C, H, W], as ours ships uint8);
- audio: `soundfile.read` (float32) -> random crop to `--max_sample_size` ->
  zero mean, unit variance -> a collate that pads to the longest row with a
  padding mask;
- text: a loop of `tokenizers.Tokenizer.encode` over the documents (the
  tokenizer file ours trained), cropped / padded to `--max_len`; the samples
  counted are tokens (ours packs documents into full rows).

Each worker process is single-threaded (`torch.set_num_threads(1)`, the
DataLoader's default in workers); the main process too.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline_common import emit, time_batches


class AudioFiles:
    def __init__(self, root: str, max_sample_size: int, seed: int = 0):
        self.files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".wav"))
        self.max = max_sample_size
        self.seed = seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import soundfile as sf
        import torch

        x, _ = sf.read(self.files[i], dtype="float32")
        if len(x) > self.max:
            start = np.random.default_rng((self.seed, i)).integers(0, len(x) - self.max + 1)
            x = x[start:start + self.max]
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
        return torch.from_numpy(x)


def pad_collate(rows):
    import torch

    n = max(len(r) for r in rows)
    out = torch.zeros(len(rows), n)
    pad = torch.ones(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        pad[i, :len(r)] = False
    return out, pad


class TextDocs:
    def __init__(self, text_file: str, tokenizer_file: str, max_len: int):
        import json

        with open(text_file, encoding="utf-8") as f:
            self.docs = json.load(f)  # a list of documents
        self.tokenizer_file = tokenizer_file
        self.max_len = max_len
        self.tok = None

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        import torch
        from tokenizers import Tokenizer

        if self.tok is None:  # loaded in each worker
            self.tok = Tokenizer.from_file(self.tokenizer_file)
        ids = self.tok.encode(self.docs[i]).ids[:self.max_len]
        row = torch.full((self.max_len,), 1, dtype=torch.int32)
        row[:len(ids)] = torch.tensor(ids, dtype=torch.int32)
        return row, len(ids)


def endless(loader):
    while True:
        yield from loader


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=["image", "audio", "text"], required=True)
    p.add_argument("--path", required=True, help="image folder / wav folder / JSON list of documents")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--crop_scale", type=float, nargs=2, default=(0.2, 1.0))
    p.add_argument("--max_sample_size", type=int, default=320_000)
    p.add_argument("--tokenizer", default="", help="tokenizers JSON file (text)")
    p.add_argument("--max_len", type=int, default=512)
    args = p.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    common = {"batch_size": args.batch, "shuffle": True, "num_workers": args.workers,
              "drop_last": True, "persistent_workers": args.workers > 0}
    if args.kind == "image":
        import torchvision
        from torchvision import transforms as T

        tf = T.Compose([T.RandomResizedCrop(args.size, scale=tuple(args.crop_scale),
                                            interpolation=T.InterpolationMode.BICUBIC),
                        T.RandomHorizontalFlip(), T.PILToTensor()])
        loader = DataLoader(torchvision.datasets.ImageFolder(args.path, transform=tf), **common)

        def count(batch):
            images, _ = batch
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, args.size, args.size)
            return images.shape[0]
        extra = {"torchvision": torchvision.__version__}
    elif args.kind == "audio":
        loader = DataLoader(AudioFiles(args.path, args.max_sample_size), collate_fn=pad_collate,
                            **common)

        def count(batch):
            return batch[0].shape[0]
        extra = {}
    else:
        loader = DataLoader(TextDocs(args.path, args.tokenizer, args.max_len), **common)

        def count(batch):
            return int(batch[1].sum())  # tokens
        extra = {"unit": "tokens"}
    r = time_batches(endless(loader), args.warmup, args.batches, count)
    emit({"bench": "torch_dataloader", "kind": args.kind, "workers": args.workers,
          "batch": args.batch, **r, "torch": torch.__version__, **extra})


if __name__ == "__main__":
    main()
