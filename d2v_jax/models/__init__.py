"""Model registry: a modality name -> its Flax module and teacher subtrees."""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from d2v_jax.models import audio, image, text

# modality -> (module class, top-level subtrees the teacher uses, dummy batch)
MODELS = {
    "image": (image.ImageData2Vec, image.TEACHER_MODULES, image.dummy_batch),
    # text, SMILES and protein sequences: one model, the tokenizer differs
    "text": (text.TextData2Vec, text.TEACHER_MODULES, text.dummy_batch),
    "audio": (audio.AudioData2Vec, audio.TEACHER_MODULES, audio.dummy_batch),
}


def _entry(config: ml_collections.ConfigDict):
    if config.modality not in MODELS:
        raise ValueError(f"config.modality={config.modality!r}; expected one of {sorted(MODELS)}")
    return MODELS[config.modality]


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    return _entry(config)[0](config)


def teacher_modules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return _entry(config)[1]


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 1):
    return _entry(config)[2](config, batch_size)
