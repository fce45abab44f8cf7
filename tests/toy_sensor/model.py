"""The toy sensor model: a per-step linear embedding with learned positions, the
shared scanned encoder and 2.0 machinery (visible tokens, noise, conv decoder)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax.models import visible
from d2v_jax.models.decoder import ConvDecoder, decoder_from_config
from d2v_jax.models.layers import Encoder, dense, dtype_of, encoder_from_config, kernel, layer_norm

from toy_sensor import masking

TEACHER_MODULES = ("frontend", "encoder")


def dummy_batch(config, batch_size: int = 1) -> dict[str, np.ndarray]:
    t, c = int(config.data.length), int(config.data.channels)
    mask = np.zeros((batch_size, config.masking.num_clones, t), bool)
    mask[..., :masking.num_masked(config)] = True
    return {"signal": np.zeros((batch_size, t, c), np.float32), "mask": mask}


class SensorFrontEnd(nn.Module):
    length: int
    dim: int

    @nn.compact
    def __call__(self, signal: jax.Array) -> jax.Array:
        x = dense(self.dim, (None, "embed"), jnp.float32, name="proj")(signal)
        pos = self.param("pos_embed", kernel((None, "embed")), (self.length, self.dim))
        return layer_norm(1e-5, jnp.float32, "emb_norm")(x + pos)


class SensorData2Vec(nn.Module):
    frontend: SensorFrontEnd
    encoder: Encoder
    decoder: ConvDecoder
    num_keep: int
    mask_noise_std: float = 0.01
    cls_first = False

    def teacher(self, batch):
        _, layers = self.encoder(self.frontend(batch["signal"]), deterministic=True)
        return {"layers": layers, "padding_mask": None}

    def encode(self, batch):
        return self.encoder(self.frontend(batch["signal"]), deterministic=True)[0]

    def student(self, batch, *, deterministic: bool = False):
        mask = batch["mask"]
        b, m, t = mask.shape
        x = self.frontend(batch["signal"])
        mask = mask.reshape(b * m, t)
        keep, removed = visible.split_indices(mask, self.num_keep)
        h, _ = self.encoder(visible.gather(x, keep, clones=m), deterministic=deterministic)
        full = visible.scatter_with_noise(h, keep, removed, self.mask_noise_std,
                                          self.make_rng("noise"))
        return {"pred": self.decoder(full), "loss_mask": mask, "cls": None}


def build(config) -> SensorData2Vec:
    m = config.model
    return SensorData2Vec(
        SensorFrontEnd(int(config.data.length), m.dim),
        encoder_from_config(m, dtype=dtype_of(m.dtype)),
        decoder_from_config(config.decoder, (int(config.data.length),), m.dim, jnp.float32),
        num_keep=masking.num_keep(config), mask_noise_std=config.decoder.mask_noise_std)
