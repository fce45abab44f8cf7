"""The speech modality: data2vec 1.0 and 2.0 on raw 16 kHz waveforms (SPEC 2-7).

Three parameter subtrees (the teacher uses all three, `TEACHER_MODULES`):

- `frontend`: the wav2vec 2.0 conv feature extractor (layer-norm mode, no conv
  bias), the feature LayerNorm and the projection to the model width. SPEC 4:
  shared, the teacher uses the student's features (`ema.shared = ("frontend",)`).
- `context`: the conv positional encoder (5 grouped conv layers, or wav2vec
  2.0's single wide conv), the embedding LayerNorm of the post-LN stack (then
  `model.prenet_dropout`), and for 2.0 the learned per-head ALiBi scale. 1.0
  (`ema_layers_only`) shares the positional convs as well:
  `ema.shared = ("frontend", "context/pos_conv*")`.
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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from d2v_jax.modalities.audio import masking
from d2v_jax.modalities.audio.frames import config_frame_count, frame_count
from d2v_jax.models import visible
from d2v_jax.models.decoder import ConvDecoder, GroupedConv, decoder_from_config, grouped_conv
from d2v_jax.models.attention import alibi_bias, alibi_slopes
from d2v_jax.models.layers import (Encoder, dense, dtype_of, encoder_from_config, kernel,
                                   layer_norm, torch_default_bias, torch_default_kernel)

TEACHER_MODULES = ("frontend", "context", "encoder")
POS_CONV_KINDS = ("stack", "single")


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, np.ndarray]:
    """A batch of the largest bucket's shape with valid masks, for `init`."""
    s = int(config.data.max_sample_size)
    t = config_frame_count(config, s)
    mask = np.zeros((batch_size, config.masking.num_clones, t), bool)
    mask[..., :t - masking.num_keep(config) if config.version == "v2" else t // 2] = True
    return {"audio": np.zeros((batch_size, s), np.float32),
            "padding_mask": np.zeros((batch_size, s), bool), "mask": mask}


def _grad_mult(x: jax.Array, mult: float) -> jax.Array:
    """Identity forward; gradient scaled by `mult` (fairseq feature_grad_mult)."""
    if mult == 1.0:
        return x
    if mult == 0.0:
        return jax.lax.stop_gradient(x)
    return x * mult + jax.lax.stop_gradient(x) * (1.0 - mult)


FRONTENDS = ("conv", "fbank")  # model.frontend: raw-waveform convs, or log-mel first


def mel_filterbank(num_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """[n_fft // 2 + 1, num_mels] triangular filters, equally spaced on the HTK
    mel scale (2595 log10(1 + f / 700)) from 0 Hz to Nyquist, peak 1."""
    mel = 2595.0 * np.log10(1.0 + np.array([0.0, sample_rate / 2.0]) / 700.0)
    hz = 700.0 * (10.0 ** (np.linspace(mel[0], mel[1], num_mels + 2) / 2595.0) - 1.0)
    bins = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (bins[None] - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - bins[None]) / np.maximum(hi - mid, 1e-9)
    return np.maximum(0.0, np.minimum(up, down)).T.astype(np.float32)


def log_mel(wav: jax.Array, num_mels: int, window: int, hop: int, sample_rate: int) -> jax.Array:
    """[B, S] -> [B, F, num_mels] log power of Hann-windowed frames of `window`
    samples every `hop` (VALID: F = (S - window) // hop + 1, the conv arithmetic)."""
    n_fft = 1 << (window - 1).bit_length()
    frames = (wav.shape[-1] - window) // hop + 1
    idx = np.arange(frames)[:, None] * hop + np.arange(window)[None]
    x = wav.astype(jnp.float32)[..., idx] * np.hanning(window + 2)[1:-1].astype(np.float32)
    power = jnp.square(jnp.abs(jnp.fft.rfft(x, n=n_fft, axis=-1)))
    return jnp.log(power @ mel_filterbank(num_mels, n_fft, sample_rate) + 1e-6)


class FeatureExtractor(nn.Module):
    """wav2vec 2.0 conv feature extractor (mode `layer_norm`), feature LayerNorm
    and projection: [B, S] -> [B, T, D] (SPEC 7).

    `frontend='fbank'` (not in the papers; for tiny CPU runs, see
    docs/results.md): layer 0 is a fixed log-mel filterbank of
    `conv_dims[0]` bands over Hann windows of `conv_kernels[0]` samples every
    `conv_strides[0]`, LayerNorm-ed per frame; the learned convs follow. Its
    frames change smoothly in time, where a raw-waveform conv at init follows
    the waveform's phase."""

    conv_dims: tuple[int, ...]
    conv_kernels: tuple[int, ...]
    conv_strides: tuple[int, ...]
    dim: int
    conv_bias: bool = False
    feature_grad_mult: float = 1.0
    dtype: str = "float32"
    frontend: str = "conv"
    sample_rate: int = 16_000

    @nn.compact
    def __call__(self, wav: jax.Array) -> jax.Array:
        dtype = dtype_of(self.dtype)
        x = wav[..., None].astype(dtype)
        for i, (c, k, s) in enumerate(zip(self.conv_dims, self.conv_kernels, self.conv_strides)):
            if i == 0 and self.frontend == "fbank":
                x = log_mel(wav, c, k, s, self.sample_rate)
                x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="fbank_norm")(x).astype(dtype)
                continue
            x = nn.Conv(c, (k,), strides=(s,), padding="VALID", use_bias=self.conv_bias,
                        dtype=dtype,
                        kernel_init=kernel((None, None, None), nn.initializers.kaiming_normal()),
                        name=f"conv_{i}")(x)
            # fairseq's Fp32LayerNorm over channels, per frame (no time mixing).
            x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=f"conv_norm_{i}")(x).astype(dtype)
            x = nn.gelu(x, approximate=False)
        x = _grad_mult(x, self.feature_grad_mult)
        x = layer_norm(1e-5, dtype, "feature_norm")(x)
        # PyTorch's Linear default: fairseq leaves wav2vec's post_extract_proj at
        # it (1.0) and resets data2vec 2.0's project_features to it.
        return dense(self.dim, (None, "embed"), dtype, name="proj", init=torch_default_kernel(),
                     bias_init=torch_default_bias(self.conv_dims[-1]))(x)


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


def zero_padded(x: jax.Array, padding: jax.Array | None, mode: str) -> jax.Array:
    """The front-end's frames x [B,T,D] as the positional encoder gets them
    (`model.pos_conv_zero_pad` = `mode`): padded frames zeroed ("layer",
    "input"), or left as the conv front-end made them from the zero-padded
    audio ("none", fairseq data2vec 2.0)."""
    if padding is None or mode == "none":
        return x
    return jnp.where(padding[..., None], 0, x)


class AudioContext(nn.Module):
    """Conv positional encoder, embedding LayerNorm, ALiBi scale (SPEC 6)."""

    dim: int
    num_heads: int
    pos_conv: str = "stack"  # "stack" (data2vec) or "single" (wav2vec 2.0)
    pos_conv_width: int = 95
    pos_conv_depth: int = 5
    pos_conv_groups: int = 16
    # Padded frames before / inside the positional convs (`model.pos_conv_zero_pad`):
    # "layer" zeroes them in the input and after every conv layer (ours), "input"
    # in the input only (wav2vec 2.0, data2vec 1.0, Hugging Face), "none" nowhere
    # (fairseq data2vec 2.0: they carry the features of the zero-padded audio).
    pos_conv_zero_pad: str = "layer"
    conv_impl: str = "xla"
    norm_eps: float = 1e-5
    dropout_rate: float = 0.0  # after the embedding LayerNorm (model.prenet_dropout)
    alibi: bool = False
    alibi_scale_init: float = 1.0
    dtype: str = "float32"

    def setup(self):
        m = self
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
        self.dropout = nn.Dropout(m.dropout_rate)
        if m.alibi:
            # One learned scale per head, shared by all blocks (fairseq
            # learned_alibi_scale_per_head), clamped at 0 when used.
            self.alibi_scale = self.param(
                "alibi_scale", kernel(("heads",), nn.initializers.constant(m.alibi_scale_init)),
                (m.num_heads,))

    def positions(self, x: jax.Array, padding: jax.Array | None) -> jax.Array:
        """The conv positional encoding of x [B,T,D] (added by the caller, who
        passes x through `zero_padded`); with `pos_conv_zero_pad="layer"` the
        padded frames are zeroed again after every layer, so they carry nothing
        into the real frames whatever the batch's padding."""
        every_layer = self.pos_conv_zero_pad == "layer"
        valid = None if padding is None or not every_layer else ~padding[..., None]

        def zero_pad(h):
            return h if valid is None else jnp.where(valid, h, 0)

        if self.pos_conv == "single":
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
        if not self.alibi:
            return None
        slopes = jnp.asarray(alibi_slopes(self.num_heads))
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
    """The speech model; `build(config)` makes it from an experiment config."""

    version: str  # "v1" or "v2"
    frontend: FeatureExtractor
    context: AudioContext
    encoder: Encoder
    decoder: ConvDecoder | None = None  # 2.0 only
    dropout_input: float = 0.0
    decoder_input_dropout: float = 0.0  # 2.0
    mask_ratio: float = 0.5  # 2.0: sets the static visible count (masking.num_keep_frames)
    mask_noise_std: float = 0.01  # 2.0: the decoder's fill at removed frames
    dtype: str = "float32"
    # Every position is a frame: no CLS to skip when pooling.
    cls_first = False

    def setup(self):
        dtype = dtype_of(self.dtype)
        dim = self.frontend.dim
        self.input_dropout = nn.Dropout(self.dropout_input)
        if self.version == "v1":
            self.mask_emb = MaskEmbedding(dim, name="mask_emb")
            # fairseq final_proj: a Linear outside the encoder, PyTorch's default init.
            self.head = dense(dim, ("embed", "embed_out"), dtype, name="head",
                              init=torch_default_kernel(), bias_init=torch_default_bias(dim))
        else:
            self.decoder_dropout = nn.Dropout(self.decoder_input_dropout)

    # -- shared pieces ----------------------------------------------------------
    def frame_padding(self, batch: dict[str, jax.Array], num_frames: int) -> jax.Array | None:
        """bool [B, T], True = padded frame, from the sample padding mask."""
        pad = batch.get("padding_mask")
        if pad is None:
            return None
        lengths = jnp.sum(~jnp.asarray(pad, bool), axis=-1)
        n = frame_count(lengths, self.frontend.conv_kernels, self.frontend.conv_strides)
        return jnp.arange(num_frames)[None, :] >= n[:, None]

    def _features(self, batch):
        x = self.frontend(batch["audio"])
        pad = self.frame_padding(batch, x.shape[1])
        return zero_padded(x, pad, self.context.pos_conv_zero_pad), pad

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

    def features(self, batch: dict[str, jax.Array]) -> jax.Array:
        """The feature extractor's projected frames [B, T, D] (before the
        positional encoder), 0 at padded frames unless `pos_conv_zero_pad="none"`."""
        return self._features(batch)[0]

    def encode(self, batch: dict[str, jax.Array], deterministic: bool = True) -> jax.Array:
        """Final hidden states [B, T, D] of the full input, 0 at padded frames;
        `deterministic=False`: with dropout and layer-drop (fine-tuning)."""
        h, _, pad = self._full(batch, deterministic=deterministic)
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
        num_keep = masking.num_keep_frames(t, self.mask_ratio)
        num_remove = t - num_keep
        remove = mask
        if pad is not None:
            extra = num_remove - jnp.sum(mask, axis=1, keepdims=True)
            rank = jnp.cumsum(pad, axis=1) - 1
            remove = mask | (pad & (rank < extra))
        # fairseq encoder_zero_mask: the positional conv sees masked frames as 0.
        x_pos = self.context.positions(jnp.where(remove[..., None], 0, x), pad)
        keep, removed = visible.split_indices(remove, num_keep)
        seen = self.context.norm(visible.gather(x + x_pos, keep), deterministic)
        kpm = None if pad is None else visible.gather(pad, keep)
        h, _ = self.encoder(seen, self.context.bias(keep), kpm, deterministic=deterministic)
        h = self.decoder_dropout(h, deterministic=deterministic)
        # Decoder input: encoder outputs back in place, removed frames ~ N(0, std).
        full = visible.scatter_with_noise(h, keep, removed, self.mask_noise_std,
                                          self.make_rng("noise"))
        if pad is not None:
            full = jnp.where(pad[..., None], 0, full)
        return self.decoder(full)


def feature_extractor(m: ml_collections.ConfigDict, sample_rate: int = 16_000) -> FeatureExtractor:
    """The feature extractor a `config.model` section describes (`sample_rate`:
    config.data's, for the filterbank of `model.frontend='fbank'`)."""
    return FeatureExtractor(tuple(m.conv_dims), tuple(m.conv_kernels), tuple(m.conv_strides),
                            m.dim, conv_bias=m.conv_bias, feature_grad_mult=m.feature_grad_mult,
                            dtype=m.dtype, frontend=m.get("frontend", "conv"),
                            sample_rate=int(sample_rate))


def build(config: ml_collections.ConfigDict) -> AudioData2Vec:
    """The speech model an experiment config describes (`config.model`,
    `config.decoder`, `config.masking`)."""
    m = config.model
    if m.pos_conv not in POS_CONV_KINDS:
        raise ValueError(f"model.pos_conv={m.pos_conv!r}; expected one of {POS_CONV_KINDS}")
    context = AudioContext(
        dim=m.dim, num_heads=m.num_heads, pos_conv=m.pos_conv, pos_conv_width=m.pos_conv_width,
        pos_conv_depth=m.pos_conv_depth, pos_conv_groups=m.pos_conv_groups,
        pos_conv_zero_pad=m.get("pos_conv_zero_pad", "layer"), conv_impl=m.conv_impl,
        norm_eps=m.norm_eps, dropout_rate=m.get("prenet_dropout", m.dropout), alibi=m.alibi,
        alibi_scale_init=m.alibi_scale_init, dtype=m.dtype)
    encoder = encoder_from_config(m, dtype=dtype_of(m.dtype))
    common = dict(dropout_input=m.dropout_input, dtype=m.dtype)
    if config.version == "v1":
        return AudioData2Vec("v1", feature_extractor(m, config.data.sample_rate), context, encoder, **common)
    d = config.decoder
    # grid (-1,): a 1-D decoder over whatever frame count the batch has.
    decoder = decoder_from_config(d, (-1,), m.dim, dtype_of(m.dtype))
    return AudioData2Vec("v2", feature_extractor(m, config.data.sample_rate), context, encoder, decoder,
                         decoder_input_dropout=d.input_dropout, mask_ratio=config.masking.ratio,
                         mask_noise_std=d.mask_noise_std, **common)
