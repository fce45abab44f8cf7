"""One folder per modality, each registered once as a `Modality` record.

    modalities/<name>/
      __init__.py   the `Modality` record, registered on import
      masking.py    the maskers (SPEC 5) and the visible-token count
      model.py      front-end + the 1.0 / 2.0 student and teacher wiring
      data/sources/transforms.py   the pretraining pipeline
      labeled.py    fine-tuning data
      config.py     the modality's config checks
      flops.py, hf.py (, fairseq.py)   FLOP terms, checkpoint mappings

The generic code asks `get(config)` for a record; the helpers below are the
calls it makes most. SMILES and proteins are text with their tokenizer.
"""

from __future__ import annotations

import ml_collections

from d2v_jax.modalities import audio, image, text  # noqa: F401  (register the built-ins)
from d2v_jax.modalities.registry import Modality, get, names, register, unregister

__all__ = ["Modality", "build_model", "dummy_batch", "get", "names", "register",
           "teacher_modules", "unregister"]


def build_model(config: ml_collections.ConfigDict):
    """The Flax module of `config.modality`, built from `config`."""
    return get(config).build_model(config)


def teacher_modules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return get(config).teacher_modules


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict:
    return get(config).dummy_batch(config, batch_size)
