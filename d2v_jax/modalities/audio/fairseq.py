"""fairseq data2vec speech checkpoints -> our config, params and ema_params.

Three layouts (docs/convert.md has the tables):

- 2.0, `data2vec_multi` with an AUDIO encoder: `modality_encoders.AUDIO.*`
  (conv extractor `local_encoder`, `project_features`, the conv positional
  stack `relative_positional_encoder`, `context_encoder.norm` and prenet
  blocks, the per-head `alibi_scale`, the 1-D decoder), main `blocks.*`, and
  the teacher under `_ema` (no extractor unless `ema_local_encoder`; just the
  blocks as `{i}.*` with `ema_encoder_only`).
- 1.0, `data2vec_audio`: `feature_extractor.*`, `layer_norm`,
  `post_extract_proj`, `mask_emb`, the wav2vec 2.0 `encoder.*`
  (`pos_conv`, `layer_norm`, `layers.*` with separate q/k/v), the regression
  head `final_proj`, and the teacher's transformer under `_ema`.
- fine-tuned for ASR, `Wav2VecCtc` around either: the encoder under
  `w2v_encoder.w2v_model.*` (no decoder, no teacher, no regression head) and
  the CTC head `w2v_encoder.proj` (returned as `head`, task "ctc").
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from d2v_jax.convert.common import (ConversionError, StateReader, base_config, check_tree,
                                    expected_params)
from d2v_jax.convert.fairseq_common import (ALT_BLOCK, SEPARATE_QKV_BLOCK, FairseqConversion,
                                            apply_training_cfg, block_prefixes, blocks, cfg_get,
                                            conv_extractor, ema_subset, encoder_only_ema,
                                            extractor_config,
                                            heads_from, mlp_ratio, num_blocks, odd_kernel, read,
                                            split_ema, split_wrapper)

AUDIO = "modality_encoders.AUDIO."
PRENET = AUDIO + "context_encoder.blocks."
POS = AUDIO + "relative_positional_encoder."
CTC = "w2v_encoder.w2v_model."
V1_KEY = "feature_extractor.conv_layers.0.0.weight"
KEY_PREFIX = f"{AUDIO} | {V1_KEY} | {CTC}"  # what `convert.from_fairseq` matches on


def matches(state: Mapping[str, Any]) -> bool:
    """A data2vec_multi AUDIO, data2vec_audio, or a Wav2VecCtc around either."""
    return (any(k.startswith((AUDIO, CTC + AUDIO)) for k in state) or V1_KEY in state
            or CTC + V1_KEY in state)


def from_fairseq(checkpoint: Mapping[str, Any], num_heads: int | None = None
                 ) -> FairseqConversion:
    """A fairseq data2vec audio checkpoint (2.0, 1.0 or 1.0 + CTC) ->
    `(config, params, ema_params)` with `.head` / `.task` for the CTC model.
    Anything unmapped raises `ConversionError` naming the keys."""
    state = checkpoint["model"] if "model" in checkpoint else checkpoint
    if any(k.startswith(AUDIO) for k in state):
        return _from_multi(checkpoint, num_heads)
    if any(k.startswith(CTC + AUDIO) for k in state):  # 2.0 fine-tuned for ASR
        inner, outer = split_wrapper(checkpoint, CTC, ("model", "w2v_args", "model"))
        config, params, _ = _from_multi(inner, num_heads, finetuned=True)
        r = StateReader(outer, "fairseq state dict (Wav2VecCtc)")
        head = {"head": r.linear("w2v_encoder.proj")}
        r.finish()
        return FairseqConversion(config, params, None, head=head, task="ctc")
    return _from_v1(checkpoint, num_heads)


# ----------------------------------------------------------------------------- 2.0
def _v2_config(state, cfg, num_heads) -> ml_collections.ConfigDict:
    mc = cfg_get(cfg, "model")
    ac = cfg_get(mc, "modalities", "audio")
    where = "fairseq data2vec_multi AUDIO"
    if cfg_get(mc, "layer_norm_first", default=False) or "norm.weight" in state:
        raise ConversionError(f"{where}: layer_norm_first=True; our 2.0 audio model is post-LN")
    if cfg_get(ac, "conv_pos_pre_ln", default=False):
        raise ConversionError(f"{where}: cfg modalities.audio.conv_pos_pre_ln=True has no "
                              "counterpart (our positional stack starts with the conv)")
    dims, kernels, strides = extractor_config(
        state, AUDIO + "local_encoder.conv_layers.", cfg_get(ac, "feature_encoder_spec"), where)
    dim = tuple(state[AUDIO + "project_features.2.weight"].shape)[0]
    pos_ids = sorted({int(k[len(POS):].split(".")[0]) for k in state if k.startswith(POS)})
    if pos_ids != list(range(1, len(pos_ids) + 1)):
        raise ConversionError(f"{where}: positional conv layers {pos_ids} under {POS!r}; "
                              "expected 1..depth (Sequential(TransposeLast, convs..., "
                              "TransposeLast))")
    pos_depth = len(pos_ids)
    pw = tuple(state[POS + "1.0.weight"].shape)  # [D, D/G, k]
    prenet, main = num_blocks(state, PRENET), num_blocks(state, "blocks.")
    hidden = tuple(state[(PRENET if prenet else "blocks.") + "0.mlp.fc1.weight"].shape)[0]
    dec_layers = num_blocks(state, AUDIO + "decoder.blocks.")  # 0: fine-tuned, no decoder
    if dec_layers:
        w0 = tuple(state[AUDIO + "decoder.blocks.0.0.weight"].shape)  # [Ddec, D/G, k]
        odd_kernel(w0[2], "modalities.audio.decoder.decoder_kernel")
    heads = heads_from(cfg, num_heads, ("model", "num_heads"))
    config = base_config("audio", "base_v2")
    with config.unlocked():
        m = config.model
        m.conv_dims, m.conv_kernels, m.conv_strides = dims, kernels, strides
        m.conv_bias = False
        m.dim, m.depth, m.num_heads = dim, prenet + main, heads
        m.mlp_ratio = mlp_ratio(hidden, dim)
        m.norm_eps = float(cfg_get(mc, "norm_eps", default=1e-5))
        m.pos_conv, m.pos_conv_depth, m.pos_conv_groups = "stack", pos_depth, dim // pw[1]
        # Our kernel is max(3, width // depth): width = k * depth gives k back.
        m.pos_conv_width = pw[2] * pos_depth
        # data2vec 2.0 zeroes nothing before its positional convs (masked frames
        # only, encoder_zero_mask): padded frames keep their features.
        m.pos_conv_zero_pad = "none"
        m.alibi = AUDIO + "alibi_scale" in state
        m.drop_path = 0.0
        d = config.decoder
        if dec_layers:
            d.dim, d.kernel, d.layers, d.groups = w0[0], w0[2], dec_layers, dim // w0[1]
        d.residual = bool(cfg_get(ac, "decoder", "decoder_residual", default=True))
        d.input_dropout = float(cfg_get(ac, "decoder", "input_dropout", default=d.input_dropout))
        d.mask_noise_std = float(cfg_get(ac, "mask_noise_std", default=d.mask_noise_std))
        k = config.masking
        k.ratio = float(cfg_get(ac, "mask_prob", default=k.ratio))
        k.span = int(cfg_get(ac, "mask_length", default=k.span))
        k.prob_adjust = float(cfg_get(ac, "mask_prob_adjust", default=k.prob_adjust))
        if cfg_get(mc, "ema_encoder_only", default=False):
            config.ema.shared = ("frontend", "context")
        config.target.top_k = min(config.target.top_k, main)
    apply_training_cfg(config, mc)
    if cfg_get(ac, "decoder", "projection_layers", default=1) != 1:
        raise ConversionError(f"{where}: cfg decoder.projection_layers != 1 has no "
                              "counterpart in our audio decoder")
    return config


def _alibi_scale(r: StateReader, key: str, heads: int) -> np.ndarray:
    s = r.get(key)
    if s.ndim == 4:  # fairseq's upgrade_state_dict_named adds the layer axis
        s = s[None]
    if s.shape[0] != 1:
        raise ConversionError(f"fairseq state dict: {key!r} has shape {s.shape}: one ALiBi "
                              "scale per layer (learned_alibi_scale_per_layer) has no "
                              "counterpart; ours is one per head shared by all blocks")
    # [1, 1, H or 1, 1, 1] -> [H] (a single scale is the same for every head).
    return np.broadcast_to(s.reshape(-1), (heads,)).astype(np.float32).copy()


def _context(r: StateReader, config) -> dict[str, Any]:
    m = config.model
    table = [((f"pos_conv_{i}",), f"{i + 1}.0", "conv1d") for i in range(m.pos_conv_depth)]
    out = read(r, POS, table)
    out["emb_norm"] = r.norm(AUDIO + "context_encoder.norm")
    if m.alibi:
        out["alibi_scale"] = _alibi_scale(r, AUDIO + "alibi_scale", m.num_heads)
    return out


def _frontend_v2(r: StateReader, config) -> dict[str, Any]:
    out = conv_extractor(r, AUDIO + "local_encoder.conv_layers.", len(config.model.conv_dims))
    out.update(read(r, AUDIO + "project_features.", ((("feature_norm",), "1", "norm"),
                                                      (("proj",), "2", "linear"))))
    return out


def _from_multi(checkpoint, num_heads, finetuned: bool = False) -> FairseqConversion:
    cfg, state, ema = split_ema(checkpoint)
    config = _v2_config(state, cfg, num_heads)
    m, d = config.model, config.decoder
    r = StateReader(state, "fairseq state dict")
    params = {"frontend": _frontend_v2(r, config), "context": _context(r, config),
              "encoder": blocks(r, block_prefixes(state, PRENET, "blocks."), ALT_BLOCK, m.dim)}
    if not finetuned or AUDIO + "decoder.proj.weight" in r:
        dec = read(r, AUDIO + "decoder.blocks.",
                   [((f"conv_{i}",), f"{i}.0", "conv1d") for i in range(d.layers)])
        dec["proj"] = r.linear(AUDIO + "decoder.proj")
        params["decoder"] = dec
    r.finish()
    expected = expected_params(config)
    check_tree(params, {k: expected[k] for k in params}, "from_fairseq params")
    if ema is None and finetuned:  # remove_pretraining_modules dropped the teacher
        return FairseqConversion(config, params, None)
    if ema is None:
        raise ConversionError("fairseq state dict has no '_ema' (teacher); save it with the EMA")
    er = StateReader(ema, "fairseq state dict '_ema'")
    main = encoder_only_ema(state, ema, er, m.dim, PRENET)
    if main is not None:
        teacher = {"context": params["context"], "encoder": main}
    else:
        teacher = {"context": _context(er, config),
                   "encoder": blocks(er, block_prefixes(ema, PRENET, "blocks."),
                                     ALT_BLOCK, m.dim)}
        if AUDIO + "project_features.2.weight" in ema:  # ema_local_encoder=True
            teacher["frontend"] = _frontend_v2(er, config)
            with config.unlocked():  # the teacher has its own extractor: EMA, not shared
                config.ema.shared = tuple(s for s in config.ema.shared if s != "frontend")
    er.finish()
    return FairseqConversion(config, params, ema_subset(config, teacher, expected, params))


# ----------------------------------------------------------------------------- 1.0
def _pos_conv_v1(r: StateReader, prefix: str, config) -> dict[str, Any]:
    m = config.model
    if m.pos_conv == "stack":
        return read(r, prefix, [((f"pos_conv_{i}",), f"{i}.0", "conv1d")
                                for i in range(m.pos_conv_depth)])
    # One weight-normed conv (torch weight_norm(dim=2)): g [1, 1, k], v [D, D/G, k];
    # newer torch saves the same two as parametrizations.weight.original{0,1}.
    p = prefix + "0."
    g_key, v_key = p + "weight_g", p + "weight_v"
    if g_key not in r:
        g_key, v_key = p + "parametrizations.weight.original0", p + "parametrizations.weight.original1"
    g, v = r.get(g_key), r.get(v_key)
    return {"pos_conv": {"g": g.reshape(-1), "v": v.transpose(2, 1, 0),
                         "bias": r.get(p + "bias")}}


def _v1_config(state, p, cfg, num_heads) -> ml_collections.ConfigDict:
    where = "fairseq data2vec_audio"
    mc = cfg_get(cfg, "model")
    if cfg_get(mc, "layer_norm_first", default=False):
        raise ConversionError(f"{where}: cfg layer_norm_first=True (pre-LN wav2vec 2.0 large "
                              "style); our audio models are post-LN")
    dims, kernels, strides = extractor_config(state, p + "feature_extractor.conv_layers.",
                                              cfg_get(mc, "conv_feature_layers"), where)
    dim = tuple(state[p + "post_extract_proj.weight"].shape)[0]
    depth = num_blocks(state, p + "encoder.layers.")
    hidden = tuple(state[p + "encoder.layers.0.fc1.weight"].shape)[0]
    pos = p + "encoder.pos_conv."
    config = base_config("audio", "base_v1")
    with config.unlocked():
        m = config.model
        m.conv_dims, m.conv_kernels, m.conv_strides = dims, kernels, strides
        m.conv_bias = f"{p}feature_extractor.conv_layers.0.0.bias" in state
        m.dim, m.depth = dim, depth
        m.num_heads = heads_from(cfg, num_heads, ("model", "encoder_attention_heads"))
        m.mlp_ratio = mlp_ratio(hidden, dim)
        m.norm_eps = 1e-5  # fairseq LayerNorm's default
        m.alibi = False
        m.pos_conv_zero_pad = "input"  # wav2vec 2.0 zeroes padded frames at the conv input
        m.drop_path = 0.0
        if pos + "0.0.weight" in state:  # pos_conv_depth > 1: a stack of plain convs
            n = num_blocks(state, pos)
            w = tuple(state[pos + "0.0.weight"].shape)
            m.pos_conv, m.pos_conv_depth, m.pos_conv_width = "stack", n, w[2] * n
            m.pos_conv_groups = dim // w[1]
        else:
            v = state.get(pos + "0.weight_v", state.get(pos + "0.parametrizations.weight.original1"))
            if v is None:
                raise ConversionError(f"{where}: no positional conv under {pos!r}")
            w = tuple(v.shape)
            m.pos_conv, m.pos_conv_depth, m.pos_conv_width = "single", 1, w[2]
            m.pos_conv_groups = dim // w[1]
        k = config.masking
        k.ratio = float(cfg_get(mc, "mask_prob", default=k.ratio))
        k.span = int(cfg_get(mc, "mask_length", default=k.span))
        config.target.top_k = min(config.target.top_k, depth)
        if not cfg_get(mc, "ema_layers_only", default=True):  # the positional convs are EMA too
            config.ema.shared = tuple(s for s in config.ema.shared
                                      if not str(s).startswith("context"))
    apply_training_cfg(config, mc)
    return config


def _from_v1(checkpoint, num_heads) -> FairseqConversion:
    ctc = CTC + V1_KEY in (checkpoint["model"] if "model" in checkpoint else checkpoint)
    cfg, state, ema = split_ema(checkpoint)
    p = CTC if ctc else ""
    if ctc:  # the pretraining cfg travels inside the fine-tuning cfg
        cfg = cfg_get(cfg, "model", "w2v_args") or cfg
    config = _v1_config(state, p, cfg, num_heads)
    m = config.model
    r = StateReader(state, "fairseq state dict")
    frontend = conv_extractor(r, p + "feature_extractor.conv_layers.", len(m.conv_dims))
    if m.conv_bias:
        for i in range(len(m.conv_dims)):
            frontend[f"conv_{i}"]["bias"] = r.get(f"{p}feature_extractor.conv_layers.{i}.0.bias")
    frontend.update(read(r, p, ((("feature_norm",), "layer_norm", "norm"),
                                (("proj",), "post_extract_proj", "linear"))))
    context = _pos_conv_v1(r, p + "encoder.pos_conv.", config)
    context["emb_norm"] = r.norm(p + "encoder.layer_norm")
    params = {"frontend": frontend, "context": context,
              "encoder": blocks(r, block_prefixes(state, p + "encoder.layers."),
                                SEPARATE_QKV_BLOCK, m.dim)}
    if p + "mask_emb" in r:
        params["mask_emb"] = {"embedding": r.get(p + "mask_emb", (m.dim,))}
    if p + "final_proj.weight" in r:  # the 1.0 regression head
        params["head"] = r.linear(p + "final_proj")
    head = None
    if ctc:
        head = {"head": r.linear("w2v_encoder.proj")}
    r.finish()
    expected = expected_params(config)
    check_tree(params, {k: expected[k] for k in params}, "from_fairseq params")
    ema_params = None
    if ema is not None:  # ema_transformer_only: the wav2vec 2.0 encoder's names
        er = StateReader(ema, "fairseq state dict '_ema'")
        # ema_layers_only skips the positional conv in the update (a copy of the
        # student's); it is stored either way in recent fairseq.
        pos = (_pos_conv_v1(er, "pos_conv.", config)
               if any(k.startswith("pos_conv.") for k in ema)
               else {k: v for k, v in context.items() if k != "emb_norm"})
        ctx = {**pos, "emb_norm": er.norm("layer_norm") if "layer_norm.weight" in ema
               else context["emb_norm"]}
        teacher = {"context": ctx, "encoder": blocks(er, block_prefixes(ema, "layers."),
                                                     SEPARATE_QKV_BLOCK, m.dim)}
        er.finish()
        ema_params = ema_subset(config, teacher, expected, params)
    return FairseqConversion(config, params, ema_params, head=head, task="ctc" if ctc else None)
