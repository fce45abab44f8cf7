r"""Turn a corpus into shards once; pretraining then streams them.

  python -m d2v_jax.prepare --config experiments/text.py:base_v2 --out /data/shards \
      --config.data.source=text --config.data.path='/data/raw/*.txt' \
      [--config.tokenizer.encoder_json=gpt2/encoder.json --config.tokenizer.vocab_bpe=gpt2/vocab.bpe \
       --config.tokenizer.dict=gpt2/dict.txt] [--workers 8] [--chunk_mb 32]
  python -m d2v_jax.train --config experiments/text.py:base_v2 --workdir runs/base \
      --config.data.source=fairseq --config.data.path=/data/shards

Inputs: the experiment's `data` section (the corpus: `data.source` text /
smiles / fasta files at `data.path`, or a packaged or labeled corpus, its
held-out rows left out; `data.doc_sep`, `data.on_invalid`, ...) and its
`tokenizer` section (a saved tokenizer at `tokenizer.path`, GPT-2's files for
`tokenizer.kind=gpt2`, or a kind trained on the corpus here).

Outputs, in `--out` (a new folder; fairseq's own format, docs/text.md):
  train.bin / train.idx, train1.bin / .idx, ...  MMIDIDX token records, one
                                                 shard per chunk of input
  tokenizer/                                     the tokenizer that wrote them
  dict.txt                                       (gpt2) the fairseq dictionary
  d2v_shards.json                                counts, tokenizer fingerprint

`--workers` processes tokenize chunks of `--chunk_mb` in parallel (default:
one per usable core), with a progress bar over the input bytes. Bad input
(not UTF-8, an invalid record under data.on_invalid=error, a tokenizer that
does not fit) prints one `error:` line naming the file and line, exit 2, and
nothing is written.

  python -m d2v_jax.prepare --tokenizer_for runs/converted --config experiments/text.py:base_v2 \
      --config.tokenizer.encoder_json=... --config.tokenizer.vocab_bpe=... --config.tokenizer.dict=...

saves the GPT-2 tokenizer into a converted fairseq text checkpoint's folder
(checked against its vocabulary) so that fine-tuning and --init_from find it.
"""

from __future__ import annotations

import importlib
import json
import sys

from absl import flags, logging
from ml_collections import config_flags

from d2v_jax import errors, modalities


def _define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Experiment file and arg whose data and tokenizer sections name the "
        "corpus and the tokenizer, e.g. experiments/text.py:base_v2.", flag_values=fv,
        lock_config=True, sys_argv=argv)
    flags.DEFINE_string("out", None, "A new folder for the shards (fairseq's format).",
                        flag_values=fv)
    flags.DEFINE_integer("workers", 0, "Worker processes (0 = one per usable core).",
                         flag_values=fv)
    flags.DEFINE_float("chunk_mb", 32.0, "Input megabytes per shard (a worker's task).",
                       flag_values=fv)
    flags.DEFINE_string("tokenizer_for", None, "A converted fairseq text checkpoint's folder: "
                        "save the config's GPT-2 tokenizer there instead of writing shards.",
                        flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show the progress bar.", flag_values=fv)
    flags.mark_flags_as_required(["config"], flag_values=fv)


def _run(fv: flags.FlagValues) -> int:
    logging.set_verbosity("warning")
    config = fv.config
    entry = modalities.get(config)
    if entry.shards is None:
        raise errors.ConfigError(f"config.modality={config.modality!r} has no shard writer: "
                                 "its pretraining reads its data as it is")
    writer = importlib.import_module(entry.shards)
    if fv.tokenizer_for:
        print(f"prepare: tokenizer saved to {writer.attach_tokenizer(config, fv.tokenizer_for)}")
        return 0
    if not fv.out:
        raise errors.UserError("--out is required (a new folder for the shards)")
    if fv.workers < 0 or fv.chunk_mb <= 0:
        raise errors.UserError(f"--workers={fv.workers} must be >= 0 and --chunk_mb="
                               f"{fv.chunk_mb} > 0")
    meta = writer.prepare_shards(config, fv.out, workers=fv.workers, chunk_mb=fv.chunk_mb,
                                 progress=fv.progress)
    train = meta["splits"]["train"]
    rate = train["tokens"] / max(meta["seconds"], 1e-9)
    print(f"prepare: {train['documents']:,} documents, {train['tokens']:,} tokens in "
          f"{train['files']} shard files ({meta['dtype']}), {meta['seconds']:.1f} s "
          f"({rate / meta['workers']:,.0f} tokens/s per worker, {meta['workers']} workers); "
          f"tokenizer {meta['tokenizer']['kind']} ({meta['tokenizer']['vocab_size']} ids)")
    print(f"train with: --config.data.source=fairseq --config.data.path={fv.out}")
    logging.info("%s", json.dumps(meta))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m d2v_jax.prepare` with `argv`; returns the exit code (0, or 2
    for a user error printed as one `error:` line)."""
    return errors.absl_main(_define_flags, _run, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
