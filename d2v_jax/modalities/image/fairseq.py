"""fairseq data2vec 2.0 (image) checkpoints -> our params and ema_params.

A fairseq `Data2VecMultiModel` state dict (`torch.load(path)["model"]`) holds
the student under `modality_encoders.IMAGE.*`, `blocks.{i}.*` (and `norm.*` for
pre-LN models), and the EMA teacher's fp32 copy under `_ema`: either with the
same names (minus the decoder and, unless `ema_local_encoder`, the patch
embedding) or, with `ema_encoder_only`, just the blocks as `{i}.*`. The tables
are in docs/convert.md.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from d2v_jax.convert.common import (ConversionError, StateReader, base_config, check_tree,
                                    expected_params, stack)
from d2v_jax.models.layers import sincos_2d
from d2v_jax.train_state import ema_keys

IMAGE = "modality_encoders.IMAGE."
KEY_PREFIX = IMAGE  # `d2v_jax.convert.from_fairseq` picks this mapping by it


def matches(state: Mapping[str, Any]) -> bool:
    """Whether `state` is a data2vec_multi checkpoint with an image encoder."""
    return any(k.startswith(IMAGE) for k in state)


def _cfg_get(cfg: Any, *path: str, default=None):
    """A field of fairseq's saved cfg (omegaconf or dict), or `default`."""
    node = cfg
    for p in path:
        if node is None:
            return default
        node = node.get(p) if isinstance(node, Mapping) else getattr(node, p, None)
    return default if node is None else node


def _num_blocks(keys, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in keys
           if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    if ids != set(range(len(ids))):
        raise ConversionError(f"fairseq state dict: block indices under {prefix!r} are {sorted(ids)}")
    return len(ids)


def image_config(state: Mapping[str, Any], num_heads: int | None = None,
                 cfg: Any = None) -> ml_collections.ConfigDict:
    """Our v2 image config from the tensor shapes (and fairseq's cfg, if saved)."""
    if f"{IMAGE}local_encoder.proj.weight" not in state:
        raise ConversionError("fairseq state dict: no 'modality_encoders.IMAGE.local_encoder."
                              "proj.weight'; only data2vec 2.0 image checkpoints are supported")
    for key in state:
        if key.startswith(IMAGE) and ("alibi" in key or ".context_encoder.blocks." in key):
            raise ConversionError(f"fairseq state dict: {key!r}: image ALiBi / prenet blocks "
                                  "have no counterpart in our 2.0 ViT")
    if "norm.weight" in state:
        raise ConversionError("fairseq state dict: 'norm.weight' means layer_norm_first=True; "
                              "our 2.0 image model is post-LN")
    proj = state[f"{IMAGE}local_encoder.proj.weight"]
    dim, channels, patch, _ = tuple(proj.shape)
    n = tuple(state[f"{IMAGE}fixed_positional_encoder.positions"].shape)[1]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ConversionError(f"fairseq state dict: {n} positions is not a square grid")
    depth = _num_blocks(state, "blocks.")
    hidden = tuple(state["blocks.0.mlp.fc1.weight"].shape)[0]
    num_heads = num_heads or _cfg_get(cfg, "model", "num_heads")
    if num_heads is None:
        raise ConversionError("fairseq state dict: the head count is not stored in the weights; "
                              "pass num_heads= (or the checkpoint with its 'cfg')")
    dec_layers = _num_blocks(state, f"{IMAGE}decoder.blocks.")
    w0 = tuple(state[f"{IMAGE}decoder.blocks.0.0.weight"].shape)  # [Ddec, D/G, k, k]
    config = base_config("image", "base_v2")
    with config.unlocked():
        m = config.model
        m.image_size, m.patch_size, m.channels = side * patch, patch, channels
        m.dim, m.depth, m.num_heads = dim, depth, int(num_heads)
        m.mlp_ratio = hidden / dim
        m.norm_eps = float(_cfg_get(cfg, "model", "norm_eps", default=1e-6))
        m.drop_path = 0.0
        d = config.decoder
        d.dim, d.kernel, d.layers, d.groups = w0[0], w0[2], dec_layers, dim // w0[1]
        d.residual = bool(_cfg_get(cfg, "model", "modalities", "image", "decoder",
                                   "decoder_residual", default=True))
    if int(dim * config.model.mlp_ratio) != hidden:
        raise ConversionError(f"fairseq state dict: mlp width {hidden} is not dim * a ratio")
    return config


def _block(r: StateReader, p: str) -> dict[str, Any]:
    return {"attn": {"qkv": r.linear(p + "attn.qkv"), "proj": r.linear(p + "attn.proj")},
            "mlp": {"fc1": r.linear(p + "mlp.fc1"), "fc2": r.linear(p + "mlp.fc2")},
            "norm1": r.norm(p + "norm1"), "norm2": r.norm(p + "norm2")}


def _frontend(r: StateReader, prefix: str, config, local: bool) -> dict[str, Any]:
    m = config.model
    grid = (m.image_size // m.patch_size,) * 2
    pos = r.get(prefix + "fixed_positional_encoder.positions")
    # Our positions are computed (SPEC 7), so a checkpoint whose table differs
    # cannot be represented: check rather than silently replace.
    if not np.allclose(pos.reshape(-1, m.dim), sincos_2d(grid, m.dim), atol=1e-5):
        raise ConversionError(f"fairseq state dict: {prefix}fixed_positional_encoder.positions "
                              "is not the 2-D sin-cos table our model computes")
    extra = r.get(prefix + "extra_tokens")
    if extra.shape != (1, 1, m.dim):
        raise ConversionError(f"fairseq state dict: {prefix}extra_tokens has shape {extra.shape}; "
                              "our model has exactly one extra (CLS) token")
    out = {"cls_token": extra.reshape(m.dim), "emb_norm": r.norm(prefix + "context_encoder.norm")}
    if local:
        w = r.get(prefix + "local_encoder.proj.weight")
        out["patch_embed"] = {"kernel": w.transpose(2, 3, 1, 0),  # [D,C,p,p] -> [p,p,C,D]
                              "bias": r.get(prefix + "local_encoder.proj.bias")}
    return out


def from_fairseq(checkpoint: Mapping[str, Any], num_heads: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """A fairseq data2vec 2.0 image checkpoint -> (config, params, ema_params).

    `checkpoint` is what `torch.load` returns (with 'model' and 'cfg') or the
    model state dict itself; `num_heads` is needed when no cfg is saved. Every
    tensor is mapped; anything left over raises `ConversionError`. The teacher
    (`_ema`) goes into `ema_params`; a teacher without the patch embedding
    (fairseq `ema_local_encoder=False`: it used the student's) gets the student's.
    """
    cfg = checkpoint.get("cfg") if "model" in checkpoint else None
    state = dict(checkpoint["model"] if "model" in checkpoint else checkpoint)
    ema = state.pop("_ema", None)
    config = image_config(state, num_heads, cfg)
    m, d = config.model, config.decoder

    r = StateReader(state, "fairseq state dict")
    params = {"frontend": _frontend(r, IMAGE, config, local=True),
              "encoder": {"blocks": stack([_block(r, f"blocks.{i}.") for i in range(m.depth)])}}
    decoder = {}
    for i in range(d.layers):
        p = f"{IMAGE}decoder.blocks.{i}.0."
        decoder[f"conv_{i}"] = {"kernel": r.get(p + "weight").transpose(2, 3, 1, 0),
                                "bias": r.get(p + "bias")}
    decoder["proj"] = r.linear(f"{IMAGE}decoder.proj")
    params["decoder"] = decoder
    r.finish()
    check_tree(params, expected_params(config), "from_fairseq params")

    if ema is None:
        raise ConversionError("fairseq state dict has no '_ema' (teacher); save it with the EMA")
    er = StateReader(ema, "fairseq state dict '_ema'")
    if "0.attn.qkv.weight" in ema:  # ema_encoder_only: the teacher is just the blocks
        ema_params = {"frontend": params["frontend"],
                      "encoder": {"blocks": stack([_block(er, f"{i}.") for i in range(m.depth)])}}
    else:
        local = f"{IMAGE}local_encoder.proj.weight" in ema
        front = _frontend(er, IMAGE, config, local=local)
        if not local:
            front["patch_embed"] = params["frontend"]["patch_embed"]
        ema_params = {"frontend": front, "encoder": {
            "blocks": stack([_block(er, f"blocks.{i}.") for i in range(m.depth)])}}
    er.finish()
    expected = expected_params(config)
    check_tree(ema_params, {k: expected[k] for k in ema_keys(config)}, "from_fairseq ema_params")
    return config, params, ema_params
