"""fairseq data2vec 2.0 (image) checkpoints -> our config, params and ema_params.

A fairseq `Data2VecMultiModel` state dict (`torch.load(path)["model"]`) holds
the student under `modality_encoders.IMAGE.*` (patch embedding, sin-cos table,
CLS token, embedding LayerNorm, `prenet_depth` prenet blocks under
`context_encoder.blocks.*`, the conv decoder), the main `blocks.{i}.*`, and the
EMA teacher's fp32 copy under `_ema`: either with the same names (minus the
decoder and, unless `ema_local_encoder`, the patch embedding) or, with
`ema_encoder_only`, just the main blocks as `{i}.*`. The released base model
has 2 prenet + 10 main blocks, the large one 0 + 24. The tables are in
docs/convert.md.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from d2v_jax.convert.common import (ConversionError, StateReader, base_config, check_tree,
                                    close_at_precision, expected_params, precision_of, stack)
from d2v_jax.convert.fairseq_common import (ALT_BLOCK, FairseqConversion, apply_training_cfg,
                                            block_prefixes, blocks, cfg_get, drop_buffers,
                                            encoder_only_ema, heads_from, mlp_ratio, num_blocks, read, split_ema)
from d2v_jax.models.positions import sincos_2d
from d2v_jax.train_state import ema_keys

IMAGE = "modality_encoders.IMAGE."
PRENET = IMAGE + "context_encoder.blocks."  # prenet_depth blocks before the main ones
KEY_PREFIX = f"{IMAGE} | patch_embed.proj.weight + cls_token (BEiT code)"  # what from_fairseq matches


def matches(state: Mapping[str, Any]) -> bool:
    """A data2vec_multi checkpoint with an image encoder, or a data2vec 1.0
    vision checkpoint of the BEiT code (github.com/facebookresearch/data2vec_vision)."""
    return any(k.startswith(IMAGE) for k in state) or _is_beit(state)


def _is_beit(state: Mapping[str, Any]) -> bool:
    return "patch_embed.proj.weight" in state and "cls_token" in state


def image_config(state: Mapping[str, Any], num_heads: int | None = None,
                 cfg: Any = None) -> ml_collections.ConfigDict:
    """Our v2 image config from the tensor shapes and fairseq's saved cfg (depth,
    heads, norms, top-K, masking, EMA, decoder), when saved."""
    if f"{IMAGE}local_encoder.proj.weight" not in state:
        raise ConversionError("fairseq state dict: no 'modality_encoders.IMAGE.local_encoder."
                              "proj.weight'; only data2vec 2.0 image checkpoints are supported")
    for key in state:
        if key.startswith(IMAGE) and "alibi" in key:
            raise ConversionError(f"fairseq state dict: {key!r}: image ALiBi has no "
                                  "counterpart in our 2.0 ViT")
    if "norm.weight" in state:
        raise ConversionError("fairseq state dict: 'norm.weight' means layer_norm_first=True; "
                              "our 2.0 image model is post-LN")
    mc = cfg_get(cfg, "model")
    ic = cfg_get(mc, "modalities", "image")
    proj = state[f"{IMAGE}local_encoder.proj.weight"]
    dim, channels, patch, _ = tuple(proj.shape)
    n = tuple(state[f"{IMAGE}fixed_positional_encoder.positions"].shape)[1]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ConversionError(f"fairseq state dict: {n} positions is not a square grid")
    prenet, main = num_blocks(state, PRENET), num_blocks(state, "blocks.")
    if cfg_get(ic, "prenet_depth") not in (None, prenet):
        raise ConversionError(f"fairseq cfg: modalities.image.prenet_depth="
                              f"{cfg_get(ic, 'prenet_depth')} but the state dict holds "
                              f"{prenet} prenet blocks ({PRENET}*)")
    if cfg_get(mc, "depth") not in (None, main):
        raise ConversionError(f"fairseq cfg: depth={cfg_get(mc, 'depth')} but the state dict "
                              f"holds {main} main blocks (blocks.*)")
    first = (PRENET if prenet else "blocks.") + "0."
    hidden = tuple(state[first + "mlp.fc1.weight"].shape)[0]
    dec_layers = num_blocks(state, f"{IMAGE}decoder.blocks.")
    w0 = tuple(state[f"{IMAGE}decoder.blocks.0.0.weight"].shape)  # [Ddec, D/G, k, k]
    config = base_config("image", "base_v2")
    with config.unlocked():
        m = config.model
        m.image_size, m.patch_size, m.channels = side * patch, patch, channels
        # The prenet blocks are our first blocks: one stack of prenet + main.
        m.dim, m.depth = dim, prenet + main
        m.num_heads = heads_from(cfg, num_heads, ("model", "num_heads"))
        m.mlp_ratio = mlp_ratio(hidden, dim)
        m.norm_eps = float(cfg_get(mc, "norm_eps", default=1e-6))
        m.drop_path = 0.0
        d = config.decoder
        d.dim, d.kernel, d.layers, d.groups = w0[0], w0[2], dec_layers, dim // w0[1]
        d.residual = bool(cfg_get(ic, "decoder", "decoder_residual", default=True))
        d.mask_noise_std = float(cfg_get(ic, "mask_noise_std", default=d.mask_noise_std))
        k = config.masking
        k.ratio = float(cfg_get(ic, "mask_prob", default=k.ratio))
        k.prob_adjust = float(cfg_get(ic, "mask_prob_adjust", default=k.prob_adjust))
        k.block_size = int(cfg_get(ic, "mask_length", default=k.block_size))
        # Without a cfg: every main block (the released base and large recipes).
        config.target.top_k = main
    apply_training_cfg(config, mc)
    if config.target.top_k > main:
        raise ConversionError(f"fairseq cfg: average_top_k_layers={config.target.top_k} counts "
                              f"main blocks, but there are {main}")
    return config


def _frontend(r: StateReader, prefix: str, config, local: bool) -> dict[str, Any]:
    m = config.model
    grid = (m.image_size // m.patch_size,) * 2
    key = prefix + "fixed_positional_encoder.positions"
    pos = r.get(key)
    # Our positions are computed (SPEC 7), so a checkpoint whose table differs
    # cannot be represented: check rather than silently replace. The check
    # allows the rounding of the precision the file was saved at: a fp16 run's
    # student (every released recipe) holds the table rounded to float16.
    precision = precision_of(pos, r.dtype(key))
    if not close_at_precision(pos.reshape(-1, m.dim), sincos_2d(grid, m.dim), precision):
        raise ConversionError(f"fairseq state dict: {key} is not the 2-D sin-cos table our "
                              f"model computes (compared at the file's {precision} precision)")
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
                 ) -> FairseqConversion:
    """A fairseq data2vec 2.0 image checkpoint -> (config, params, ema_params).

    `checkpoint` is what `torch.load` returns (with 'model' and 'cfg') or the
    model state dict itself; `num_heads` is needed when no cfg is saved. The
    prenet blocks (`modality_encoders.IMAGE.context_encoder.blocks.*`) become
    our first blocks, the main `blocks.*` follow; top-K counts main blocks.
    Every tensor is mapped; anything left over raises `ConversionError`. The
    teacher (`_ema`) goes into `ema_params`; a teacher without the patch
    embedding (fairseq `ema_local_encoder=False`: it used the student's) gets
    the student's.
    """
    if _is_beit(checkpoint["model"] if "model" in checkpoint else checkpoint):
        return from_beit(checkpoint, num_heads)
    cfg, state, ema = split_ema(checkpoint)
    config = image_config(state, num_heads, cfg)
    m, d = config.model, config.decoder

    r = StateReader(state, "fairseq state dict")
    params = {"frontend": _frontend(r, IMAGE, config, local=True),
              "encoder": blocks(r, block_prefixes(state, PRENET, "blocks."), ALT_BLOCK, m.dim)}
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
    main = encoder_only_ema(state, ema, er, m.dim, PRENET)
    if main is not None:
        ema_params = {"frontend": params["frontend"], "encoder": main}
    else:
        local = f"{IMAGE}local_encoder.proj.weight" in ema
        front = _frontend(er, IMAGE, config, local=local)
        if not local:
            front["patch_embed"] = params["frontend"]["patch_embed"]
        ema_params = {"frontend": front, "encoder": blocks(
            er, block_prefixes(ema, PRENET, "blocks."), ALT_BLOCK, m.dim)}
    er.finish()
    expected = expected_params(config)
    check_tree(ema_params, {k: expected[k] for k in ema_keys(config)}, "from_fairseq ema_params")
    return FairseqConversion(config, params, ema_params)


# ----------------------------------------------------------------------------- 1.0 (BEiT code)
# data2vec 1.0 vision was released from the BEiT code base (github.com/
# facebookresearch/data2vec_vision, beit/modeling_cyclical.py for pretraining,
# modeling_finetune.py for fine-tuning): {"model": ..., "model_ema": ..., "args": ...}.
# fairseq's examples/data2vec/models/data2vec_vision.py is an unfinished port
# (debug prints, `assert 1==2` in its per-block bias) that no release uses.
BEIT_BLOCK = (
    (("attn", "proj"), "attn.proj", "linear"),
    (("mlp", "fc1"), "mlp.fc1", "linear"),
    (("mlp", "fc2"), "mlp.fc2", "linear"),
    (("norm1",), "norm1", "norm"),
    (("norm2",), "norm2", "norm"),
)
BEIT_IGNORE = ("relative_position_index",)  # buffers recomputed here


def _beit_block(r: StateReader, p: str, dim: int, scale: bool) -> dict[str, Any]:
    """BEiT Attention: qkv Linear without bias, q_bias and v_bias (k bias 0)."""
    out = read(r, p, BEIT_BLOCK)
    bias = (np.concatenate([r.get(p + "attn.q_bias", (dim,)), np.zeros(dim, np.float32),
                            r.get(p + "attn.v_bias", (dim,))])
            if p + "attn.q_bias" in r else np.zeros(3 * dim, np.float32))
    out["attn"]["qkv"] = {"kernel": r.get(p + "attn.qkv.weight", (3 * dim, dim)).T, "bias": bias}
    if scale:
        out["gamma_1"], out["gamma_2"] = r.get(p + "gamma_1", (dim,)), r.get(p + "gamma_2", (dim,))
    return out


def beit_config(state: Mapping[str, Any], args: Any, num_heads: int | None):
    """Our v1 image config from a BEiT-code state dict (and its saved `args`)."""
    where = "data2vec_vision (BEiT) state dict"
    if "pos_embed" in state:
        raise ConversionError(f"{where}: 'pos_embed' (learned absolute positions) has no "
                              "counterpart in our 1.0 ViT (relative position bias only)")
    dim, channels, patch, _ = tuple(state["patch_embed.proj.weight"].shape)
    depth = num_blocks(state, "blocks.")
    shared = "rel_pos_bias.relative_position_bias_table" in state
    per_block = "blocks.0.attn.relative_position_bias_table" in state
    if shared and per_block:
        raise ConversionError(f"{where}: both a shared and per-block relative position tables")
    table = (state.get("rel_pos_bias.relative_position_bias_table") if shared else
             state.get("blocks.0.attn.relative_position_bias_table"))
    if table is not None:
        size, heads = tuple(table.shape)
        side = int(round((((size - 3) ** 0.5) + 1) / 2))
        if (2 * side - 1) ** 2 + 3 != size:
            raise ConversionError(f"{where}: a relative position table of {size} rows is not "
                                  "a square grid's (2h-1)^2 + 3")
    else:
        heads, side = None, int(cfg_get(args, "input_size", default=224)) // patch
    if num_heads is not None and heads is not None and num_heads != heads:
        raise ConversionError(f"{where}: num_heads={num_heads} but the relative position "
                              f"table has {heads} heads")
    heads = heads or num_heads
    if heads is None:
        raise ConversionError(f"{where}: no relative position table holds the head count; "
                              "pass num_heads=")
    scale = "blocks.0.gamma_1" in state
    config = base_config("image", "base_v1")
    with config.unlocked():
        m = config.model
        m.image_size, m.patch_size, m.channels = side * patch, patch, channels
        m.dim, m.depth, m.num_heads = dim, depth, heads
        m.mlp_ratio = mlp_ratio(tuple(state["blocks.0.mlp.fc1.weight"].shape)[0], dim)
        m.layer_scale_init = float(cfg_get(args, "layer_scale_init_value", default=0.1)
                                   ) if scale else 0.0
        m.rel_pos_bias = "shared" if shared else "per_block" if per_block else "none"
        m.final_norm = "norm.weight" in state
        m.norm_eps, m.drop_path = 1e-6, 0.0
        depth_k = cfg_get(args, "average_top_k_layers")
        if depth_k is not None:
            config.target.top_k = int(depth_k)
        config.target.top_k = min(config.target.top_k, depth)
    return config


def _beit_params(r: StateReader, config) -> dict[str, Any]:
    m = config.model
    w = r.get("patch_embed.proj.weight")
    front = {"cls_token": r.get("cls_token", (1, 1, m.dim)).reshape(m.dim),
             "patch_embed": {"kernel": w.transpose(2, 3, 1, 0),
                             "bias": r.get("patch_embed.proj.bias")},
             # The fine-tuned model has none; our 1.0 student needs one (BEiT inits it at 0).
             "mask_token": (r.get("mask_token", (1, 1, m.dim)).reshape(m.dim)
                            if "mask_token" in r else np.zeros(m.dim, np.float32))}
    if m.rel_pos_bias == "shared":
        front["rel_pos_bias"] = {"relative_position_bias_table": r.get(
            "rel_pos_bias.relative_position_bias_table")}
    elif m.rel_pos_bias == "per_block":
        front["rel_pos_bias"] = {"relative_position_bias_table": np.stack([r.get(
            f"blocks.{i}.attn.relative_position_bias_table") for i in range(m.depth)])}
    scale = m.layer_scale_init > 0
    params = {"frontend": front, "encoder": {"blocks": stack(
        [_beit_block(r, f"blocks.{i}.", m.dim, scale) for i in range(m.depth)])}}
    if m.final_norm:
        params["final_norm"] = r.norm("norm")
    return params


def from_beit(checkpoint: Mapping[str, Any], num_heads: int | None = None) -> FairseqConversion:
    """A data2vec 1.0 vision checkpoint of the BEiT code -> (config, params,
    ema_params); `model_ema` is the teacher; a fine-tuned model's `head` (and
    `fc_norm`, mean pooling) is returned as `.head`, task "image_classification"."""
    state = drop_buffers(checkpoint["model"] if "model" in checkpoint else checkpoint)
    ema = checkpoint.get("model_ema") if "model" in checkpoint else None
    args = checkpoint.get("args") if "model" in checkpoint else None
    config = beit_config(state, args, num_heads)
    r = StateReader(state, "data2vec_vision (BEiT) state dict", ignore=BEIT_IGNORE)
    params = _beit_params(r, config)
    if "lm_head.weight" in r:  # the pretraining regression head, Linear(D, D)
        params["head"] = r.linear("lm_head")
    head = None
    if "head.weight" in r:  # fine-tuned classifier
        head = {"head": r.linear("head")}
        if "fc_norm.weight" in r:
            head["fc_norm"] = r.norm("fc_norm")
    r.finish()
    expected = expected_params(config)
    check_tree(params, {k: expected[k] for k in params}, "from_fairseq params (BEiT)")
    ema_params = None
    if ema is not None:
        er = StateReader(drop_buffers(ema), "data2vec_vision (BEiT) 'model_ema'",
                         ignore=BEIT_IGNORE + ("lm_head.",))
        teacher = _beit_params(er, config)
        er.finish()
        ema_params = {k: teacher[k] for k in ema_keys(config)}
        check_tree(ema_params, {k: expected[k] for k in ema_keys(config)},
                   "from_fairseq ema_params (BEiT)")
    return FairseqConversion(config, params, ema_params, head=head,
                             task="image_classification" if head is not None else None)
