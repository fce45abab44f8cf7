"""Synthetic sensor recordings (sums of sinusoids per channel, seeded by index),
the per-example transform with masks, and the step's FLOPs."""

from __future__ import annotations

import numpy as np

from d2v_jax.data.rng import MASK_STREAM, example_rng
from d2v_jax.models.flops import FWD_BWD, decoder, encoder, linear, mlp_hidden, pack

from toy_sensor import masking


class SensorSource:
    """`num_examples` recordings [T, C]; label = the dominant frequency's class."""

    def __init__(self, num_examples: int, length: int, channels: int, seed: int = 0):
        self.n, self.length, self.channels, self.seed = num_examples, length, channels, seed

    def __len__(self):
        return self.n

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, int(index)])
        label = int(rng.integers(4))
        t = np.arange(self.length)[:, None]
        freq = (label + 1) / self.length * 2 * np.pi
        phase = rng.uniform(0, 2 * np.pi, self.channels)
        signal = np.sin(freq * t + phase) + 0.1 * rng.standard_normal((self.length, self.channels))
        return {"signal": signal.astype(np.float32), "label": label, "index": int(index)}


class SensorTransform:
    def __init__(self, config):
        self.config, self.seed = config, int(config.seed)

    def __call__(self, element, epoch: int):
        rng = example_rng(self.seed, epoch, element["index"], MASK_STREAM)
        return {"signal": element["signal"], "mask": masking.masks(rng, self.config),
                "index": np.int32(element["index"])}


def pretrain_parts(config, source=None):
    d = config.data
    src = source or SensorSource(int(d.num_examples), int(d.length), int(d.channels))
    return src, SensorTransform(config)


def step_flops(config, b: int, clones: int):
    m, t, keep = config.model, int(config.data.length), masking.num_keep(config)
    rows, hidden = b * clones, mlp_hidden(m)
    embed = linear(t, int(config.data.channels), m.dim)
    dm, de = decoder(rows, t, config.decoder.kernel, m.dim, config.decoder, m.dim)
    parts = {"teacher/embed": b * embed,
             "teacher/encoder": encoder(b, t, m.dim, m.depth, hidden),
             "student/embed": FWD_BWD * b * embed,
             "student/encoder": FWD_BWD * encoder(rows, keep, m.dim, m.depth, hidden),
             "decoder/conv": (FWD_BWD * dm, FWD_BWD * de)}
    return pack(parts, b, clones, {"teacher": t, "student": keep, "decoder": t})
