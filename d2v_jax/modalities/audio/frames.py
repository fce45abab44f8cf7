"""Conv frame arithmetic of the wav2vec 2.0 feature extractor, which the
pipeline, the masks, the model and the FLOP counter share."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def frame_count(num_samples, kernels: Sequence[int], strides: Sequence[int]):
    """Feature frames of a waveform of `num_samples` samples (int, numpy or jax
    array): each VALID conv maps L -> floor((L - k) / s) + 1 (0 when L < k).
    A frame counted here reads only real samples, so a frame of a padded
    waveform is real iff its index < frame_count(real length)."""
    xp = jnp if isinstance(num_samples, jax.Array) else np
    length = num_samples
    for k, s in zip(kernels, strides):
        length = xp.maximum((length - k) // s + 1, 0)
    return int(length) if isinstance(num_samples, (int, np.integer)) else length


def config_frame_count(config: ml_collections.ConfigDict, num_samples):
    """`frame_count` with the kernels and strides of `config.model`."""
    m = config.model
    return frame_count(num_samples, m.conv_kernels, m.conv_strides)
