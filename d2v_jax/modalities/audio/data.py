"""Speech data: fairseq manifests or audio folders -> length-bucketed, masked batches.

A fairseq manifest (`train.tsv`) has the root folder on its first line, then one
`relative/path.wav<TAB>num_samples` per line. A plain folder of audio files works
too (`scan_folder` builds the manifest). Files are read with soundfile (WAV, FLAC,
OGG, ...), mixed down to mono and resampled to `data.sample_rate` (16 kHz) when
their rate differs.

Batching (static shapes, little padding): `data.buckets` is a sorted tuple of
waveform lengths ending with `data.max_sample_size`. With `data.pad=True` an
example (randomly cropped to at most `max_sample_size`) joins the smallest bucket
that holds it and is zero-padded to it, with a padding mask; with `pad=False` it
joins the largest bucket it covers and is randomly cropped to exactly that length
(fairseq's no-padding pretraining, no mask needed). Every batch comes from one
bucket, so jit compiles one step per bucket.

Batch rows: `data.batch_size` per batch, or with a token budget
`data.max_tokens > 0` (fairseq's `max_tokens`, summed over its GPUs) the rows of
a bucket of length S are `bucket_rows(max_tokens, S, batch_size)`, a multiple of
`batch_size` (fairseq's `required_batch_size_multiple`): short buckets get more
rows, and each bucket still has one static shape.

Masks (SPEC 5) are drawn here in numpy on the feature-frame grid: T =
`frame_count(bucket length)` frames, of which the first `frame_count(crop length)`
are real. All randomness is seeded by (seed, epoch, example index, stream) or
(seed, epoch, batch index), so a resumed or re-sharded run sees the same batches.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from d2v_jax.data import bad_samples
from d2v_jax.data.pipeline import (batch_number_dataset, bucket_rows, bucketed_epoch,
                                   check_holdout_fraction, held_out_indices, local_batch_size)
from d2v_jax.modalities.audio import masking, speech_set
from d2v_jax.data.rng import example_rng
from d2v_jax.modalities.audio.frames import config_frame_count
from d2v_jax.errors import BadSampleError, ConfigError, DataError

# Manifests and file reading live in files.py; their names stay importable from here.
from d2v_jax.modalities.audio.files import (  # noqa: F401
    AUDIO_EXTENSIONS, CROP_STREAM, MASK_STREAM, BATCH_STREAM, ON_ERROR, Manifest, read_manifest, resampled_length, scan_folder, write_manifest, check_files, EXACT_SEEK_FORMATS, load_audio, normalize, normalize_inplace, _info, _open_audio)
from d2v_jax.modalities.audio.labeled import AudioFolderSource



HOLDOUT_SOURCES = ("espeak_words", "audio_folder")


def labeled_folder(config: ml_collections.ConfigDict) -> str:
    """The class-folder root that a fine-tune on the pretraining set reads
    (modalities/audio/labeled.py): `<espeak set>/words`, or the audio_folder."""
    d = config.data
    if d.source == "espeak_words":
        return os.path.join(d.path or speech_set.ensure_espeak_set(d.cache_dir), "words")
    return d.path


def held_out_files(config: ml_collections.ConfigDict) -> list[str]:
    """Real paths of the files a fine-tune on this set tests on: its stratified
    test split (`data.holdout_fraction` / `holdout_seed` as the fine-tune's
    `data.test_fraction` / `split_seed`) of the class folders, read by the
    fine-tune's own `AudioFolderSource` (same files, same order, same labels)."""
    d = config.data
    if d.source not in HOLDOUT_SOURCES:
        raise ConfigError(
            f"config.data.holdout_fraction={d.holdout_fraction}: data.source={d.source!r} has no "
            f"labeled fine-tuning set to hold out; use data.source in {list(HOLDOUT_SOURCES)} "
            "(audio_folder: data.path = the fine-tune's <root>/<label>/ folders) or set "
            "data.holdout_fraction=0")
    root = labeled_folder(config)
    labeled = AudioFolderSource(root, int(d.sample_rate))
    held = held_out_indices(config, labeled.labels, stratify=True)
    return [os.path.realpath(os.path.join(root, labeled.manifest.paths[i])) for i in held]


def without_held_out(config: ml_collections.ConfigDict, manifest: Manifest) -> Manifest:
    """`manifest` less the files a fine-tune on the same labeled set tests on
    (`held_out_files`) when `data.holdout_fraction` > 0. espeak_words: its
    train.tsv also holds multi-word phrases, which stay."""
    fraction = check_holdout_fraction(config)
    if fraction == 0:
        return manifest
    held = set(held_out_files(config))
    keep = np.array([os.path.realpath(os.path.join(manifest.root, p)) not in held
                     for p in manifest.paths])
    logging.info("data.holdout_fraction=%s: %d of %d files of %s held out of pretraining",
                 fraction, int((~keep).sum()), len(manifest), manifest.source)
    if not keep.any():
        raise DataError(f"data.holdout_fraction={fraction} leaves no pretraining file in "
                        f"{manifest.source}")
    return manifest.subset(keep)


class AudioSource:
    """A manifest plus how to read it: `len`, `lengths`, `read(i) -> float32 [n]`."""

    def __init__(self, manifest: Manifest, sample_rate: int = 16_000) -> None:
        self.manifest = manifest
        self.sample_rate = int(sample_rate)
        self.lengths = manifest.lengths

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "AudioSource":
        d = config.data
        sr = int(d.sample_rate)
        if d.source == "espeak_words":
            root = d.path or speech_set.ensure_espeak_set(d.cache_dir)
            manifest = read_manifest(os.path.join(root, f"{d.split}.tsv"))
        elif d.source == "manifest":
            if not d.path:
                raise ConfigError("config.data.path is empty; data.source='manifest' needs a "
                                  "manifest file or a folder holding <data.split>.tsv")
            path = os.path.join(d.path, f"{d.split}.tsv") if os.path.isdir(d.path) else d.path
            manifest = read_manifest(path)
        elif d.source == "audio_folder":
            if not d.path:
                raise ConfigError("config.data.path is empty; data.source='audio_folder' needs "
                                  "a folder of audio files")
            manifest = scan_folder(d.path, sr)
        else:
            raise ConfigError(f"config.data.source={d.source!r} is unknown for audio; expected "
                              "'espeak_words', 'manifest' or 'audio_folder'")
        manifest = without_held_out(config, manifest)
        if d.check_files:
            manifest = check_files(manifest, sr, d.on_error)
        return cls(manifest, sr)

    def __len__(self) -> int:
        return len(self.manifest)

    def read(self, i: int) -> np.ndarray:
        audio = load_audio(self.manifest, i, self.sample_rate)
        if len(audio) < self.lengths[i]:
            raise BadSampleError(
                f"audio file {self.manifest.where(i)} has {len(audio)} samples at "
                f"{self.sample_rate} Hz but the manifest says {self.lengths[i]}",
                path=self.manifest.full_path(i))
        return audio

    def read_into(self, i: int, start: int, out: np.ndarray) -> None:
        """`out[:] = self.read(i)[start:start + len(out)]`, the same float32
        samples. A mono file at `sample_rate` in an exactly seekable format is
        decoded straight into `out`, only the window (no whole-file array to
        allocate, fault in and copy: ~1/3 of a clip's host time)."""
        with _open_audio(self.manifest, i) as f:
            fast = (f.channels == 1 and f.samplerate == self.sample_rate
                    and f.format in EXACT_SEEK_FORMATS)
            if fast and 0 < f.frames:
                path = self.manifest.full_path(i)
                if f.frames < self.lengths[i]:  # as `read`
                    raise BadSampleError(
                        f"audio file {self.manifest.where(i)} has {f.frames} samples at "
                        f"{self.sample_rate} Hz but the manifest says {self.lengths[i]}",
                        path=path)
                try:
                    f.seek(start)
                    got = len(f.read(len(out), dtype="float32", out=out))
                except Exception as e:
                    raise BadSampleError(f"cannot read audio file {self.manifest.where(i)}: {e}",
                                         path=path) from e
                if got != len(out):
                    raise BadSampleError(f"audio file {self.manifest.where(i)}: read {got} "
                                         f"samples from {start}, expected {len(out)}", path=path)
                return
        out[:] = self.read(i)[start:start + len(out)]

    def __repr__(self) -> str:
        return f"AudioSource({self.manifest.source!r}, len={len(self)})"


def check_buckets(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    d = config.data
    buckets = tuple(int(b) for b in d.buckets)
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[-1] != d.max_sample_size:
        raise ConfigError(f"config.data.buckets={tuple(d.buckets)} must be strictly increasing "
                          f"and end with data.max_sample_size={d.max_sample_size}")
    if config_frame_count(config, buckets[0]) < 1:
        raise ConfigError(f"config.data.buckets: {buckets[0]} samples give no feature frame "
                          "through the conv feature extractor")
    return buckets


class BatchPlan:
    """Which examples form global batch k, their crops, bucket and masks.

    Pure numpy from the manifest lengths (no audio is read), so every process
    computes the same plan and the same-count trim sees the whole global batch.
    """

    def __init__(self, config: ml_collections.ConfigDict, lengths: np.ndarray) -> None:
        d = config.data
        self.config = config
        self.seed = int(config.seed)
        self.batch_size = int(d.batch_size)
        self.buckets = check_buckets(config)
        self.pad = bool(d.pad)
        self.masking_cfg = config.masking.to_dict()
        # A file longer than max_sample_size is cropped to it at a random start:
        # keep its full length for drawing that start (clipping it first made the
        # window always the file's beginning).
        self.full_lengths = np.asarray(lengths, np.int64)
        lengths = np.minimum(self.full_lengths, d.max_sample_size)
        usable = lengths >= max(int(d.min_sample_size), 1)
        b = np.asarray(self.buckets)
        if self.pad:  # smallest bucket that holds the (cropped) example
            bucket = np.searchsorted(b, lengths, side="left")
        else:  # largest bucket the example covers; shorter ones cannot be used
            bucket = np.searchsorted(b, lengths, side="right") - 1
            usable &= bucket >= 0
        dropped = int((~usable).sum())
        if dropped:
            logging.info("audio: %d of %d examples are shorter than data.min_sample_size=%d%s "
                         "and are left out", dropped, len(lengths), d.min_sample_size,
                         "" if self.pad else f" or the smallest bucket {b[0]}")
        self.lengths, self.bucket = lengths, np.where(usable, bucket, -1)
        self.max_tokens = int(d.get("max_tokens", 0))
        if self.max_tokens > 0:  # token budget: rows per bucket (static per bucket)
            self.rows = tuple(bucket_rows(self.max_tokens, s, self.batch_size)
                              for s in self.buckets)
            if min(self.rows) < 1:
                raise ConfigError(
                    f"config.data.max_tokens={self.max_tokens} holds fewer than data.batch_size="
                    f"{self.batch_size} rows of the bucket length {self.buckets[-1]} samples; "
                    f"raise max_tokens to at least {self.batch_size * self.buckets[-1]}")
        else:
            self.rows = (self.batch_size,) * len(self.buckets)
        self._frame_counts: dict[int, int] = {}  # crop length -> frames (picklable)
        per_bucket = [int((self.bucket == i).sum()) // self.rows[i] for i in range(len(b))]
        self.num_batches = sum(per_bucket)  # per epoch
        if self.num_batches == 0:
            raise DataError(
                f"audio: no bucket of data.buckets={self.buckets} holds its batch of "
                f"{list(self.rows)} rows of usable examples (bucket sizes "
                f"{[int((self.bucket == i).sum()) for i in range(len(b))]})")

    @functools.lru_cache(maxsize=2)
    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches (index arrays), each from one bucket, in random order."""
        return bucketed_epoch(self.seed, epoch, BATCH_STREAM, self.bucket, self.rows)

    def _frames(self, num_samples: int) -> int:
        if num_samples not in self._frame_counts:
            self._frame_counts[num_samples] = config_frame_count(self.config, num_samples)
        return self._frame_counts[num_samples]

    def batch(self, k: int) -> dict[str, Any]:
        """Global batch k: example indices, crop windows, the padded length and masks."""
        epoch, j = divmod(int(k), self.num_batches)
        idx = self.epoch(epoch)[j]
        size = self.buckets[int(self.bucket[idx[0]])]
        frames = config_frame_count(self.config, size)
        starts, crops, masks = [], [], []
        for i in idx:
            crop = int(min(self.lengths[i], size))
            full = int(self.full_lengths[i])  # the file may be longer than the crop limit
            if full > crop:  # else the start is 0 (integers(0, 1)): no generator needed
                rng = example_rng(self.seed, epoch, int(i), CROP_STREAM)
                starts.append(int(rng.integers(0, full - crop + 1)))
            else:
                starts.append(0)
            crops.append(crop)
            masks.append(masking.sequence_masks(
                example_rng(self.seed, epoch, int(i), MASK_STREAM), frames,
                self._frames(crop), self.masking_cfg))
        masks = np.stack(masks)  # [B, M, T]
        if self.masking_cfg["kind"] == "span" and self.masking_cfg.get("same_count", True):
            # fairseq trims to the smallest count of each GPU's batch: with a token
            # budget the rows of one official GPU are rows / batch_size (the GPU
            # count), else the whole batch is one group.
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(k), BATCH_STREAM]))
            group = len(idx) // self.batch_size if self.max_tokens > 0 else len(idx)
            masks = np.concatenate([
                masking.same_count(rng, g.reshape(-1, frames)).reshape(g.shape)
                for g in np.split(masks, len(idx) // group)])
        return {"index": idx, "start": starts, "crop": crops, "size": size, "mask": masks}


class AudioBatcher:
    """Global batch k -> this process's rows, read and padded (grain map fn)."""

    def __init__(self, config, source: AudioSource, process_index: int, local_batch: int):
        self.plan = BatchPlan(config, source.lengths)
        self.source = source
        # Processes split every batch evenly: batch_size / local_batch of them.
        self.process_index = process_index
        self.process_count = int(config.data.batch_size) // int(local_batch)
        self.normalize = bool(config.data.normalize)
        self.on_bad_sample = bad_samples.settings(config)[0]

    def __call__(self, k: int, _: Any = None) -> dict[str, np.ndarray]:
        p = self.plan.batch(k)
        local = len(p["index"]) // self.process_count
        sl = slice(self.process_index * local, (self.process_index + 1) * local)
        rows = range(len(p["index"]))[sl]
        audio = np.zeros((len(rows), p["size"]), np.float32)
        padding = np.ones((len(rows), p["size"]), bool)
        failed = {}  # row -> (path, error)
        for r_out, r in enumerate(rows):
            i, start, crop = int(p["index"][r]), p["start"][r], p["crop"][r]
            row = audio[r_out, :crop]  # decoded and normalized in place
            try:
                if hasattr(self.source, "read_into"):
                    self.source.read_into(i, start, row)
                else:  # any source with `read(i)` and `lengths`
                    row[:] = self.source.read(i)[start:start + crop]
            except BadSampleError as e:
                if self.on_bad_sample == "error":
                    raise
                failed[r_out] = (e.path, str(e))
                continue
            if self.normalize:
                normalize_inplace(row)
            padding[r_out, :crop] = False
        out = {"audio": audio, "padding_mask": padding, "mask": np.array(p["mask"][sl]),
               "index": np.asarray(p["index"][sl], np.int32)}
        # Unreadable rows take the next readable row of the batch (data.on_bad_sample).
        bad_samples.replace_rows(out, failed, ("audio", "padding_mask", "mask", "index"))
        return out


def make_pretrain_dataset(config: ml_collections.ConfigDict, *, process_index: int = 0,
                          process_count: int = 1, source: AudioSource | None = None,
                          num_threads: int = 4, prefetch_buffer_size: int = 8) -> grain.IterDataset:
    """Endless audio batches for this process: {"audio": f32 [b, S], "padding_mask":
    bool [b, S], "mask": bool [b, M, T], "index": i32 [b]}, S one of data.buckets.
    Process p gets rows [p*b, (p+1)*b) of every global batch (b = its rows / the
    process count: `data.batch_size` or, with `data.max_tokens`, the bucket's)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    local = local_batch_size(config, process_count)
    src = AudioSource.from_config(config) if source is None else source
    batcher = AudioBatcher(config, src, process_index, local)
    logging.info("audio: %d examples, %d batches per epoch, buckets %s", len(src),
                 batcher.plan.num_batches, batcher.plan.buckets)
    return batch_number_dataset(batcher, batcher.plan.num_batches, config, len(src),
                                num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
