"""The audio modality's speech recognition hooks for CTC fine-tuning
(`config.task='ctc'`, d2v_jax/finetune): the transcribed data of a task and the
encoder pass with wav2vec 2.0's fine-tuning masks.

Reached through the registry (`Modality.asr`, a module path), so the generic
fine-tune code names no modality.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from d2v_jax.data import bad_samples
from d2v_jax.data import letters
from d2v_jax.errors import ConfigError, DataNotFoundError
from d2v_jax.modalities.audio import data as audio
from d2v_jax.modalities.audio import sentence_set, transcripts
from d2v_jax.modalities.audio.model import zero_padded

SOURCES = ("asr_espeak", "asr_manifest", "asr_folder")


def _paths(config: ml_collections.ConfigDict) -> tuple[str, dict[str, str]]:
    """(training manifest or folder, {evaluation set name: manifest or folder}).

    asr_manifest reads fairseq's fine-tuning layout: `data.path` a folder with
    `<data.train_subset>.tsv` and one `<name>.tsv` per `data.eval_subsets`
    (x.ltr / x.wrd beside each, dict.ltr.txt in the folder), or `data.path` /
    `data.test_path` naming one training and one test manifest."""
    d = config.data
    if d.source == "asr_espeak":
        root = d.path or sentence_set.ensure_sentence_set(d.cache_dir)
        return os.path.join(root, "train.tsv"), {"test": os.path.join(root, "test.tsv")}
    if d.source not in SOURCES:
        raise ConfigError(f"config.data.source={d.source!r}; CTC fine-tuning reads one of {SOURCES}")
    subsets = tuple(d.get("eval_subsets", ()) or ())
    if d.source == "asr_manifest" and d.path and os.path.isdir(d.path) and subsets:
        train = os.path.join(d.path, d.get("train_subset", "train") + ".tsv")
        evals = {name: os.path.join(d.path, name + ".tsv") for name in subsets}
        for field, path in [("train_subset", train)] + [("eval_subsets", p) for p in evals.values()]:
            if not os.path.isfile(path):
                have = sorted(f[:-4] for f in os.listdir(d.path) if f.endswith(".tsv"))
                raise DataNotFoundError(f"{path}: no such manifest (config.data.{field}); the "
                                        f"manifests in {d.path} are {have or 'none'}")
        return train, evals
    if not d.path or not d.test_path:
        kind = "a fairseq manifest (x.tsv with x.ltr / x.wrd beside it)" \
            if d.source == "asr_manifest" else "a folder of audio files with a .txt transcript each"
        extra = (" (or data.path = a folder of manifests with data.eval_subsets)"
                 if d.source == "asr_manifest" else "")
        raise ConfigError(f"config.data.path={d.path!r} / test_path={d.test_path!r}: "
                          f"data.source={d.source!r} needs both, each {kind}{extra}")
    return d.path, {"test": d.test_path}


def asr_data(config: ml_collections.ConfigDict, backbone_config: ml_collections.ConfigDict
             ) -> transcripts.ASRData:
    """Train utterances, the evaluation sets, the used training subset
    (`data.train_minutes` of audio, or `data.label_fraction` of the
    utterances, drawn with `seed`) and the length buckets."""
    d, b = config.data, backbone_config.data
    train_path, eval_paths = _paths(config)
    vocab = letters.vocab_for(os.path.dirname(train_path) if train_path.endswith(".tsv") else None)
    rate = int(b.sample_rate)
    train_set = transcripts.read_transcripts(train_path, rate, vocab)
    eval_sets = {name: transcripts.read_transcripts(p, rate, vocab)
                 for name, p in eval_paths.items()}
    train = transcripts.subset_by_minutes(train_set.manifest.lengths, d.train_minutes,
                                          d.label_fraction, config.seed, rate)
    buckets = tuple(d.buckets)
    if not buckets:  # from every utterance, so that subsets and seeds share the shapes
        lengths = np.concatenate([train_set.manifest.lengths]
                                 + [s.manifest.lengths for s in eval_sets.values()])
        buckets = transcripts.auto_buckets(lengths, d.num_buckets, d.bucket_multiple)
    data = transcripts.ASRData(train_set, eval_sets, vocab, train, sample_rate=rate,
                               normalize=bool(b.normalize), buckets=buckets,
                               max_tokens=int(d.get("max_tokens", 0) or 0))
    data.on_bad_sample = bad_samples.settings(config)[0]
    return data


def held_out_of_pretraining(config: ml_collections.ConfigDict,
                            backbone_config: ml_collections.ConfigDict,
                            data: transcripts.ASRData) -> bool | None:
    """Whether no clip of any evaluation set was in the pretraining audio: compared file by file
    for a manifest / folder pretraining run; the espeak_words set shares no clip
    with the sentence set. None when it cannot be told."""
    b = backbone_config.data
    test = {os.path.realpath(os.path.join(s.manifest.root, p))
            for s in data.eval_sets.values() for p in s.manifest.paths}
    if b.source == "espeak_words":
        return config.data.source == "asr_espeak"
    try:
        if b.source == "manifest":
            path = b.path if b.path.endswith(".tsv") else os.path.join(b.path, f"{b.split}.tsv")
            seen = audio.read_manifest(path)
        elif b.source == "audio_folder":
            seen = audio.scan_folder(b.path, int(b.sample_rate))
        else:
            return None
    except (OSError, ValueError):
        return None
    return not any(os.path.realpath(os.path.join(seen.root, p)) in test for p in seen.paths)


def mask_embedding(backbone) -> jax.Array | None:
    """The pretrained 1.0 model's learned mask embedding (None for 2.0, which
    pretrains without one)."""
    return backbone.mask_emb() if backbone.version == "v1" else None


def encode(backbone, batch: dict[str, jax.Array], *, deterministic: bool,
           apply_mask: Callable[[jax.Array, jax.Array | None], jax.Array]
           ) -> tuple[jax.Array, jax.Array | None]:
    """(hidden states [B, T, D], frame padding [B, T] or None) of the full
    input, with `apply_mask(features, padding)` between the conv front-end and
    the positional encoder (wav2vec 2.0 `apply_mask`: time and channel masks
    on the projected features), dropout and layer-drop unless `deterministic`."""
    x = backbone.frontend(batch["audio"])
    pad = backbone.frame_padding(batch, x.shape[1])
    x = apply_mask(zero_padded(x, pad, backbone.context.pos_conv_zero_pad), pad)
    ctx = backbone.context
    x = ctx.norm(x + ctx.positions(x, pad), deterministic)
    bias = ctx.bias(jnp.arange(x.shape[1])[None])
    h, _ = backbone.encoder(x, bias, pad, deterministic=deterministic)
    if pad is not None:
        h = jnp.where(pad[..., None], 0, h)
    return h, pad
