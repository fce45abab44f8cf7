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


# `model.attention_impl`: "auto" (None in configs saved before it existed)
# picks cuDNN's fused flash attention where it can run, XLA elsewhere.
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# jax's cuDNN flash-attention checks (jax/_src/cudnn/fused_attention_stablehlo.py,
# `check_layout`, `check_is_flash_attention`): q/k/v bf16 or fp16; head dim a
# multiple of 8 and <= 128 (256 on Hopper and later: 128 is the bound that holds
# on every GPU); a bias must be [*, *, T, S] (no broadcast over T); the training
# rule needs even T and S "with a bias", and jax 0.10 passes an unused bias as a
# zero-size array, so in effect every differentiated call needs even lengths:
# `padded_attention` pads odd lengths to this multiple.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_HEAD_DIM_MULTIPLE = 8
CUDNN_MAX_HEAD_DIM = 128
CUDNN_SEQ_MULTIPLE = 2


def _platform(backend: str | None) -> str:
    """"cuda" for an NVIDIA GPU backend (the only one with cuDNN), else the name."""
    backend = backend or jax.default_backend()
    if backend == "gpu":
        try:
            version = jax.devices("gpu")[0].client.platform_version.lower()
        except RuntimeError:
            return backend
        return "rocm" if "rocm" in version else "cuda"
    return backend


def resolve_attention_impl(name: str | None, dtype, head_dim: int,
                           backend: str | None = None) -> str:
    """`model.attention_impl` -> "xla" | "cudnn". "auto" (or None) is cuDNN on an
    NVIDIA GPU when the shapes and dtype pass jax's flash-attention checks
    (bf16/fp16, head dim), else XLA; "xla" / "cudnn" are taken as given (an
    explicit "cudnn" that cannot run fails in jax, naming the reason)."""
    name = "auto" if name is None else name
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={name!r}; expected one of {list(ATTENTION_IMPLS)}")
    if name != "auto":
        return name
    ok = (_platform(backend) == "cuda" and jnp.dtype(dtype) in CUDNN_DTYPES
          and head_dim % CUDNN_HEAD_DIM_MULTIPLE == 0 and head_dim <= CUDNN_MAX_HEAD_DIM)
    return "cudnn" if ok else "xla"


def padded_attention(q, k, v, bias, key_padding_mask, implementation: str):
    """Self-attention [B, T, H, hd] in the form cuDNN's flash kernel accepts, for
    every shape our models produce; the same values as the plain masked call.

    - A key padding mask (True = padded) is right padding in every model (text
      and audio pad at the end; the 2.0 students keep positions in increasing
      order), so it goes in as `key_value_seq_lengths` (cuDNN's padding mask),
      not as a [B, 1, 1, S] bias, which cuDNN rejects (no broadcast over T).
    - A bias (BEiT relative position, ALiBi) is broadcast to [*, *, T, T].
    - The training kernel needs even lengths (see CUDNN_SEQ_MULTIPLE), so q, k,
      v (and the bias) of an odd length are zero-padded (197 -> 198 tokens,
      a 2.0 student's 49 visible tokens -> 50); the padded keys are excluded by
      the sequence lengths, the padded query rows sliced off (gradient 0).

    `implementation="xla"` runs this same path on XLA, which is how its
    numerics are tested on CPU.
    """
    b, t = q.shape[:2]
    lengths = None
    if key_padding_mask is not None:
        lengths = jnp.sum(~key_padding_mask, axis=-1, dtype=jnp.int32)
    if bias is not None:
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (t, t))
    pad = (-t) % CUDNN_SEQ_MULTIPLE
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
        if bias is not None:
            bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, pad)))
        if lengths is None:
            lengths = jnp.full((b,), t, jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :t]


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
        qkv = dense(3 * self.dim, ("embed", "qkv"), self.dtype, self.qkv_bias, name="qkv",
                    init=self.init)(x)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, self.num_heads, head_dim), 3, axis=2)
        q, k, v = (a[:, :, 0] for a in (q, k, v))  # [B, T, H, hd]
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
        out = dense(self.dim, ("qkv", "embed"), self.dtype, name="proj",
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
        x_in = x

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
        return x, target


# The primitive of jax's cuDNN flash-attention forward (jax 0.10); its outputs
# are the attention output and the f32 softmax statistics [B, H, T].
CUDNN_ATTENTION_FWD = "dot_product_attention_fwd_wrapper"


def save_low_precision_dots(prim, *avals, **params) -> bool:
    """Remat policy: save a matmul's output only when it is bf16/fp16, and the
    cuDNN attention's outputs. In a bf16 step those are the dense layers'
    outputs (qkv, proj, fc1, fc2) and the attention's probs @ v; the XLA
    attention's logits q.k^T, a [B, H, T, T] float32 product
    (`preferred_element_type=float32`), are recomputed. With cuDNN the fused
    forward's output and its [B, H, T] statistics are kept, so the backward does
    not run the flash forward again. In a float32 step nothing is saved (= "full")."""
    if prim.name == CUDNN_ATTENTION_FWD:
        return True
    if prim is not jax.lax.dot_general_p:
        return False
    out = params.get("preferred_element_type") or jnp.result_type(*avals)
    return jnp.dtype(out) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


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


def sincos_2d(grid: tuple[int, int], dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table [h*w, dim] (MAE / data2vec 2.0 images).

    Half the channels encode the row, half the column; each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 1 / 10000^(k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need model.dim divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def encode(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    # MAE's convention: the first half encodes the column (w), the second the row.
    return np.concatenate([encode(gw), encode(gh)], axis=1).astype(np.float32)


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """BEiT's [1+N, 1+N] index into a relative-position table with 3 extra
    entries for cls->token, token->cls and cls->cls."""
    h, w = grid
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
    rel = rel.transpose(1, 2, 0)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    n = h * w
    num_rel = (2 * h - 1) * (2 * w - 1)
    index = np.zeros((n + 1, n + 1), dtype=np.int32)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_rel
    index[0:, 0] = num_rel + 1
    index[0, 0] = num_rel + 2
    return index


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias: one table shared by all blocks (1.0
    pretraining), or with `num_tables=L` one per block (BEiT fine-tuning,
    HF `use_relative_position_bias`), stacked as [L, size, H]."""

    grid: tuple[int, int]
    num_heads: int
    num_tables: int = 0  # 0: one shared table [size, H]; L: [L, size, H]

    @nn.compact
    def __call__(self) -> jax.Array:
        h, w = self.grid
        size = (2 * h - 1) * (2 * w - 1) + 3
        lead = (self.num_tables,) if self.num_tables else ()
        names = ((None,) if self.num_tables else ()) + ("rel_pos", "heads")
        table = self.param(
            "relative_position_bias_table", kernel(names, nn.initializers.zeros_init()),
            lead + (size, self.num_heads))
        index = relative_position_index(self.grid)
        bias = table[..., index.reshape(-1), :].reshape(lead + index.shape + (self.num_heads,))
        bias = jnp.moveaxis(bias, -1, -3)  # [..., H, 1+N, 1+N]
        return bias[..., None, :, :, :]  # [1, H, 1+N, 1+N] or [L, 1, H, 1+N, 1+N]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (Press et al. 2022), as fairseq data2vec 2.0 `get_slopes`.

    For a power of two n: 2^(-8/n), 2^(-16/n), ...; otherwise the slopes of the
    closest smaller power of two p, then every other slope of 2p.
    """
    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** -(np.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads={num_heads} must be >= 1")
    if np.log2(num_heads).is_integer():
        slopes = power_of_2(num_heads)
    else:
        p = 2 ** int(np.floor(np.log2(num_heads)))
        slopes = power_of_2(p) + power_of_2(2 * p)[0::2][: num_heads - p]
    return np.asarray(slopes, np.float32)


def alibi_bias(positions: jax.Array, slopes: jax.Array) -> jax.Array:
    """Symmetric ALiBi attention bias [B, H, T, T] for 1-D token positions [B, T]:
    -slope_h * |pos_q - pos_k| (data2vec 2.0 audio, SPEC 6). Positions are the
    original frame indices, so a student that keeps only visible frames gets the
    rows and columns of the full-sequence bias."""
    dist = jnp.abs(positions[:, :, None] - positions[:, None, :]).astype(jnp.float32)
    return -slopes[None, :, None, None] * dist[:, None]
