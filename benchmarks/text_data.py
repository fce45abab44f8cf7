r"""Text data at scale: the measurements of docs/text.md ("Measured: data at scale").

    python benchmarks/text_data.py corpus --tokens 1_000_000_000 --out /tmp/tok2g
    python benchmarks/text_data.py first_batch --data /tmp/tok2g [--arg tiny_v2]
    python benchmarks/text_data.py loader --data /tmp/tok2g --arg base_v2 --batches 20
    python benchmarks/text_data.py raw --out /tmp/raw.txt --megabytes 100
    python benchmarks/text_data.py gpt2 --text /tmp/raw.txt --out /tmp/gpt2
    python benchmarks/text_data.py tokenize --text /tmp/raw.txt --gpt2 /tmp/gpt2 --prepare

- `corpus`: a synthetic fairseq data directory (what fairseq-preprocess
  writes for RoBERTa's layout): `dict.txt` of 50,260 GPT-2 ids (RoBERTa's
  dictionary size) and `train.bin/.idx`, `train1...` of uint16 records, each a
  line of 8-80 tokens ending with `</s>`, one empty record (a document end)
  per 25 lines. Never committed: it is generated.
- `first_batch`: what `d2v_jax.train` does before its first step (config,
  tokenizer, pipeline, one batch), timed from the process's start, with its
  resident memory (RSS) then.
- `loader`: batches/s of the pipeline (rows padded, masks drawn) in this one
  process, and the CPU seconds it used: tokens per CPU-second = the rate of
  one busy core. `--arg base_v2` also prints what that recipe's train step
  consumes on one H100 at 40% MFU (`flops.step_flops`, 989 TFLOP/s bf16 dense
  peak) and the cores it needs.
- `raw`, `gpt2`: a raw text file of English prose found on this machine, and
  a GPT-2-sized (50,257) byte-level BPE learned on it in GPT-2's file format
  with a fairseq dict.txt (RoBERTa's own files cannot be downloaded here).
- `tokenize`: the rate of the tokenizer library alone (Hugging Face
  `tokenizers` encode_batch_fast, its own threads over the usable cores) on a
  text file held in memory, and with `--prepare` the end-to-end rate of
  `python -m d2v_jax.prepare` (one worker process per core) on the same file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

H100_BF16 = 989e12  # dense bf16 FLOP/s (NVIDIA H100 SXM datasheet)
MFU = 0.40
DICT_SIZE = 50260  # RoBERTa's dict.txt lines (vocab 50,265 with the specials and <mask>)


def make_corpus(out: str, tokens: int, file_tokens: int = 256 << 20, seed: int = 0) -> None:
    from d2v_jax.data.fairseq_bin import IndexedTokensWriter, write_dictionary

    os.makedirs(out, exist_ok=True)
    write_dictionary(os.path.join(out, "dict.txt"), [str(i) for i in range(DICT_SIZE)],
                     list(range(DICT_SIZE, 0, -1)))
    rng = np.random.default_rng(seed)
    written, k = 0, 0
    while written < tokens:
        w = IndexedTokensWriter(os.path.join(out, "train" + (str(k) if k else "")), np.uint16)
        target = min(file_tokens, tokens - written)
        done = 0
        while done < target:
            n = int(min(200_000, max(1000, (target - done) // 44)))  # ~44 tokens a record
            sizes = rng.integers(8, 81, n)
            sizes[rng.random(n) < 1 / 25] = 1  # empty lines: document ends
            ids = (rng.zipf(1.2, int(sizes.sum())) % DICT_SIZE + 4).astype(np.uint16)
            ends = np.cumsum(sizes) - 1
            ids[ends] = 2  # every record ends with </s>
            w.add_concatenated(ids, sizes)
            done += int(sizes.sum())
        w.finalize()
        written += done
        k += 1
        print(f"{out}: {k} files, {written:,} tokens", flush=True)


def _config(arg: str, data: str, extra: dict | None = None):
    from d2v_jax.config import load_config

    return load_config(f"{ROOT}/experiments/text.py:{arg}", {
        "data.source": "fairseq", "data.path": data, "tokenizer.kind": "gpt2",
        "probe.task": "", "probe.every": 0, "data.num_workers": 0, **(extra or {})})


def first_batch(args) -> None:
    start = psutil.Process().create_time()
    from d2v_jax import modalities
    from d2v_jax.config import validate

    config = _config(args.arg, args.data, {"data.packing": args.packing} if args.packing else None)
    validate(config)
    entry = modalities.get(config)
    config = entry.prepare(config, args.workdir)
    it = iter(entry.pretrain_dataset(config))
    batch = next(it)
    took = time.time() - start
    rss = psutil.Process().memory_info().rss / 2**20
    tokens = sum(os.path.getsize(os.path.join(args.data, f)) for f in os.listdir(args.data)
                 if f.endswith(".bin")) // 2
    print(f"first batch {tuple(batch['tokens'].shape)} {took:.1f} s after the process started; "
          f"RSS {rss:.0f} MiB; corpus {tokens:,} tokens ({config.data.packing})")


def loader(args) -> None:
    from d2v_jax import modalities
    from d2v_jax.config import validate

    config = _config(args.arg, args.data, {"data.packing": args.packing} if args.packing else None)
    validate(config)
    entry = modalities.get(config)
    config = entry.prepare(config, args.workdir)
    it = iter(entry.pretrain_dataset(config, num_threads=1, prefetch_buffer_size=1))
    for _ in range(2):
        next(it)
    proc = psutil.Process()
    cpu0, t0, tokens = sum(proc.cpu_times()[:2]), time.perf_counter(), 0
    for _ in range(args.batches):
        batch = next(it)
        tokens += int((~batch["padding_mask"]).sum())
    wall, cpu = time.perf_counter() - t0, sum(proc.cpu_times()[:2]) - cpu0
    print(f"{args.arg} loader: {tokens / wall:,.0f} tokens/s wall, {cpu / wall:.2f} cores busy, "
          f"{tokens / cpu:,.0f} tokens per CPU-second (batch {tuple(batch['tokens'].shape)}, "
          f"masks {tuple(batch['mask'].shape)})")
    if args.arg.startswith("base"):
        from d2v_jax import flops as flop_count

        d = config.data  # rows of max_len per step (a token budget: the longest bucket's)
        rows = int(d.max_tokens) // int(d.max_len) if int(d.max_tokens) else int(d.batch_size)
        flops = flop_count.step_flops(config, rows).model  # the model FLOPs MFU counts
        steps = MFU * H100_BF16 / flops
        need = steps * rows * int(d.max_len)
        print(f"{args.arg} on one H100 at {MFU:.0%} MFU: {flops / 1e12:.2f} TFLOP per step, "
              f"{steps:.2f} steps/s, {need:,.0f} tokens/s = {need / (tokens / cpu):.2f} cores of "
              "this loader")


def tokenize(args) -> None:
    """Wall and CPU rates of the library alone and of `prepare`, on the same
    text: on a shared machine the CPU-seconds rate (tokens per second of one
    busy core) is the stable one."""
    from d2v_jax.modalities.text.gpt2 import Gpt2Tokenizer

    g = args.gpt2
    tok = Gpt2Tokenizer.from_files(f"{g}/encoder.json", f"{g}/vocab.bpe", f"{g}/dict.txt")
    with open(args.text, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    cores = len(os.sched_getaffinity(0))
    proc = psutil.Process()
    cpu0, t0, n = sum(proc.cpu_times()[:2]), time.perf_counter(), 0
    for i in range(0, len(lines), 10_000):  # its fastest call, its own threads
        n += sum(len(e.ids) for e in tok.hf.encode_batch_fast(lines[i:i + 10_000],
                                                              add_special_tokens=False))
    wall, cpu = time.perf_counter() - t0, sum(proc.cpu_times()[:2]) - cpu0
    alone = n / cpu
    print(f"tokenizers alone: {n:,} tokens in {wall:.1f} s on {cores} cores ({n / wall:,.0f} "
          f"tokens/s wall, {cpu:.1f} CPU-s): {alone:,.0f} tokens per CPU-second")
    if not args.prepare:
        return
    out = args.text + ".shards"
    subprocess.run(["rm", "-rf", out], check=True)
    cmd = [sys.executable, "-m", "d2v_jax.prepare", f"--config={ROOT}/experiments/text.py:base_v2",
           "--config.data.source=text", f"--config.data.path={args.text}",
           f"--config.tokenizer.encoder_json={g}/encoder.json",
           f"--config.tokenizer.vocab_bpe={g}/vocab.bpe", f"--config.tokenizer.dict={g}/dict.txt",
           f"--out={out}", f"--workers={cores}", "--noprogress"]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    tree = psutil.Process(child.pid)
    seen: dict[int, float] = {}  # CPU seconds of every process of the tree (its workers too)
    while child.poll() is None:
        for p in [tree] + tree.children(recursive=True):
            try:
                seen[p.pid] = max(seen.get(p.pid, 0.0), sum(p.cpu_times()[:2]))
            except psutil.Error:
                pass
        time.sleep(0.2)
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - t0
    cpu = sum(seen.values())
    print(stdout.strip() or stderr[-2000:])
    import json
    meta = json.load(open(os.path.join(out, "d2v_shards.json")))["splits"]["train"]
    text_tokens = meta["tokens"] - meta["records"]  # without each record's </s>
    print(f"prepare, process start to exit (workers included): {text_tokens:,} text tokens in "
          f"{wall:.1f} s ({text_tokens / wall:,.0f} tokens/s wall = {text_tokens / wall / cores:,.0f} "
          f"per core), {cpu:.1f} CPU-s: {text_tokens / cpu:,.0f} tokens per CPU-second = "
          f"{text_tokens / cpu / alone:.2f} x the library alone")


def raw_text(out: str, megabytes: int, seed: int = 0) -> None:
    """English-ish prose found on this machine (the Python manual's paragraphs,
    the .md / .rst / .txt files of the installed packages and /usr/share/doc),
    one paragraph line per line, a blank line between files, its lines
    reshuffled per copy until `megabytes`."""
    import glob

    from d2v_jax.modalities.text.corpus import python_docs_corpus

    roots = [os.path.dirname(np.__file__) + "/..", "/usr/share/doc"]
    files = sorted(f for r in roots for ext in ("md", "rst", "txt")
                   for f in glob.glob(f"{r}/**/*.{ext}", recursive=True))
    docs = [p.replace("\n", " ") for p in python_docs_corpus().texts]
    for f in files:
        try:
            text = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        docs += [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    size = 0
    with open(out, "w", encoding="utf-8") as f:
        while size < megabytes << 20:
            for i in rng.permutation(len(docs)):
                line = docs[i] + ("\n\n" if rng.random() < 0.05 else "\n")
                f.write(line)
                size += len(line.encode())
    print(f"{out}: {size / 2**20:.0f} MB from {len(files)} files")


def gpt2_files(text: str, out: str, vocab_size: int = 50257) -> None:
    """A byte-level BPE of GPT-2's size in GPT-2's format (encoder.json, vocab.bpe),
    learned on `text`, and the fairseq dict.txt of its ids' counts there."""
    import collections
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    os.makedirs(out, exist_ok=True)
    with open(text, encoding="utf-8") as f:
        lines = [line.strip() for line in f][:400_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(out)
    os.replace(f"{out}/vocab.json", f"{out}/encoder.json")
    os.replace(f"{out}/merges.txt", f"{out}/vocab.bpe")
    counts = collections.Counter(i for e in tok.encode_batch(lines) for i in e.ids)
    n = len(json.load(open(f"{out}/encoder.json")))
    ranked = sorted(range(n), key=lambda i: (-counts[i], i))
    with open(f"{out}/dict.txt", "w") as f:
        f.writelines(f"{i} {counts[i]}\n" for i in ranked)
    print(f"{out}: {n} BPE tokens, dict.txt of {n} lines")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("--tokens", type=int, required=True)
    c.add_argument("--out", required=True)
    for name in ("first_batch", "loader"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True)
        s.add_argument("--arg", default="tiny_v2")
        s.add_argument("--packing", default="")
        s.add_argument("--workdir", default="/tmp/text_data_bench_run")
        s.add_argument("--batches", type=int, default=20)
    r = sub.add_parser("raw")
    r.add_argument("--out", required=True)
    r.add_argument("--megabytes", type=int, default=100)
    g = sub.add_parser("gpt2")
    g.add_argument("--text", required=True)
    g.add_argument("--out", required=True)
    t = sub.add_parser("tokenize")
    t.add_argument("--text", required=True)
    t.add_argument("--gpt2", required=True)
    t.add_argument("--prepare", action="store_true")
    args = p.parse_args()
    if args.cmd == "corpus":
        make_corpus(args.out, args.tokens)
    elif args.cmd == "first_batch":
        first_batch(args)
    elif args.cmd == "loader":
        loader(args)
    elif args.cmd == "raw":
        raw_text(args.out, args.megabytes)
    elif args.cmd == "gpt2":
        gpt2_files(args.text, args.out)
    else:
        tokenize(args)


if __name__ == "__main__":
    main()
