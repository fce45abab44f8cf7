"""Attention kernels and biases: which implementation runs the attention
(`model.attention_impl`: XLA or cuDNN's fused flash attention), the padded
call that fits every model's shapes to cuDNN, the remat policy that keeps the
cuDNN forward's outputs, and ALiBi biases (data2vec 2.0 audio). The `Attention`
module that calls them is in `layers.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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
