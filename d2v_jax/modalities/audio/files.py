"""Speech files: fairseq manifests, audio folders, reading, resampling and
normalization (`data.py` batches them; `labeled.py` reads labeled folders).

A fairseq manifest (`train.tsv`) has the root folder on its first line, then one
`relative/path.wav<TAB>num_samples` per line; `scan_folder` builds one from a
plain folder. Files are read with soundfile (WAV, FLAC, OGG, ...), mixed down to
mono and resampled to the target rate when theirs differs.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from d2v_jax.errors import BadSampleError, ConfigError, DataError, DataNotFoundError
from d2v_jax.modalities.audio import speech_set

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".au")
CROP_STREAM, MASK_STREAM, BATCH_STREAM = 0, 1, 2
ON_ERROR = ("raise", "skip")


@dataclasses.dataclass
class Manifest:
    """Audio files and their lengths in samples at the target rate."""

    root: str
    paths: list[str]  # relative to root
    lengths: np.ndarray  # int64 [N]
    lines: list[int]  # 1-based line of each entry in `source` (0 for a scanned folder)
    source: str  # the manifest file or folder it came from
    skipped: int = 0  # files left out by `check_files(on_error="skip")`

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def where(self, i: int) -> str:
        path = self.full_path(i)
        return f"{path!r} ({self.source} line {self.lines[i]})" if self.lines[i] else repr(path)

    def subset(self, keep: np.ndarray) -> "Manifest":
        keep = np.asarray(keep, bool)
        pick = lambda xs: [x for x, k in zip(xs, keep) if k]
        return Manifest(self.root, pick(self.paths), self.lengths[keep], pick(self.lines),
                        self.source, self.skipped)

    def __len__(self) -> int:
        return len(self.paths)


def read_manifest(path: str) -> Manifest:
    """Parses a fairseq manifest; every format error names the file and line."""
    if not os.path.isfile(path):
        raise DataNotFoundError(f"audio manifest {path!r} does not exist")
    with open(path) as f:
        text = f.read().splitlines()
    if not text or not text[0].strip():
        raise DataError(f"{path} line 1: expected the root folder, got an empty line")
    root = text[0].strip()
    if not os.path.isabs(root):  # relative roots are relative to the manifest's folder
        root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), root))
    paths, lengths, lines = [], [], []
    for lineno, line in enumerate(text[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise DataError(f"{path} line {lineno}: expected 2 tab-separated columns "
                            f"(relative path, num_samples), got {len(cols)}: {line!r}")
        try:
            n = int(cols[1])
        except ValueError:
            raise DataError(f"{path} line {lineno}: num_samples {cols[1]!r} is not an "
                            "integer") from None
        if n < 0:
            raise DataError(f"{path} line {lineno}: num_samples {n} < 0")
        paths.append(cols[0])
        lengths.append(n)
        lines.append(lineno)
    if not paths:
        raise DataError(f"audio manifest {path} lists no files")
    return Manifest(root, paths, np.asarray(lengths, np.int64), lines, path)


def _info(path: str):
    import soundfile as sf

    return sf.info(path)


def resampled_length(frames: int, rate: int, target: int) -> int:
    """Samples after resampling `frames` samples from `rate` to `target` (ceil, as
    scipy's resample_poly)."""
    if rate == target:
        return int(frames)
    from math import gcd

    g = gcd(int(rate), int(target))
    up, down = target // g, rate // g
    return -(-int(frames) * up // down)


def scan_folder(root: str, sample_rate: int, extensions=AUDIO_EXTENSIONS) -> Manifest:
    """A manifest of every audio file under `root` (sorted, recursive); lengths from
    the file headers, converted to `sample_rate`."""
    if not os.path.isdir(root):
        raise DataNotFoundError(f"audio folder {root!r} does not exist")
    paths, lengths = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(extensions):
                full = os.path.join(dirpath, name)
                try:
                    info = _info(full)
                except Exception as e:  # soundfile raises LibsndfileError / RuntimeError
                    raise DataError(f"cannot read audio file {full!r}: {e}") from e
                paths.append(os.path.relpath(full, root))
                lengths.append(resampled_length(info.frames, info.samplerate, sample_rate))
    if not paths:
        raise DataError(f"no audio files with extensions {extensions} under {root!r}")
    return Manifest(root, paths, np.asarray(lengths, np.int64), [0] * len(paths), root)


def write_manifest(manifest: Manifest, path: str) -> None:
    """Writes `manifest` in fairseq's format (root line, then path<TAB>samples)."""
    with open(path, "w") as f:
        f.write(manifest.root + "\n")
        for p, n in zip(manifest.paths, manifest.lengths):
            f.write(f"{p}\t{int(n)}\n")


def check_files(manifest: Manifest, sample_rate: int, on_error: str = "raise") -> Manifest:
    """Opens every file's header: a missing, unreadable or empty file raises an
    error naming it and its manifest line, or (on_error='skip') is dropped, counted
    and logged. Lengths are taken from the headers (converted to `sample_rate`)."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"config.data.on_error={on_error!r}; expected one of {ON_ERROR}")
    keep = np.ones(len(manifest), bool)
    lengths = manifest.lengths.copy()
    problems = []
    for i, rel in enumerate(manifest.paths):
        full = os.path.join(manifest.root, rel)
        if not os.path.isfile(full):
            problem = f"audio file {manifest.where(i)} does not exist"
        else:
            try:
                info = _info(full)
                problem = None if info.frames > 0 else f"audio file {manifest.where(i)} is empty"
                lengths[i] = resampled_length(info.frames, info.samplerate, sample_rate)
            except Exception as e:
                problem = f"cannot read audio file {manifest.where(i)}: {e}"
        if problem:
            if on_error == "raise":
                raise DataError(problem)
            keep[i] = False
            problems.append(problem)
    if problems:
        logging.warning("skipped %d of %d audio files (data.on_error='skip'); first: %s",
                        len(problems), len(manifest), "; ".join(problems[:3]))
    out = dataclasses.replace(manifest, lengths=lengths, skipped=len(problems)).subset(keep)
    if not len(out):
        raise DataError(f"no readable audio files in {manifest.source}")
    return out


# Containers whose decode is exact and sample-accurately seekable (PCM, float,
# lossless FLAC): reading a window equals slicing the whole file. Lossy codecs
# (Vorbis, Opus, MP3) are read whole, so their samples never depend on a seek.
EXACT_SEEK_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "AIFF", "AU", "CAF", "FLAC")


def _open_audio(manifest: Manifest, i: int):
    import soundfile as sf

    path = manifest.full_path(i)
    try:
        return sf.SoundFile(path)
    except Exception as e:
        raise BadSampleError(f"cannot read audio file {manifest.where(i)}: {e}", path=path) from e


def load_audio(manifest: Manifest, i: int, sample_rate: int) -> np.ndarray:
    """float32 mono [n] at `sample_rate`; errors name the file and manifest line."""
    with _open_audio(manifest, i) as f:
        try:
            audio, rate = f.read(dtype="float32", always_2d=True), f.samplerate
        except Exception as e:
            raise BadSampleError(f"cannot read audio file {manifest.where(i)}: {e}",
                                 path=manifest.full_path(i)) from e
    if audio.shape[0] == 0:
        raise BadSampleError(f"audio file {manifest.where(i)} is empty", path=manifest.full_path(i))
    # mono: a mono file's one channel as is (a view; mean over one channel is a copy)
    audio = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)
    if rate != sample_rate:
        audio = speech_set.resample(audio, rate, sample_rate)
    return audio


def normalize(audio: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Zero mean, unit variance per utterance (fairseq `normalize: true`, i.e.
    F.layer_norm over the whole waveform)."""
    audio = np.asarray(audio, np.float32)  # no copy when already float32
    out = audio - audio.mean()
    out /= np.sqrt(audio.var() + eps)  # in place: one full-length temporary, not two
    return out


def normalize_inplace(x: np.ndarray, eps: float = 1e-5) -> None:
    """`x[:] = normalize(x)` for a contiguous float32 1-D `x`, bit for bit, with
    one temporary instead of three: numpy's `var` is sum((x - mean)^2) / n with
    the same mean, so the centered `x` is computed once and reused."""
    n = np.intp(x.size)
    mean = np.float32(np.add.reduce(x) / n)  # as ndarray.mean (float32 sum / intp)
    x -= mean
    var = np.float32(np.add.reduce(np.square(x)) / n)  # as ndarray.var (ddof 0)
    x /= np.sqrt(var + eps)
