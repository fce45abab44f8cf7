"""Transformer building blocks shared by every modality.

Parameters carry logical axis names (`nn.with_logical_partitioning`) so that
`parallel.py` maps them onto a mesh by a rule table; on one device the names are
inert metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax.errors import check_field
from d2v_jax.models.sharding import constrain
from d2v_jax.models.attention import (ATTENTION_IMPLS,  # noqa: F401 (config.py reads it here)
                                      padded_attention, resolve_attention_impl,
                                      save_low_precision_dots)

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# `model.dtype` names: a concrete dtype, or "auto" (resolved per backend).
DTYPE_NAMES = tuple(sorted(DTYPES)) + ("auto",)
# "auto": bfloat16 where the matmul units run it natively (GPU tensor cores, TPU
# MXU), float32 on CPU, where bf16 is emulated and slower. Params, EMA, optimizer
# state and the loss are float32 whatever the compute dtype.
AUTO_DTYPE = {"cpu": "float32", "gpu": "bfloat16", "cuda": "bfloat16", "rocm": "bfloat16",
              "tpu": "bfloat16"}


def resolve_dtype(name: str, backend: str | None = None) -> str:
    """`model.dtype` -> a concrete dtype name. "auto" reads `backend` (default:
    `jax.default_backend()`, at the time the model is built/traced); an unknown
    backend resolves to float32 (the dtype that runs everywhere)."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"model.dtype={name!r}; expected one of {list(DTYPE_NAMES)}")
    if name != "auto":
        return name
    return AUTO_DTYPE.get(backend or jax.default_backend(), "float32")


def dtype_of(name: str) -> Dtype:
    """`model.dtype` (a name, or "auto") -> the jnp compute dtype. Every model
    reads its compute dtype through here, so "auto" is resolved in one place."""
    return DTYPES[resolve_dtype(name)]


def normal_init(std: float, truncation: float | None = None) -> Callable:
    """N(0, std^2), truncated at +-`truncation` standard deviations when given.

    fairseq data2vec (`init_bert_params`) draws Linear and Embedding weights
    from an untruncated N(0, 0.02); BEiT / data2vec 1.0 vision uses timm's
    `trunc_normal_(std=0.02, a=-std, b=std)` (`beit/modeling_cyclical.py`),
    i.e. truncation 1.0: every value within +-0.02 (SPEC 7).
    """
    if truncation is None:
        return nn.initializers.normal(std)
    if truncation <= 0:
        raise ValueError(f"model.init_truncation={truncation} must be > 0 (or None)")
    return nn.initializers.truncated_normal(std, lower=-truncation, upper=truncation)


def scaled_init(init: Callable, scale) -> Callable:
    """`init` times `scale` (a Python float or a traced per-block value)."""
    if isinstance(scale, (int, float)) and scale == 1:
        return init
    return lambda key, shape, dtype=jnp.float32: (init(key, shape, dtype) * scale).astype(dtype)


def torch_default_kernel() -> Callable:
    """PyTorch's default Linear / Conv weight init, kaiming_uniform_(a=sqrt(5)):
    U(+-1/sqrt(fan_in)); fan_in = every axis but the last (output) one."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2,
                                            out_axis=-1)


def torch_default_bias(fan_in: int) -> Callable:
    """PyTorch's default Linear / Conv bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)


# fairseq init_bert_params: Linear and Embedding weights ~ N(0, 0.02), untruncated.
# A model's blocks take theirs from `model.init_std` / `model.init_truncation`.
dense_init = normal_init(0.02)


def kernel(names: tuple[str, ...], init: Callable = dense_init) -> Callable:
    return nn.with_logical_partitioning(init, names)


def zeros(names: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones(names: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def layer_norm(eps: float, dtype: Dtype, name: str | None = None, affine: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, use_bias=affine, use_scale=affine, name=name,
        scale_init=ones(("embed",)), bias_init=zeros(("embed",)))


def dense(features: int, names: tuple[str, str], dtype: Dtype, use_bias: bool = True,
          name: str | None = None, init: Callable = dense_init,
          bias_init: Callable | None = None) -> nn.Dense:
    """Linear layer; weights from `init`, bias from `bias_init` (default zeros)."""
    b_init = zeros(names[-1:]) if bias_init is None else kernel(names[-1:], bias_init)
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=kernel(names, init), bias_init=b_init)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample."""

    @nn.compact
    def __call__(self, x: jax.Array, rate: jax.Array, deterministic: bool) -> jax.Array:
        # A static rate of 0 draws nothing (a traced rate cannot be tested here:
        # `Block.use_drop_path` skips the module when the encoder's max rate is 0).
        if deterministic or (isinstance(rate, (int, float)) and rate == 0):
            return x
        # `rate` may be traced (it is scanned per block), so no Python branch on it.
        keep = 1.0 - rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        draw = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(draw, x / keep, 0).astype(x.dtype)


class QKVProjection(nn.Module):
    """The fused q/k/v projection: `kernel` [D, 3D] and `bias` [3D] as one
    Linear(D, 3D) (the released layouts' `qkv` / the q, k, v projections
    side by side, column blocks q | k | v, each head-major), applied as an
    einsum over the kernel's [D, 3, H, hd] view.

    The view is what lets tensor parallelism split *heads*: the fused axis
    cut into contiguous pieces would split q | k | v, not heads, and every
    block would gather its qkv activations. Stored, the fused axis is whole
    (logical name `qkv`, replicated by the default rules); the view is
    pinned to `heads` (a local slice, no communication), and so are the
    outputs [B, T, 3, H, hd] (models/sharding.py)."""

    dim: int
    num_heads: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    init: Callable = dense_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        head_dim = self.dim // self.num_heads
        w = self.param("kernel", kernel(("embed", "qkv"), self.init), (x.shape[-1], 3 * self.dim))
        w = constrain(w.reshape(x.shape[-1], 3, self.num_heads, head_dim),
                      ("embed", None, "heads", None))
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        y = jnp.einsum("btd,dshk->btshk", x, w)
        if self.use_bias:
            b = self.param("bias", zeros(("qkv",)), (3 * self.dim,))
            y = y + b.reshape(3, self.num_heads, head_dim).astype(self.dtype)
        return constrain(y, ("batch", None, None, "heads", None))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    `attn_dropout` acts on the attention probabilities, `dropout` on the
    output projection (the residual dropout: fairseq `dropout` / AltAttention
    `proj_drop`). `proj_init_scale` multiplies the output projection's initial
    weights (BEiT's 1/sqrt(2 l), `Encoder.init_depth_rescale`)."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    attn_dropout: float = 0.0
    dropout: float = 0.0
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    init: Callable = dense_init

    @nn.compact
    def __call__(self, x, bias=None, key_padding_mask=None, *, deterministic: bool,
                 proj_init_scale=1.0):
        b, t, _ = x.shape
        head_dim = self.dim // self.num_heads
        qkv = QKVProjection(self.dim, self.num_heads, self.qkv_bias, self.dtype, self.init,
                            name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, hd]
        mask = None
        if key_padding_mask is not None:  # True = padded key -> may not be attended
            mask = ~key_padding_mask[:, None, None, :]
        if bias is not None:
            bias = bias.astype(q.dtype)
        if self.attn_dropout > 0 and not deterministic:
            # The fused kernels have no dropout; spell the softmax out.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(q.dtype)
            if bias is not None:
                logits = logits + bias
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            probs = jax.nn.softmax(logits.astype(jnp.float32)).astype(q.dtype)
            probs = nn.Dropout(self.attn_dropout)(probs, deterministic=False)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        else:
            impl = resolve_attention_impl(self.attention_impl, q.dtype, head_dim)
            if impl == "cudnn":
                out = padded_attention(q, k, v, bias, key_padding_mask, "cudnn")
            else:
                out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                                   implementation=impl)
        out = out.reshape(b, t, self.dim)
        # Row-parallel under tensor parallelism: the input axis is head-major.
        out = dense(self.dim, ("heads", "embed"), self.dtype, name="proj",
                    init=scaled_init(self.init, proj_init_scale))(out)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> activation dropout -> fc2 (fairseq's
    `activation_dropout`, SPEC 7; 0 in every official config). The residual
    dropout after fc2 is the caller's (`Block`), as the FFN output before it is
    the data2vec target of a post-LN block."""

    dim: int
    hidden: int
    activation_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    init: Callable = dense_init

    @nn.compact
    def __call__(self, x, *, deterministic: bool, fc2_init_scale=1.0):
        x = dense(self.hidden, ("embed", "mlp"), self.dtype, name="fc1", init=self.init)(x)
        x = nn.gelu(x, approximate=False)  # PyTorch's default GELU is the exact one
        x = nn.Dropout(self.activation_dropout)(x, deterministic=deterministic)
        return dense(self.dim, ("mlp", "embed"), self.dtype, name="fc2",
                     init=scaled_init(self.init, fc2_init_scale))(x)


class Block(nn.Module):
    """One Transformer block returning `(x, target)`.

    `target` is the tensor data2vec regresses from this block (SPEC 2): for a
    pre-LN block (1.0 vision, BEiT) the block's full output after the residual
    (layer scale included); for a post-LN block (audio, text, every 2.0 model)
    the FFN output before the residual dropout, the residual add and the
    block's final LayerNorm.

    Regularization, where fairseq / BEiT put it: `attn_dropout` on the
    attention probabilities; `dropout` (residual dropout) on the attention
    output projection and on the FFN output; `activation_dropout` after the
    FFN's GELU; drop path on each residual branch; `layerdrop`: with that
    probability the whole block is skipped (its output is its input), one
    draw per block and forward pass as fairseq's `np.random.random() >
    layerdrop`, done with a select so that shapes stay static under scan.
    None of them acts when `deterministic` (the teacher, `encode`).

    Written as a scan body: `carry = x`, per-block inputs `(drop_path_rate,
    init_scale)`; `init_scale` multiplies the initial weights of `attn.proj`
    and `mlp.fc2` (BEiT's `fix_init_weight`: 1/sqrt(2 l) for block l, 1-based).
    """

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_first: bool = False
    layer_scale_init: float = 0.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    attn_dropout: float = 0.0
    activation_dropout: float = 0.0
    layerdrop: float = 0.0
    attention_impl: str | None = None
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    init_std: float = 0.02
    init_truncation: float | None = None
    # Static: False when every block's DropPath rate is 0 (model.drop_path = 0),
    # so the step draws no per-sample bernoulli at all. The per-block rate itself
    # is traced (scanned), so it cannot decide this.
    use_drop_path: bool = True

    @nn.compact
    def __call__(self, x, drop_path_rate=0.0, init_scale=1.0, bias=None, key_padding_mask=None):
        det = self.deterministic
        init = normal_init(self.init_std, self.init_truncation)
        attn = Attention(self.dim, self.num_heads, self.qkv_bias, self.attn_dropout,
                         self.dropout, self.attention_impl, self.dtype, init, name="attn")
        mlp = Mlp(self.dim, int(self.dim * self.mlp_ratio), self.activation_dropout, self.dtype,
                  init, name="mlp")
        norm1 = layer_norm(self.norm_eps, self.dtype, "norm1")
        norm2 = layer_norm(self.norm_eps, self.dtype, "norm2")
        residual_dropout = nn.Dropout(self.dropout)
        if self.use_drop_path:
            drop_path = DropPath()
        else:
            def drop_path(h, rate, deterministic):
                return h
        x = x_in = constrain(x)

        def scale(name, h):
            if self.layer_scale_init <= 0:
                return h
            init = nn.with_logical_partitioning(
                nn.initializers.constant(self.layer_scale_init), ("embed",))
            return h * self.param(name, init, (self.dim,)).astype(h.dtype)

        if self.layer_norm_first:
            h = attn(norm1(x), bias, key_padding_mask, deterministic=det,
                     proj_init_scale=init_scale)
            x = x + drop_path(scale("gamma_1", h), drop_path_rate, det)
            h = mlp(norm2(x), deterministic=det, fc2_init_scale=init_scale)
            h = residual_dropout(h, deterministic=det)
            x = x + drop_path(scale("gamma_2", h), drop_path_rate, det)
            target = x
        else:
            h = attn(x, bias, key_padding_mask, deterministic=det, proj_init_scale=init_scale)
            x = norm1(x + drop_path(h, drop_path_rate, det))
            h = mlp(x, deterministic=det, fc2_init_scale=init_scale)
            target = h
            h = residual_dropout(h, deterministic=det)
            x = norm2(x + drop_path(h, drop_path_rate, det))
        if self.layerdrop > 0 and not det:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.layerdrop)
            x = jnp.where(keep, x, x_in)
        # The residual stream and the targets stay split by rows (models/sharding.py).
        return constrain(x), constrain(target)


# `model.remat`: what the scanned block keeps for the backward pass (jax.checkpoint
# policies on `Block`); "none" keeps every intermediate (no remat).
REMAT_POLICIES = {
    "none": None,
    # Save nothing inside a block: recompute it in the backward pass.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep every matmul output, recompute the cheap elementwise work.
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "block": jax.checkpoint_policies.checkpoint_dots,  # save_dots' older name
    # Keep the dense layers' outputs (matmuls without batch dims); recompute the
    # attention's batched einsums (the [B, H, T, T] logits and probabilities).
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep only bf16/fp16 matmul outputs (see save_low_precision_dots).
    "save_bf16_dots": save_low_precision_dots,
}


class Encoder(nn.Module):
    """A stack of `depth` identical blocks under `nn.scan` (one compiled block).

    Returns the final hidden states [B,T,D] and the per-block target tensors
    stacked as [L,B,T,D], ready for `targets.make_targets`.

    Init: Linear weights ~ N(0, init_std^2), truncated at +-init_truncation
    std when set; `init_depth_rescale` divides `attn.proj` and `mlp.fc2` of
    block l (1-based) by sqrt(2 l), BEiT's `fix_init_weight` (SPEC 7).
    """

    depth: int
    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_first: bool = False
    layer_scale_init: float = 0.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    attn_dropout: float = 0.0
    activation_dropout: float = 0.0
    drop_path: float = 0.0
    layerdrop: float = 0.0
    remat: str = "none"
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    init_std: float = 0.02
    init_truncation: float | None = None
    init_depth_rescale: bool = False
    # True: `bias` has a leading layer axis [L, ...], one attention bias per block
    # (BEiT fine-tuning's per-block relative position bias); else one for all.
    bias_per_layer: bool = False

    @nn.compact
    def __call__(self, x, bias=None, key_padding_mask=None, *, deterministic: bool):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, 0, 0 if self.bias_per_layer else nn.broadcast, nn.broadcast),
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(
            dim=self.dim, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias, layer_norm_first=self.layer_norm_first,
            layer_scale_init=self.layer_scale_init, norm_eps=self.norm_eps,
            dropout=self.dropout, attn_dropout=self.attn_dropout,
            activation_dropout=self.activation_dropout, layerdrop=self.layerdrop,
            attention_impl=self.attention_impl, deterministic=deterministic,
            dtype=self.dtype, init_std=self.init_std, init_truncation=self.init_truncation,
            use_drop_path=self.drop_path > 0, name="blocks")
        # Linearly increasing stochastic depth, as BEiT / data2vec.
        rates = jnp.linspace(0.0, self.drop_path, self.depth, dtype=jnp.float32)
        layer = jnp.arange(1, self.depth + 1, dtype=jnp.float32)
        scales = (1.0 / jnp.sqrt(2.0 * layer) if self.init_depth_rescale
                  else jnp.ones((self.depth,), jnp.float32))
        return blocks(x, rates, scales, bias, key_padding_mask)


def encoder_from_config(m, *, layer_norm_first: bool = False, layer_scale_init: float = 0.0,
                        dtype: Dtype = jnp.float32, bias_per_layer: bool = False) -> Encoder:
    """The `Encoder` that a `config.model` section describes. Block style is the
    caller's: pre-LN + layer scale for 1.0 vision, post-LN (the defaults) for
    every other model. Fields newer than a saved config (activation_dropout,
    layerdrop, init_*) default to off / fairseq's N(0, 0.02)."""
    return Encoder(
        depth=m.depth, dim=m.dim, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
        qkv_bias=m.qkv_bias, layer_norm_first=layer_norm_first,
        layer_scale_init=layer_scale_init, norm_eps=m.norm_eps, dropout=m.dropout,
        attn_dropout=m.attn_dropout, activation_dropout=m.get("activation_dropout", 0.0),
        drop_path=m.drop_path, layerdrop=m.get("layerdrop", 0.0), remat=m.remat,
        attention_impl=m.attention_impl, dtype=dtype, init_std=m.get("init_std", 0.02),
        init_truncation=m.get("init_truncation", None),
        init_depth_rescale=m.get("init_depth_rescale", False), bias_per_layer=bias_per_layer)


def linear_init(m) -> Callable:
    """The weight init of a model's Linear layers outside the blocks (heads),
    from the same `model.init_std` / `model.init_truncation` fields."""
    return normal_init(m.get("init_std", 0.02), m.get("init_truncation", None))


def validate_encoder(config) -> None:
    """The checks of the `model` fields the shared blocks read (ConfigError)."""
    m = config.model
    for key in ("dropout", "attn_dropout", "activation_dropout", "drop_path"):
        v = m.get(key, 0.0)
        check_field(0.0 <= v < 1.0, f"model.{key}", f"{v} is not in [0, 1)")
    v = m.get("layerdrop", 0.0)
    check_field(0.0 <= v <= 1.0, "model.layerdrop", f"{v} is not in [0, 1]")
    v = m.get("init_std", 0.02)
    check_field(v > 0, "model.init_std", f"{v} must be > 0")
    v = m.get("init_truncation", None)
    check_field(v is None or v > 0, "model.init_truncation",
                f"{v} must be > 0 (in standard deviations) or None (untruncated)")
