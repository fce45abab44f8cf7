"""Hugging Face `Data2VecAudioModel` <-> our audio model (docs/convert.md has the table).

`d2v_jax.convert.from_huggingface` / `to_huggingface` find this module through
the modality registry (`Modality.hf`); every tensor is mapped by name.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from d2v_jax.convert.common import (ConversionError, StateReader, base_config, hf_require,
                                    linear_out, norm_out, qkv, set_model, split_qkv, stack,
                                    unstack)

MODEL_TYPE = "data2vec-audio"  # transformers config.model_type
PREFIX = "data2vec_audio."  # a task model's (e.g. ...ForSequenceClassification) encoder prefix
INPUT = "input_values"  # the encoder's input argument
ENCODER_SUBTREES = ("frontend", "context", "encoder")  # our subtrees a Hugging Face encoder holds


def config_from_hf(hf) -> ml_collections.ConfigDict:
    hf_require(hf.hidden_act == "gelu", "hidden_act", f"{hf.hidden_act!r}; ours is exact GELU")
    hf_require(hf.feat_extract_activation == "gelu", "feat_extract_activation",
             f"{hf.feat_extract_activation!r}; ours is exact GELU")
    hf_require(not getattr(hf, "add_adapter", False), "add_adapter", "adapters are not supported")
    # Our conv and feature LayerNorms use torch's default eps; HF's feature
    # projection LayerNorm uses layer_norm_eps.
    hf_require(hf.layer_norm_eps == 1e-5, "layer_norm_eps",
             f"{hf.layer_norm_eps}; must be 1e-5 (the feature LayerNorm's eps in our model)")
    hf_require(hf.conv_pos_kernel_size >= 3, "conv_pos_kernel_size", "must be >= 3")
    config = base_config("audio", "base_v1")
    depth = int(hf.num_conv_pos_embeddings)
    set_model(config, conv_dims=tuple(int(c) for c in hf.conv_dim),
               conv_kernels=tuple(int(k) for k in hf.conv_kernel),
               conv_strides=tuple(int(s) for s in hf.conv_stride), conv_bias=bool(hf.conv_bias),
               dim=int(hf.hidden_size), depth=int(hf.num_hidden_layers),
               num_heads=int(hf.num_attention_heads),
               mlp_ratio=hf.intermediate_size / hf.hidden_size, qkv_bias=True,
               norm_eps=float(hf.layer_norm_eps), pos_conv="stack",
               pos_conv_width=int(hf.conv_pos_kernel_size) * depth, pos_conv_depth=depth,
               pos_conv_groups=int(hf.num_conv_pos_embedding_groups), alibi=False,
               pos_conv_zero_pad="input", drop_path=0.0)
    hf_require(int(config.model.dim * config.model.mlp_ratio) == hf.intermediate_size,
             "intermediate_size", "must be hidden_size * a ratio that round-trips")
    return config


def params_from_hf(r: StateReader, hf, config) -> dict[str, Any]:
    m = config.model
    d = m.dim
    frontend = {}
    for i in range(len(m.conv_dims)):
        p = f"feature_extractor.conv_layers.{i}."
        conv = {"kernel": r.get(p + "conv.weight").transpose(2, 1, 0)}  # [O,I,k] -> [k,I,O]
        if m.conv_bias:
            conv["bias"] = r.get(p + "conv.bias")
        frontend[f"conv_{i}"] = conv
        frontend[f"conv_norm_{i}"] = r.norm(p + "layer_norm")
    frontend["feature_norm"] = r.norm("feature_projection.layer_norm")
    frontend["proj"] = r.linear("feature_projection.projection")
    context = {"emb_norm": r.norm("encoder.layer_norm")}
    for i in range(m.pos_conv_depth):
        p = f"encoder.pos_conv_embed.layers.{i}.conv."
        context[f"pos_conv_{i}"] = {"kernel": r.get(p + "weight").transpose(2, 1, 0),
                                    "bias": r.get(p + "bias")}
    blocks = []
    for i in range(m.depth):
        p = f"encoder.layers.{i}."
        a = p + "attention."
        blocks.append({
            "attn": {"qkv": qkv(r, a + "q_proj", a + "k_proj", a + "v_proj", d),
                     "proj": r.linear(a + "out_proj")},
            "mlp": {"fc1": r.linear(p + "feed_forward.intermediate_dense"),
                    "fc2": r.linear(p + "feed_forward.output_dense")},
            "norm1": r.norm(p + "layer_norm"),
            "norm2": r.norm(p + "final_layer_norm"),
        })
    params = {"frontend": frontend, "context": context, "encoder": {"blocks": stack(blocks)}}
    if "masked_spec_embed" in r:  # the 1.0 student's mask embedding
        params["mask_emb"] = {"embedding": r.get("masked_spec_embed", (d,))}
    return params


def encoder_subtrees(config) -> tuple[str, ...]:
    return ENCODER_SUBTREES


def check_export(config) -> None:
    """A config HF Data2VecAudio cannot hold -> ConversionError naming the field."""
    m = config.model
    if m.get("frontend", "conv") != "conv":
        raise ConversionError("to_huggingface: HF Data2VecAudio reads raw waveforms with convs; "
                              f"this config has model.frontend={m.frontend!r}")
    if m.alibi or m.pos_conv != "stack":
        raise ConversionError(
            f"to_huggingface: HF Data2VecAudio has no ALiBi and a stacked positional conv; "
            f"this config has model.alibi={m.alibi}, model.pos_conv={m.pos_conv!r}")
    if m.get("pos_conv_zero_pad", "layer") != "input":
        raise ConversionError(
            "to_huggingface: HF zeroes padded frames only at the positional conv's input; "
            "set model.pos_conv_zero_pad='input' (outputs then match with padding). "
            f"Got {m.get('pos_conv_zero_pad', 'layer')!r}")


def head_from_hf(r: StateReader, hf) -> tuple[str | None, Any]:
    """Data2VecAudioForCTC's `lm_head` -> ("ctc", {"head": Dense})."""
    if "lm_head.weight" not in r:
        return None, None
    return "ctc", {"head": r.linear("lm_head")}


def to_hf(config, params, head=None, task=None):
    from transformers import Data2VecAudioConfig, Data2VecAudioForCTC, Data2VecAudioModel
    m = config.model
    d = m.dim
    if task not in (None, "ctc"):
        raise ConversionError(f"to_huggingface: task {task!r}; HF audio task heads: 'ctc'")
    kernel_size = max(3, m.pos_conv_width // m.pos_conv_depth)
    has_mask = "mask_emb" in params
    hf_config = Data2VecAudioConfig(
        hidden_size=d, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(d * m.mlp_ratio), hidden_act="gelu",
        feat_extract_activation="gelu", conv_dim=tuple(m.conv_dims),
        conv_kernel=tuple(m.conv_kernels), conv_stride=tuple(m.conv_strides),
        conv_bias=m.conv_bias, num_conv_pos_embeddings=m.pos_conv_depth,
        conv_pos_kernel_size=kernel_size, num_conv_pos_embedding_groups=m.pos_conv_groups,
        layer_norm_eps=m.norm_eps, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
        mask_time_prob=0.05 if has_mask else 0.0, mask_feature_prob=0.0)
    f, c = params["frontend"], params["context"]
    sd = {}
    for i in range(len(m.conv_dims)):
        p = f"feature_extractor.conv_layers.{i}."
        sd[p + "conv.weight"] = np.asarray(f[f"conv_{i}"]["kernel"]).transpose(2, 1, 0)
        if m.conv_bias:
            sd[p + "conv.bias"] = np.asarray(f[f"conv_{i}"]["bias"])
        sd.update({p + "layer_norm." + k: v for k, v in norm_out(f[f"conv_norm_{i}"]).items()})
    sd.update({"feature_projection.layer_norm." + k: v
               for k, v in norm_out(f["feature_norm"]).items()})
    sd.update({"feature_projection.projection." + k: v for k, v in linear_out(f["proj"]).items()})
    sd.update({"encoder.layer_norm." + k: v for k, v in norm_out(c["emb_norm"]).items()})
    for i in range(m.pos_conv_depth):
        p = f"encoder.pos_conv_embed.layers.{i}.conv."
        sd[p + "weight"] = np.asarray(c[f"pos_conv_{i}"]["kernel"]).transpose(2, 1, 0)
        sd[p + "bias"] = np.asarray(c[f"pos_conv_{i}"]["bias"])
    for i, b in enumerate(unstack(params["encoder"]["blocks"], m.depth)):
        p = f"encoder.layers.{i}."
        a = p + "attention."
        for name, (w, bias) in zip(("q_proj", "k_proj", "v_proj"), split_qkv(b["attn"]["qkv"], d)):
            sd[a + name + ".weight"], sd[a + name + ".bias"] = w, bias
        for ours, theirs in ((b["attn"]["proj"], "attention.out_proj"),
                             (b["mlp"]["fc1"], "feed_forward.intermediate_dense"),
                             (b["mlp"]["fc2"], "feed_forward.output_dense")):
            sd.update({p + theirs + "." + k: v for k, v in linear_out(ours).items()})
        for ours, theirs in ((b["norm1"], "layer_norm"), (b["norm2"], "final_layer_norm")):
            sd.update({p + theirs + "." + k: v for k, v in norm_out(ours).items()})
    if has_mask:
        sd["masked_spec_embed"] = np.asarray(params["mask_emb"]["embedding"])
    if head is None:
        return Data2VecAudioModel(hf_config), sd
    proj = linear_out(head["head"])
    hf_config.vocab_size = int(proj["weight"].shape[0])
    sd = {PREFIX + k: v for k, v in sd.items()}
    sd.update({"lm_head." + k: v for k, v in proj.items()})
    return Data2VecAudioForCTC(hf_config), sd


def batch_from_hf(x: np.ndarray, attention_mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """HF `input_values` [B,S] (+ attention_mask, 1 = real) -> our batch."""
    pad = np.zeros(x.shape, bool) if attention_mask is None else ~attention_mask.astype(bool)
    return {"audio": x.astype(np.float32), "padding_mask": pad}
