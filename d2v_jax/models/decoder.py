"""The data2vec 2.0 convolutional decoder (SPEC 6).

The student encoder runs on visible tokens only; the decoder receives the full
grid (visible outputs scattered back, masked positions filled with small noise)
and predicts the teacher's targets everywhere. Each layer is a grouped conv
(kernel k, same padding) -> LayerNorm without affine -> GELU, with a residual
where input and output widths match (`decoder.residual`; text 2.0 has none),
then the projection to the model width (one Linear; text 2.0: Linear(D, 2D)
-> GELU -> Linear(2D, D)). Dropout on the decoder's input (`decoder.input_dropout`)
is the caller's: it acts on the encoder outputs before the masked slots are filled.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax.errors import check_field
from d2v_jax.models.layers import (dense, dense_init, kernel, torch_default_bias,
                                   torch_default_kernel)
from d2v_jax.models.sharding import batch_local, constrain

CONV_IMPLS = ("xla", "einsum", "dense")
INITS = ("torch", "normal")  # decoder.conv_init (GroupedConv.init), decoder.proj_init


def grouped_conv(x: jax.Array, w: jax.Array, groups: int, impl: str = "xla") -> jax.Array:
    """Grouped convolution, stride 1, 'SAME' padding, channels last.

    x: [B, *grid, C_in]; w: [*k, C_in // groups, C_out], the `nn.Conv` layout, so
    checkpoints are the same whichever `impl` computes it:
      xla:    `lax.conv_general_dilated(feature_group_count=groups)`; the right
              choice on GPU/TPU.
      einsum: k^d shifted views and one batched GEMM per group.
      dense:  an ungrouped conv with a block-diagonal kernel (zeros between
              groups): `groups` x the FLOPs, but XLA:CPU lowers the grouped-conv
              backward to a slow path, and at the tiny decoder's shapes this is
              ~10x faster there than `xla` (einsum ~5x).
    """
    cin_g, cout = w.shape[-2:]
    if x.shape[-1] != cin_g * groups or cout % groups:
        raise ValueError(f"grouped_conv: input channels {x.shape[-1]} and output channels "
                         f"{cout} must both split into {groups} groups (kernel {w.shape})")
    # Each device convolves its own rows with the whole kernel (models/sharding.py).
    return batch_local(lambda x, w: _grouped_conv(x, w, groups, impl), x, w)


def _grouped_conv(x: jax.Array, w: jax.Array, groups: int, impl: str) -> jax.Array:
    ks = w.shape[:-2]
    nd = len(ks)
    cin_g, cout = w.shape[-2:]
    cout_g = cout // groups
    spatial = "DHW"[-nd:]
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    if impl == "xla":
        return jax.lax.conv_general_dilated(x, w, (1,) * nd, "SAME", dimension_numbers=dn,
                                            feature_group_count=groups)
    if impl == "dense":
        # Output block g reads only input block g: w_full[..., i, o] = w[..., i % cin_g, o]
        # when i // cin_g == o // cout_g, else 0.
        block = jnp.kron(jnp.eye(groups, dtype=w.dtype), jnp.ones((cin_g, cout_g), w.dtype))
        w_full = jnp.tile(w, (1,) * nd + (groups, 1)) * block
        return jax.lax.conv_general_dilated(x, w_full, (1,) * nd, "SAME", dimension_numbers=dn)
    if impl != "einsum":
        raise ValueError(f"decoder.conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    grid = x.shape[1:-1]
    # 'SAME' at stride 1 pads (k-1)//2 before and the rest after, as XLA does.
    pads = [(0, 0)] + [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in ks] + [(0, 0)]
    xp = jnp.pad(x, pads)
    views = [xp[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, grid))]
             for offset in itertools.product(*(range(k) for k in ks))]
    kk = len(views)
    v = jnp.stack(views, axis=-2).reshape(-1, kk, groups, cin_g)  # [n, K, G, c]
    v = v.transpose(2, 0, 1, 3).reshape(groups, v.shape[0], kk * cin_g)
    wk = w.reshape(kk, cin_g, groups, cout_g).transpose(2, 0, 1, 3).reshape(groups, kk * cin_g, cout_g)
    y = jnp.einsum("gnk,gko->ngo", v, wk)
    return y.reshape(x.shape[:-1] + (cout,))


class GroupedConv(nn.Module):
    """`nn.Conv(features, k, padding='SAME', feature_group_count=groups)` with the
    same parameters (kernel [*k, C_in/G, features], bias [features]) and a
    selectable implementation (see `grouped_conv`).

    Init `torch` (default): PyTorch's Conv default, weights and bias
    U(+-1/sqrt(fan_in)) with fan_in = prod(k) * C_in / G: fairseq never
    re-initializes the decoder's and the audio positional encoder's convs
    (`init_bert_params` touches only Linear and Embedding). `normal`: N(0, 0.02)
    weights, zero bias (this code's former init)."""

    features: int
    kernel_size: Sequence[int]
    groups: int
    impl: str = "xla"
    dtype: Any = jnp.float32
    init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nd = len(self.kernel_size)
        shape = tuple(self.kernel_size) + (x.shape[-1] // self.groups, self.features)
        fan_in = int(np.prod(shape[:-1]))
        if self.init == "torch":
            w_init, b_init = torch_default_kernel(), torch_default_bias(fan_in)
        elif self.init == "normal":
            w_init, b_init = dense_init, nn.initializers.zeros_init()
        else:
            raise ValueError(f"GroupedConv init {self.init!r}; expected one of {INITS}")
        w = self.param("kernel", kernel((None,) * nd + ("embed", "mlp"), w_init), shape)
        b = self.param("bias", kernel(("mlp",), b_init), (self.features,))
        x = x.astype(self.dtype)
        y = grouped_conv(x, jnp.asarray(w, self.dtype), self.groups, self.impl)
        return constrain(y + jnp.asarray(b, self.dtype))


class ConvDecoder(nn.Module):
    """Grouped conv decoder over a 1-D (audio, text) or 2-D (image) grid
    (fairseq `Decoder1d` / `Decoder2d`, SPEC 6).

    `grid` is the spatial shape: (T,) for sequences, (h, w) for images. Each
    layer: conv -> LayerNorm (no affine) -> GELU, plus the layer's input when
    `residual` and the widths match. Then the projection: `projection_layers`
    Linear layers, the first `projection_layers - 1` followed by GELU, the
    first of them widening by `projection_ratio` (text 2.0: Linear(D, 2D) ->
    GELU -> Linear(2D, D)); the last one is always named `proj`, the hidden
    ones `proj_0`, `proj_1`, ... Projection init (`proj_init`): `torch`
    (PyTorch's Linear default; fairseq's image and audio decoders call
    `reset_parameters`) or `normal` (N(0, 0.02): the text decoder keeps
    `init_bert_params`' init, fairseq `TextEncoder.reset_parameters`).
    """

    grid: Sequence[int]
    dim: int
    out_dim: int
    kernel_size: int
    layers: int
    groups: int
    residual: bool = True
    conv_impl: str = "xla"
    norm_eps: float = 1e-5  # torch LayerNorm default, as fairseq's decoder
    dtype: Any = jnp.float32
    projection_layers: int = 1
    projection_ratio: float = 2.0
    proj_init: str = "torch"
    conv_init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        grid = tuple(self.grid)
        x = x.reshape((b,) + grid + (c,))
        residual = x
        # A short Python loop: the first layer changes width, so the layers are
        # not one scannable stack, and there are only a handful of them.
        for i in range(self.layers):
            x = GroupedConv(self.dim, (self.kernel_size,) * len(grid), self.groups,
                            impl=self.conv_impl, dtype=self.dtype, init=self.conv_init,
                            name=f"conv_{i}")(x)
            x = nn.LayerNorm(epsilon=self.norm_eps, use_bias=False, use_scale=False,
                             dtype=self.dtype)(x)
            x = nn.gelu(x, approximate=False)
            if self.residual and residual.shape[-1] == x.shape[-1]:
                x = x + residual
            residual = x
        x = x.reshape(b, n, self.dim)
        width = self.dim
        for i in range(self.projection_layers - 1):
            nxt = int(width * self.projection_ratio) if i == 0 else width
            x = nn.gelu(self._linear(nxt, width, f"proj_{i}")(x), approximate=False)
            width = nxt
        return self._linear(self.out_dim, width, "proj")(x)

    def _linear(self, features: int, fan_in: int, name: str) -> nn.Dense:
        if self.proj_init == "torch":
            return dense(features, ("mlp", "embed"), self.dtype, name=name,
                         init=torch_default_kernel(), bias_init=torch_default_bias(fan_in))
        if self.proj_init != "normal":
            raise ValueError(f"decoder.proj_init must be one of {INITS}, got {self.proj_init!r}")
        return dense(features, ("mlp", "embed"), self.dtype, name=name)


def decoder_from_config(d, grid: Sequence[int], out_dim: int, dtype: Any) -> ConvDecoder:
    """The `ConvDecoder` a `config.decoder` section describes, over `grid`
    ((h, w) for images, (T,) or (-1,) for sequences), predicting `out_dim`.
    Fields newer than a saved config default to fairseq's `D2vDecoderConfig`."""
    return ConvDecoder(tuple(grid), d.dim, out_dim, d.kernel, d.layers, d.groups, d.residual,
                       conv_impl=d.conv_impl, dtype=dtype,
                       projection_layers=d.get("projection_layers", 1),
                       projection_ratio=d.get("projection_ratio", 2.0),
                       proj_init=d.get("proj_init", "torch"),
                       conv_init=d.get("conv_init", "torch"))


def validate_decoder(config) -> None:
    """The checks a 2.0 config's `decoder` section must pass (ConfigError)."""
    d, dim = config.decoder, config.model.dim
    check_field(d.dim % d.groups == 0, "decoder.groups",
                f"decoder.dim={d.dim} is not divisible by groups={d.groups}")
    check_field(dim % d.groups == 0, "decoder.groups",
                f"model.dim={dim} is not divisible by decoder.groups={d.groups}")
    check_field(d.get("projection_layers", 1) >= 1, "decoder.projection_layers",
                f"{d.get('projection_layers')} < 1")
    check_field(d.get("projection_ratio", 2.0) > 0, "decoder.projection_ratio",
                f"{d.get('projection_ratio')} must be > 0")
    check_field(d.get("proj_init", "torch") in INITS, "decoder.proj_init",
                f"{d.get('proj_init')!r} not in {INITS}")
    check_field(d.get("conv_init", "torch") in INITS, "decoder.conv_init",
                f"{d.get('conv_init')!r} not in {INITS}")
    v = d.get("input_dropout", 0.0)
    check_field(0.0 <= v < 1.0, "decoder.input_dropout", f"{v} is not in [0, 1)")
