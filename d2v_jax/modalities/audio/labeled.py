"""Labeled audio for fine-tuning: class folders (`audio_folder`) and the
espeak-ng keyword set (`espeak_words`), cropped or padded to the backbone's
`data.max_sample_size` with a padding mask."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from d2v_jax.data.labeled import label_ids
from d2v_jax.data.rng import example_rng
from d2v_jax.modalities.audio import files as audio
from d2v_jax.modalities.audio.frames import config_frame_count
from d2v_jax.modalities.audio import speech_set
from d2v_jax.errors import ConfigError, DataError


AUDIO_SOURCES = ("audio_folder", "espeak_words")
EVAL_CROPS = ("center", "start", "energy")
TRAIN_CROPS = ("random", "energy")


def window_energies(wav: np.ndarray, size: int) -> np.ndarray:
    """[n - size + 1] sum of squares of every window of `size` samples (float64
    cumulative sums, so long clips stay exact enough)."""
    c = np.concatenate([[0.0], np.cumsum(np.square(wav, dtype=np.float64))])
    return c[size:] - c[:-size]


def trim_silence(wav: np.ndarray, db: float) -> np.ndarray:
    """`wav` without its leading and trailing samples quieter than `db` dB
    below the clip's peak amplitude; `db` <= 0 or a silent clip: unchanged."""
    peak = float(np.max(np.abs(wav))) if len(wav) else 0.0
    if db <= 0 or peak == 0:
        return wav
    loud = np.flatnonzero(np.abs(wav) >= peak * 10.0 ** (-db / 20.0))
    return wav[loud[0]:loud[-1] + 1]


class AudioFolderSource:
    """`root/<label>/**/<file>.wav` (any soundfile format): label = the class
    folder. Headers are read once (an unreadable file fails here, naming it);
    audio is decoded on access, mono, resampled to `sample_rate`."""

    def __init__(self, root: str, sample_rate: int, classes: Sequence[str] = ()) -> None:
        self.root, self.sample_rate = root, int(sample_rate)
        self.manifest = audio.scan_folder(root, self.sample_rate)
        names, origins = [], []
        for rel in self.manifest.paths:
            parts = rel.split(os.sep)
            if len(parts) < 2:
                raise DataError(f"audio file {os.path.join(root, rel)!r} is not inside a class "
                                f"folder; expected {root}/<label>/<file>")
            names.append(parts[0])
            origins.append(repr(os.path.join(root, rel)))
        self.labels, self.classes = label_ids(names, origins, classes, "class folder")

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return {"audio": audio.load_audio(self.manifest, index, self.sample_rate),
                "index": index}

    def __repr__(self) -> str:
        return f"AudioFolderSource({self.root!r}, classes={len(self.classes)}, len={len(self)})"


class AudioFinetuneTransform:
    """(element, epoch) -> {"audio": f32 [S], "padding_mask": bool [S]}.

    Leading / trailing silence cut first (`trim_db` dB below the peak; 0 = off),
    normalized per utterance when the backbone was (`data.normalize`), then
    cropped to at most S = `data.max_sample_size` samples. Training (`crop`
    random | energy): a window seeded by (seed, epoch, index), uniform over all
    starts or over those whose window holds at least `energy_keep` x the best
    window's energy. Evaluation (`crop` center | start | energy): the centre
    window, the first, or the one with the most energy (a word followed by
    silence is kept whole). Shorter clips are zero-padded to S (one static
    shape); `padding_mask` marks the padding, which the encoder and the
    pooling ignore.
    """

    def __init__(self, size: int, normalize: bool, seed: int, train: bool, crop: str = "",
                 trim_db: float = 0.0, energy_keep: float = 0.9) -> None:
        self.size, self.normalize, self.seed, self.train = int(size), normalize, int(seed), train
        self.crop = crop or ("random" if train else "center")
        allowed = TRAIN_CROPS if train else EVAL_CROPS
        if self.crop not in allowed:
            field = "train_crop" if train else "eval_crop"
            raise ConfigError(f"config.data.{field}={self.crop!r}; expected one of {allowed}")
        if not 0 < energy_keep <= 1:
            raise ConfigError(f"config.data.energy_keep={energy_keep} is not in (0, 1]")
        if trim_db < 0:
            raise ConfigError(f"config.data.trim_silence_db={trim_db} is negative (0 = off)")
        self.trim_db, self.energy_keep = float(trim_db), float(energy_keep)

    def _start(self, wav: np.ndarray, element: dict[str, Any], epoch: int) -> int:
        n = len(wav)
        if self.crop == "center":
            return (n - self.size) // 2
        if self.crop == "start":
            return 0
        if self.crop == "energy":
            energy = window_energies(wav, self.size)
            if not self.train:
                return int(np.argmax(energy))
            starts = np.flatnonzero(energy >= self.energy_keep * energy.max())
        else:
            starts = None
        rng = example_rng(self.seed, epoch, int(element["index"]), audio.CROP_STREAM)
        if starts is None:
            return int(rng.integers(0, n - self.size + 1))
        return int(starts[rng.integers(0, len(starts))])

    def __call__(self, element: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        wav = trim_silence(np.asarray(element["audio"], np.float32), self.trim_db)
        if self.normalize:
            wav = audio.normalize(wav)
        n = len(wav)
        if n > self.size:
            start = self._start(wav, element, epoch)
            wav, n = wav[start:start + self.size], self.size
        out = np.zeros(self.size, np.float32)
        out[:n] = wav
        return {"audio": out, "padding_mask": np.arange(self.size) >= n}


def labeled_parts(config, backbone_config):
    """(source, labels, class names, train transform, eval transform) of an audio task."""
    d = config.data
    if d.source == "espeak_words":
        root = d.path or os.path.join(speech_set.ensure_espeak_set(d.cache_dir), "words")
    elif d.source == "audio_folder":
        if not d.path:
            raise ConfigError("config.data.path is empty; data.source='audio_folder' needs a "
                              "class-folder root (<root>/<label>/<file>.wav)")
        root = d.path
    else:
        raise ConfigError(f"config.data.source={d.source!r} is not an audio task; expected one "
                          f"of {AUDIO_SOURCES}")
    bd = backbone_config.data
    source = AudioFolderSource(root, bd.sample_rate, tuple(d.classes))
    size = int(d.max_sample_size or bd.max_sample_size)
    short = config_frame_count(backbone_config, source.manifest.lengths) < 1
    if np.any(short):
        i = int(np.argmax(short))
        raise DataError(f"audio file {source.manifest.where(i)} has "
                        f"{source.manifest.lengths[i]} samples, too short for one feature "
                        "frame of the backbone's conv front-end")
    if config_frame_count(backbone_config, size) < 1:
        raise ConfigError(f"config.data.max_sample_size={size} gives no feature frame")
    normalize = bool(bd.normalize)
    crops = {"trim_db": float(d.get("trim_silence_db", 0.0)),
             "energy_keep": float(d.get("energy_keep", 0.9))}
    return (source, source.labels, source.classes,
            AudioFinetuneTransform(size, normalize, config.seed, train=True,
                                   crop=d.get("train_crop", "random"), **crops),
            AudioFinetuneTransform(size, normalize, config.seed, train=False,
                                   crop=d.get("eval_crop", "center"), **crops))
