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
from d2v_jax.modalities.audio import data as audio
from d2v_jax.modalities.audio.frames import config_frame_count
from d2v_jax.modalities.audio import speech_set
from d2v_jax.errors import ConfigError, DataError


AUDIO_SOURCES = ("audio_folder", "espeak_words")


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

    Normalized per utterance when the backbone was (`data.normalize`), then
    cropped to at most S = `data.max_sample_size` samples: a random window
    seeded by (seed, epoch, index) in training, the centre one in evaluation.
    Shorter clips are zero-padded to S (one static shape); `padding_mask`
    marks the padding, which the encoder and the pooling ignore.
    """

    def __init__(self, size: int, normalize: bool, seed: int, train: bool) -> None:
        self.size, self.normalize, self.seed, self.train = int(size), normalize, int(seed), train

    def __call__(self, element: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        wav = element["audio"]
        if self.normalize:
            wav = audio.normalize(wav)
        n = len(wav)
        if n > self.size:
            if self.train:
                rng = example_rng(self.seed, epoch, int(element["index"]),
                                            audio.CROP_STREAM)
                start = int(rng.integers(0, n - self.size + 1))
            else:
                start = (n - self.size) // 2
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
    return (source, source.labels, source.classes,
            AudioFinetuneTransform(size, normalize, config.seed, train=True),
            AudioFinetuneTransform(size, normalize, config.seed, train=False))
