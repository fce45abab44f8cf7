"""The image modality: a ViT for data2vec 1.0 (BEiT recipe) and 2.0.

One module, three entry points that the train step calls with `method=`:

- `teacher(image)`: the full, unmasked image through the encoder, deterministic;
  returns the per-block target tensors [L, B, N, D] with the CLS position dropped.
- `student(image, mask)`: the masked view. 1.0 replaces masked patch embeddings
  by a learned mask token and runs the whole sequence; 2.0 runs the encoder on
  the visible patches of M clones only and lets the conv decoder predict the
  full grid. Returns predictions [B*M, N, D] (and the 2.0 CLS output).
- `encode(image)`: final hidden states [B, 1+N, D] for probes and fine-tuning.

The teacher uses only the `frontend` and `encoder` subtrees (`TEACHER_MODULES`),
so `ema_params` holds just those.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from d2v_jax.modalities.image import masking
from d2v_jax.models import visible
from d2v_jax.models.decoder import ConvDecoder, decoder_from_config
from d2v_jax.models.layers import (Encoder, dense, dtype_of, encoder_from_config, kernel,
                                   layer_norm, normal_init)
from d2v_jax.models.positions import RelativePositionBias, sincos_2d

TEACHER_MODULES = ("frontend", "encoder")


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, np.ndarray]:
    """A batch of the right shapes and a valid mask, for `init` and tracing."""
    m = config.model
    grid = masking.grid_of(config)
    n = grid[0] * grid[1]
    num_masked = n - masking.num_keep(config) if config.version == "v2" else n // 2
    mask = np.zeros((batch_size, config.masking.num_clones, n), bool)
    mask[..., :num_masked] = True
    # uint8 pixels, as the pipeline emits them (normalized on device, `normalize_pixels`).
    return {"image": np.zeros((batch_size, m.image_size, m.image_size, m.channels), np.uint8),
            "mask": mask}


def normalize_pixels(image: jax.Array, mean, std) -> jax.Array:
    """uint8 [..., C] pixels -> float32 (x / 255 - mean) / std per channel, the
    first op of every entry point, inside the jitted step: the host pipeline
    ships uint8 (4x fewer bytes than float32 to the device) and the formula is
    the host `transforms.normalize`'s. A float input is taken as already
    normalized (HF `pixel_values`, arrays a user normalized) and passed on
    unchanged; the choice is by dtype, static under jit."""
    if image.dtype != jnp.uint8:
        return image
    mean = jnp.asarray(mean, jnp.float32).reshape(-1)
    std = jnp.asarray(std, jnp.float32).reshape(-1)
    return (image.astype(jnp.float32) * jnp.float32(1 / 255) - mean) / std


# The patch projection's init decides how loud content is next to the fixed
# positions at the start: with few input pixels per patch (p*p*C small) a 0.02
# normal makes patch content ~8x quieter than the sin-cos table, and a teacher
# whose outputs are then mostly position never learns content (positional
# collapse, docs/results.md, tiny recipes). Kernel [p, p, C, D]; fans over (p, p, C) and D.
PATCH_EMBED_INITS = {
    # data2vec 2.0 / MAE: xavier_uniform_ on the [D, p*p*C] view of the weight.
    "xavier": nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                               out_axis=-1),
    # BEiT / data2vec 1.0: PyTorch's Conv2d default, U(+-1/sqrt(p*p*C)).
    "torch_conv": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                                   in_axis=(0, 1, 2), out_axis=-1),
    # Hugging Face Data2VecVision's _init_weights: N(0, 0.02) truncated at +-2 std.
    "trunc_normal": nn.initializers.truncated_normal(stddev=0.02),
    # "linear": the Linear layers' init (model.init_std / init_truncation); BEiT's
    # _init_weights gives the patch Conv2d the same trunc_normal_ as every Linear.
    "linear": None,
}


class ImageFrontEnd(nn.Module):
    """Patch embedding, positions, CLS and mask tokens, embedding LN (2.0)."""

    image_size: int
    patch_size: int
    channels: int
    dim: int
    num_heads: int
    abs_pos: str = "sincos"  # "sincos" (2.0) or "none" (1.0: relative bias only)
    rel_pos_bias: str = "none"  # "shared": one BEiT table for all blocks; "per_block": one each
    depth: int = 0  # blocks: the number of tables for rel_pos_bias="per_block"
    layer_norm_first: bool = False
    norm_eps: float = 1e-6
    patch_embed_init: str = "xavier"
    mask_token: bool = False  # 1.0: a learned token replaces masked patches
    dtype: str = "float32"
    init_std: float = 0.02  # the Linear layers' init (and patch_embed_init="linear")
    init_truncation: float | None = None
    # CLS and mask token ~ N(0, token_init_std^2), truncated as the Linear layers:
    # 2.0 N(0, 1) (fairseq init_extra_token_zero=False); BEiT trunc_normal_(0.02).
    token_init_std: float = 0.02
    # config.data.mean / std: how uint8 pixels are normalized on device.
    pixel_mean: tuple[float, ...] = (0.0,)
    pixel_std: tuple[float, ...] = (1.0,)

    def setup(self):
        dtype = dtype_of(self.dtype)
        self.grid = (self.image_size // self.patch_size,) * 2
        p = self.patch_size
        patch_init = PATCH_EMBED_INITS[self.patch_embed_init]
        if patch_init is None:
            patch_init = normal_init(self.init_std, self.init_truncation)
        self.patch_embed = nn.Conv(
            self.dim, (p, p), strides=(p, p), padding="VALID", dtype=dtype, name="patch_embed",
            kernel_init=kernel((None, None, None, "embed"), patch_init),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))
        tok_init = kernel(("embed",), normal_init(self.token_init_std, self.init_truncation))
        self.cls_token = self.param("cls_token", tok_init, (self.dim,))
        if self.mask_token:
            self.mask_embedding = self.param("mask_token", tok_init, (self.dim,))
        if self.rel_pos_bias in ("shared", "per_block"):
            tables = self.depth if self.rel_pos_bias == "per_block" else 0
            self.rel_pos = RelativePositionBias(self.grid, self.num_heads, tables,
                                                name="rel_pos_bias")
        if not self.layer_norm_first:  # post-LN blocks need normalized inputs
            self.emb_norm = layer_norm(self.norm_eps, dtype, "emb_norm")

    def patches(self, image: jax.Array) -> jax.Array:
        """[B,H,W,C] (uint8 pixels or normalized floats) -> [B,N,D] patch
        embeddings (with fixed positions for 2.0)."""
        x = self.patch_embed(normalize_pixels(image, self.pixel_mean, self.pixel_std))
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        if self.abs_pos == "sincos":
            x = x + sincos_2d(self.grid, self.dim).astype(x.dtype)
        return x

    def with_cls(self, x: jax.Array) -> jax.Array:
        """Prepends CLS (which gets no position, as fairseq's extra tokens)."""
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        if not self.layer_norm_first:
            x = self.emb_norm(x)
        return x

    def apply_mask_token(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return jnp.where(mask[..., None], self.mask_embedding.astype(x.dtype), x)

    def bias(self):
        """[1, H, 1+N, 1+N]; per block [L, 1, H, 1+N, 1+N]; or None."""
        return self.rel_pos() if self.rel_pos_bias in ("shared", "per_block") else None


class ImageData2Vec(nn.Module):
    """The image model; `build(config)` makes it from an experiment config."""

    version: str  # "v1" or "v2"
    frontend: ImageFrontEnd
    encoder: Encoder
    decoder: ConvDecoder | None = None  # 2.0 only
    num_keep: int = 0  # 2.0: patches the student encodes per row (masking.num_keep)
    mask_noise_std: float = 0.01  # 2.0: the decoder's fill at removed patches
    decoder_input_dropout: float = 0.0  # 2.0: on the encoder outputs the decoder gets
    dtype: str = "float32"
    # False: no LayerNorm after a pre-LN stack (BEiT fine-tuning with mean
    # pooling normalizes the pooled features instead; HF use_mean_pooling).
    final_norm_on: bool = True
    # `encode` returns the CLS position first (pooling skips it for "mean").
    cls_first = True

    def setup(self):
        dtype = dtype_of(self.dtype)
        if self._has_final_norm():  # pre-LN stacks end with a LayerNorm (BEiT)
            self.final_norm = layer_norm(self.frontend.norm_eps, dtype, "final_norm")
        if self.version == "v1":
            self.head = dense(self.frontend.dim, ("embed", "embed_out"), dtype, name="head",
                              init=normal_init(self.frontend.init_std,
                                               self.frontend.init_truncation))
        else:
            self.decoder_dropout = nn.Dropout(self.decoder_input_dropout)

    # -- shared pieces ----------------------------------------------------------
    def _has_final_norm(self) -> bool:
        return self.frontend.layer_norm_first and self.final_norm_on

    def _encode(self, x, *, deterministic: bool, final_norm: bool = True):
        x, layer_targets = self.encoder(x, self.frontend.bias(), deterministic=deterministic)
        if final_norm and self._has_final_norm():
            x = self.final_norm(x)
        return x, layer_targets

    # -- entry points -------------------------------------------------------------
    def teacher(self, batch: dict[str, jax.Array]) -> dict[str, Any]:
        """{'layers': per-block target tensors [L, B, N, D] of the full image
        (SPEC 2, CLS dropped), 'padding_mask': None}."""
        x = self.frontend.with_cls(self.frontend.patches(batch["image"]))
        # The teacher needs only the block tensors, not the student's final norm.
        _, layer_targets = self._encode(x, deterministic=True, final_norm=False)
        return {"layers": layer_targets[:, :, 1:], "padding_mask": None}

    def encode(self, batch: dict[str, jax.Array], deterministic: bool = True) -> jax.Array:
        """Final hidden states [B, 1+N, D] of the full image (CLS first);
        `deterministic=False`: with dropout and drop path (fine-tuning)."""
        x = self.frontend.with_cls(self.frontend.patches(batch["image"]))
        return self._encode(x, deterministic=deterministic)[0]

    def student(self, batch: dict[str, jax.Array], *, deterministic: bool = False
                ) -> dict[str, Any]:
        """batch['mask']: bool [B, M, N], True = masked. Returns
        {'pred': [B*M, N, D], 'loss_mask': [B*M, N], 'cls': [B*M, D] or None};
        row b*M + j is clone j of image b."""
        image, mask = batch["image"], batch["mask"]
        if self.version == "v1":
            out = self._student_v1(image, mask, deterministic)
        else:
            out = self._student_v2(image, mask, deterministic)
        out["loss_mask"] = mask.reshape(-1, mask.shape[-1])
        return out

    def _student_v1(self, image, mask, deterministic):
        b, m, n = mask.shape
        x = self.frontend.patches(image)
        if m > 1:
            x = jnp.repeat(x, m, axis=0)
        x = self.frontend.apply_mask_token(x, mask.reshape(b * m, n))
        x, _ = self._encode(self.frontend.with_cls(x), deterministic=deterministic)
        return {"pred": self.head(x[:, 1:]), "cls": None}

    def _student_v2(self, image, mask, deterministic):
        b, m, n = mask.shape
        x = self.frontend.patches(image)  # once per image; clones gathered from it
        mask = mask.reshape(b * m, n)
        # Every row has the same masked count (inverse block masking adjusts it
        # exactly), so the visible set has the static size num_keep.
        keep, removed = visible.split_indices(mask, self.num_keep)
        h, _ = self._encode(self.frontend.with_cls(visible.gather(x, keep, clones=m)),
                            deterministic=deterministic)
        # Decoder input: visible outputs (after the decoder's input dropout) back
        # in place, masked slots ~ N(0, std) (fairseq decoder_input).
        h = self.decoder_dropout(h, deterministic=deterministic)
        full = visible.scatter_with_noise(h[:, 1:], keep, removed, self.mask_noise_std,
                                          self.make_rng("noise"))
        return {"pred": self.decoder(full), "cls": h[:, 0]}


def build(config: ml_collections.ConfigDict) -> ImageData2Vec:
    """The image model an experiment config describes (`config.model`,
    `config.decoder`, `config.masking`)."""
    m = config.model
    frontend = ImageFrontEnd(
        image_size=m.image_size, patch_size=m.patch_size, channels=m.channels, dim=m.dim,
        num_heads=m.num_heads, abs_pos=m.abs_pos, rel_pos_bias=m.rel_pos_bias,
        layer_norm_first=m.layer_norm_first, norm_eps=m.norm_eps,
        patch_embed_init=m.patch_embed_init, mask_token=config.version == "v1", dtype=m.dtype,
        init_std=m.get("init_std", 0.02), init_truncation=m.get("init_truncation", None),
        token_init_std=m.get("token_init_std", 0.02), depth=m.depth,
        pixel_mean=tuple(float(v) for v in config.data.mean),
        pixel_std=tuple(float(v) for v in config.data.std))
    encoder = encoder_from_config(m, layer_norm_first=m.layer_norm_first,
                                  layer_scale_init=m.layer_scale_init, dtype=dtype_of(m.dtype),
                                  bias_per_layer=m.rel_pos_bias == "per_block")
    if config.version == "v1":
        # model.final_norm=False: no LayerNorm after the pre-LN stack (BEiT
        # fine-tuning with mean pooling normalizes the pooled features instead).
        return ImageData2Vec("v1", frontend, encoder, dtype=m.dtype,
                             final_norm_on=m.get("final_norm", True))
    decoder = decoder_from_config(config.decoder, masking.grid_of(config), m.dim,
                                  dtype_of(m.dtype))
    return ImageData2Vec("v2", frontend, encoder, decoder, num_keep=masking.num_keep(config),
                         mask_noise_std=config.decoder.mask_noise_std,
                         decoder_input_dropout=config.decoder.get("input_dropout", 0.0),
                         dtype=m.dtype)
