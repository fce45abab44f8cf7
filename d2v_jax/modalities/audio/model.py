"""The speech modality: data2vec 1.0 and 2.0 on raw 16 kHz waveforms (SPEC 2-7).

Three parameter subtrees (the teacher uses all three, `TEACHER_MODULES`):

- `frontend`: the wav2vec 2.0 conv feature extractor (layer-norm mode, no conv
  bias), the feature LayerNorm and the projection to the model width. SPEC 4:
  shared, the teacher uses the student's features (`ema.shared = ("frontend",)`).
- `context`: the conv positional encoder (5 grouped conv layers, or wav2vec
  2.0's single wide conv), the embedding LayerNorm of the post-LN stack, and for
  2.0 the learned per-head ALiBi scale.
- `encoder`: the post-LN Transformer blocks.

Entry points (`method=`): `teacher(batch)` -> {'layers' [L,B,T,D], 'padding_mask'
[B,T] or None}; `student(batch, deterministic)` -> {'pred', 'cls': None,
'loss_mask'}; `encode(batch)` -> [B,T,D].

A batch is {'audio': f32 [B,S], 'padding_mask': bool [B,S] (True = padded
sample, optional), 'mask': bool [B,M,T] (True = masked frame)}, T =
`frame_count(S)`. Padded frames are zeroed right after the projection, never
attended to (key padding mask), zeroed again after every positional conv, left
out of the target statistics and of the loss, so changing padded samples
changes nothing.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from d2v_jax.modalities.audio import masking
from d2v_jax.models.decoder import ConvDecoder, GroupedConv, grouped_conv
from d2v_jax.models.layers import (dtype_of, alibi_bias, alibi_slopes, dense, encoder_from_config,
                                   kernel, layer_norm)

TEACHER_MODULES = ("frontend", "context", "encoder")
POS_CONV_KINDS = ("stack", "single")


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
    m = config.model
    return frame_count(num_samples, m.conv_kernels, m.conv_strides)


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, np.ndarray]:
    """A batch of the largest bucket's shape with valid masks, for `init`."""
    s = int(config.data.max_sample_size)
    t = config_frame_count(config, s)
    mask = np.zeros((batch_size, config.masking.num_clones, t), bool)
    if config.version == "v2":
        mask[..., :masking.num_masked_1d(t, config.masking.ratio)] = True
    else:
        mask[..., : t // 2] = True
    return {"audio": np.zeros((batch_size, s), np.float32),
            "padding_mask": np.zeros((batch_size, s), bool), "mask": mask}


def _grad_mult(x: jax.Array, mult: float) -> jax.Array:
    """Identity forward; gradient scaled by `mult` (fairseq feature_grad_mult)."""
    if mult == 1.0:
        return x
    if mult == 0.0:
        return jax.lax.stop_gradient(x)
    return x * mult + jax.lax.stop_gradient(x) * (1.0 - mult)


class FeatureExtractor(nn.Module):
    """wav2vec 2.0 conv feature extractor (mode `layer_norm`), feature LayerNorm
    and projection: [B, S] -> [B, T, D] (SPEC 7)."""

    cfg: ml_collections.ConfigDict  # config.model

    @nn.compact
    def __call__(self, wav: jax.Array) -> jax.Array:
        m = self.cfg
        dtype = dtype_of(m.dtype)
        x = wav[..., None].astype(dtype)
        for i, (c, k, s) in enumerate(zip(m.conv_dims, m.conv_kernels, m.conv_strides)):
            x = nn.Conv(c, (k,), strides=(s,), padding="VALID", use_bias=m.conv_bias, dtype=dtype,
                        kernel_init=kernel((None, None, None), nn.initializers.kaiming_normal()),
                        name=f"conv_{i}")(x)
            # fairseq's Fp32LayerNorm over channels, per frame (no time mixing).
            x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=f"conv_norm_{i}")(x).astype(dtype)
            x = nn.gelu(x, approximate=False)
        x = _grad_mult(x, m.feature_grad_mult)
        x = layer_norm(1e-5, dtype, "feature_norm")(x)
        return dense(m.dim, (None, "embed"), dtype, name="proj")(x)


def _same_conv_even(conv: nn.Module, x: jax.Array, k: int) -> jax.Array:
    """torch `Conv1d(padding=k//2)` + fairseq `SamePad` (drop the last frame):
    for even k the window of frame t is [t - k/2, t + k/2 - 1], one earlier than
    XLA's 'SAME'; a leading zero frame shifts it there."""
    if k % 2:
        return conv(x)
    return conv(jnp.pad(x, ((0, 0), (1, 0), (0, 0))))[:, :-1]


class WeightNormConv(nn.Module):
    """wav2vec 2.0's positional conv: grouped, kernel k, weight norm over
    (in, out) per tap (torch `weight_norm(dim=2)`), torch-style same padding."""

    dim: int
    kernel_size: int
    groups: int
    impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        std = float(np.sqrt(4.0 / (k * self.dim)))  # fairseq's init of the conv
        v = self.param("v", kernel((None, "embed", "mlp"), nn.initializers.normal(std)),
                       (k, self.dim // self.groups, self.dim))
        norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a), axis=(1, 2)))
        g = self.param("g", lambda _, shape: norm(nn.unbox(v)), (k,))  # g = |v| at init
        b = self.param("bias", kernel(("mlp",), nn.initializers.zeros_init()), (self.dim,))
        w = v * (g / norm(v))[:, None, None]
        conv = lambda h: grouped_conv(h.astype(self.dtype), w.astype(self.dtype), self.groups,
                                      self.impl) + b.astype(self.dtype)
        return _same_conv_even(conv, x, k)


class AudioContext(nn.Module):
    """Conv positional encoder, embedding LayerNorm, ALiBi scale (SPEC 6)."""

    cfg: ml_collections.ConfigDict  # config.model

    def setup(self):
        m = self.cfg
        dtype = dtype_of(m.dtype)
        if m.pos_conv not in POS_CONV_KINDS:
            raise ValueError(f"model.pos_conv={m.pos_conv!r}; expected one of {POS_CONV_KINDS}")
        if m.pos_conv == "stack":  # data2vec: depth layers of width // depth (95 // 5 = 19)
            self.pos_kernel = max(3, m.pos_conv_width // m.pos_conv_depth)
            self.pos_convs = [GroupedConv(m.dim, (self.pos_kernel,), m.pos_conv_groups,
                                          impl=m.conv_impl, dtype=dtype, name=f"pos_conv_{i}")
                              for i in range(m.pos_conv_depth)]
            self.pos_norms = [nn.LayerNorm(epsilon=1e-5, use_bias=False, use_scale=False,
                                           dtype=dtype) for _ in range(m.pos_conv_depth)]
        else:  # wav2vec 2.0: one weight-normed conv of width k, then GELU
            self.pos_kernel = m.pos_conv_width
            self.pos_conv = WeightNormConv(m.dim, m.pos_conv_width, m.pos_conv_groups,
                                           m.conv_impl, dtype, name="pos_conv")
        self.emb_norm = layer_norm(m.norm_eps, dtype, "emb_norm")
        self.dropout = nn.Dropout(m.dropout)
        if m.alibi:
            # One learned scale per head, shared by all blocks (fairseq
            # learned_alibi_scale_per_head), clamped at 0 when used.
            self.alibi_scale = self.param(
                "alibi_scale", kernel(("heads",), nn.initializers.constant(m.alibi_scale_init)),
                (m.num_heads,))

    def positions(self, x: jax.Array, padding: jax.Array | None) -> jax.Array:
        """The conv positional encoding of x [B,T,D] (added by the caller);
        padded frames are zeroed after every layer so they carry nothing
        (`model.pos_conv_zero_pad="layer"`), or, as fairseq and Hugging Face
        do, only in the input x ("input"; the caller zeroes x)."""
        every_layer = self.cfg.get("pos_conv_zero_pad", "layer") == "layer"
        valid = None if padding is None or not every_layer else ~padding[..., None]

        def zero_pad(h):
            return h if valid is None else jnp.where(valid, h, 0)

        if self.cfg.pos_conv == "single":
            return zero_pad(nn.gelu(self.pos_conv(x), approximate=False))
        h = x
        for conv, norm in zip(self.pos_convs, self.pos_norms):
            h = _same_conv_even(conv, h, self.pos_kernel)
            h = zero_pad(nn.gelu(norm(h), approximate=False))
        return h

    def norm(self, x: jax.Array, deterministic: bool) -> jax.Array:
        return self.dropout(self.emb_norm(x), deterministic=deterministic)

    def bias(self, positions: jax.Array) -> jax.Array | None:
        """ALiBi bias [B|1, H, T, T] for frame indices [B|1, T] (2.0), else None."""
        if not self.cfg.alibi:
            return None
        slopes = jnp.asarray(alibi_slopes(self.cfg.num_heads))
        scale = jnp.maximum(self.alibi_scale, 0.0)
        return alibi_bias(positions, slopes) * scale[None, :, None, None]


class MaskEmbedding(nn.Module):
    """The learned 1.0 mask embedding, fairseq's `mask_emb` ~ U[0, 1); its own
    module so that only the student (which calls it) creates or needs it."""

    dim: int

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("embedding", kernel(("embed",), nn.initializers.uniform(1.0)),
                          (self.dim,))


class AudioData2Vec(nn.Module):
    config: ml_collections.ConfigDict  # the whole experiment config
    # Every position is a frame: no CLS to skip when pooling.
    cls_first = False

    def setup(self):
        c = self.config
        m = c.model
        dtype = dtype_of(m.dtype)
        self.version = c.version
        self.frontend = FeatureExtractor(m)
        self.context = AudioContext(m)
        self.encoder = encoder_from_config(m, dtype=dtype)
        self.input_dropout = nn.Dropout(m.dropout_input)
        if c.version == "v1":
            self.mask_emb = MaskEmbedding(m.dim, name="mask_emb")
            self.head = dense(m.dim, ("embed", "embed_out"), dtype, name="head")
        else:
            d = c.decoder
            # grid (-1,): a 1-D decoder over whatever frame count the batch has.
            self.decoder = ConvDecoder((-1,), d.dim, m.dim, d.kernel, d.layers, d.groups,
                                       d.residual, conv_impl=d.conv_impl, dtype=dtype)
            self.decoder_dropout = nn.Dropout(d.input_dropout)

    # -- shared pieces ----------------------------------------------------------
    def frame_padding(self, batch: dict[str, jax.Array], num_frames: int) -> jax.Array | None:
        """bool [B, T], True = padded frame, from the sample padding mask."""
        pad = batch.get("padding_mask")
        if pad is None:
            return None
        lengths = jnp.sum(~jnp.asarray(pad, bool), axis=-1)
        n = config_frame_count(self.config, lengths)
        return jnp.arange(num_frames)[None, :] >= n[:, None]

    def _features(self, batch):
        x = self.frontend(batch["audio"])
        pad = self.frame_padding(batch, x.shape[1])
        if pad is not None:
            x = jnp.where(pad[..., None], 0, x)
        return x, pad

    def _context(self, x, pad, deterministic):
        return self.context.norm(x + self.context.positions(x, pad), deterministic)

    def _full(self, batch, deterministic):
        x, pad = self._features(batch)
        x = self._context(x, pad, deterministic)
        bias = self.context.bias(jnp.arange(x.shape[1])[None])
        h, layers = self.encoder(x, bias, pad, deterministic=deterministic)
        return h, layers, pad

    # -- entry points -------------------------------------------------------------
    def teacher(self, batch: dict[str, jax.Array]) -> dict[str, Any]:
        """{'layers': FFN outputs of every block [L, B, T, D] of the unmasked
        input (SPEC 2), 'padding_mask': [B, T] or None}; deterministic."""
        _, layers, pad = self._full(batch, deterministic=True)
        return {"layers": layers, "padding_mask": pad}

    def encode(self, batch: dict[str, jax.Array]) -> jax.Array:
        """Final hidden states [B, T, D] of the full input, 0 at padded frames."""
        h, _, pad = self._full(batch, deterministic=True)
        return h if pad is None else jnp.where(pad[..., None], 0, h)

    def student(self, batch: dict[str, jax.Array], *, deterministic: bool = False
                ) -> dict[str, Any]:
        """batch['mask']: bool [B, M, T]. Returns {'pred': [B*M, T, D], 'cls': None,
        'loss_mask': [B*M, T]} (masked and not padded); row b*M + j is clone j of b."""
        mask = jnp.asarray(batch["mask"], bool)
        b, m, t = mask.shape
        x, pad = self._features(batch)  # once per example, then cloned
        if x.shape[1] != t:
            raise ValueError(f"batch['mask'] has {t} frames but the audio [B, S] = "
                             f"{batch['audio'].shape} gives {x.shape[1]} conv frames")
        x = self.input_dropout(x, deterministic=deterministic)
        if m > 1:
            x = jnp.repeat(x, m, axis=0)
            pad = None if pad is None else jnp.repeat(pad, m, axis=0)
        mask = mask.reshape(b * m, t)
        if pad is not None:
            mask = mask & ~pad
        if self.version == "v1":
            pred = self._student_v1(x, mask, pad, deterministic)
        else:
            pred = self._student_v2(x, mask, pad, deterministic)
        return {"pred": pred, "cls": None, "loss_mask": mask}

    def _student_v1(self, x, mask, pad, deterministic):
        x = jnp.where(mask[..., None], self.mask_emb().astype(x.dtype), x)
        x = self._context(x, pad, deterministic)
        h, _ = self.encoder(x, None, pad, deterministic=deterministic)
        return self.head(h)

    def _student_v2(self, x, mask, pad, deterministic):
        bm, t, _ = x.shape
        # Static encoder length: every row drops num_remove frames. The masker
        # masks exactly int(r * n) of a row's n real frames; the rest of the
        # quota is taken from its padded frames (always enough, as int(r*T) -
        # int(r*n) <= T - n), which the encoder then never sees.
        num_remove = masking.num_masked_1d(t, self.config.masking.ratio)
        remove = mask
        if pad is not None:
            extra = num_remove - jnp.sum(mask, axis=1, keepdims=True)
            rank = jnp.cumsum(pad, axis=1) - 1
            remove = mask | (pad & (rank < extra))
        # fairseq encoder_zero_mask: the positional conv sees masked frames as 0.
        x_pos = self.context.positions(jnp.where(remove[..., None], 0, x), pad)
        keep = jnp.argsort(remove, axis=1, stable=True)[:, :t - num_remove]
        visible = jnp.take_along_axis(x + x_pos, keep[..., None], axis=1)
        visible = self.context.norm(visible, deterministic)
        kpm = None if pad is None else jnp.take_along_axis(pad, keep, axis=1)
        h, _ = self.encoder(visible, self.context.bias(keep), kpm, deterministic=deterministic)
        h = self.decoder_dropout(h, deterministic=deterministic)
        # Decoder input: encoder outputs back in place, removed frames ~ N(0, std).
        std = self.config.decoder.mask_noise_std
        full = std * jax.random.normal(self.make_rng("noise"), (bm, t, h.shape[-1]), h.dtype)
        full = full.at[jnp.arange(bm)[:, None], keep].set(h)
        if pad is not None:
            full = jnp.where(pad[..., None], 0, full)
        return self.decoder(full)
