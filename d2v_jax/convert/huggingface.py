"""Hugging Face transformers <-> d2v_jax (docs/convert.md has the tables).

Every HF tensor is mapped by name; an HF tensor left over, a missing one or a
shape that does not fit raises `ConversionError` naming it. Architectural
options our model does not have raise instead of being approximated.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from d2v_jax.convert.common import (ConversionError, Converted, StateReader, base_config,
                                    check_tree, expected_params, stack, unstack)
from d2v_jax.data.tokenizer import PAD_ID

# Buffers HF recomputes; they carry no weights.
_IGNORE = ("relative_position_index", "position_ids", "token_type_ids")


def _require(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConversionError(f"Hugging Face config {field}: {msg}")


def _qkv(r: StateReader, q: str, k: str, v: str, dim: int) -> dict[str, np.ndarray]:
    """Separate q/k/v Linears -> our fused qkv Dense ([q | k | v] on the output
    axis). A missing k bias (BEiT) is 0: it adds q.b_k, the same for every key,
    which the softmax cancels."""
    kernel = np.concatenate([r.get(f"{n}.weight", (dim, dim)).T for n in (q, k, v)], axis=1)
    bias = [r.get(f"{n}.bias", (dim,)) if f"{n}.bias" in r else np.zeros(dim, np.float32)
            for n in (q, k, v)]
    return {"kernel": kernel, "bias": np.concatenate(bias)}


def _split_qkv(qkv: Mapping[str, np.ndarray], dim: int):
    w = np.asarray(qkv["kernel"])
    b = np.asarray(qkv["bias"]) if "bias" in qkv else np.zeros(3 * dim, np.float32)
    return [(w[:, i * dim:(i + 1) * dim].T, b[i * dim:(i + 1) * dim]) for i in range(3)]


def _linear_out(dense: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"weight": np.asarray(dense["kernel"]).T, "bias": np.asarray(dense["bias"])}


def _norm_out(norm: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"weight": np.asarray(norm["scale"]), "bias": np.asarray(norm["bias"])}


def _set_model(config: ml_collections.ConfigDict, **fields) -> None:
    with config.unlocked():
        for k, v in fields.items():
            config.model[k] = v


# ----------------------------------------------------------------------------- vision
def _vision_config(hf) -> ml_collections.ConfigDict:
    _require(hf.hidden_act == "gelu", "hidden_act", f"{hf.hidden_act!r}; ours is exact GELU ('gelu')")
    _require(not hf.use_absolute_position_embeddings, "use_absolute_position_embeddings",
             "learned absolute positions are not in our v1 ViT (BEiT uses none)")
    _require(not hf.use_relative_position_bias, "use_relative_position_bias",
             "per-block relative position bias is not supported; our model has one shared "
             "table (use_shared_relative_position_bias=True)")
    _require(not hf.use_mean_pooling, "use_mean_pooling",
             "True makes HF's last_hidden_state skip the final LayerNorm; ours ends with it")
    _require(hf.hidden_size % hf.num_attention_heads == 0, "hidden_size", "not divisible by heads")
    size = hf.image_size if isinstance(hf.image_size, int) else hf.image_size[0]
    _require(isinstance(hf.image_size, int) or hf.image_size[0] == hf.image_size[1],
             "image_size", "must be square")
    config = base_config("image", "base_v1")
    _set_model(config, image_size=size, patch_size=int(hf.patch_size),
               channels=int(hf.num_channels), dim=int(hf.hidden_size),
               depth=int(hf.num_hidden_layers), num_heads=int(hf.num_attention_heads),
               mlp_ratio=hf.intermediate_size / hf.hidden_size, qkv_bias=True,
               layer_norm_first=True, layer_scale_init=float(hf.layer_scale_init_value),
               rel_pos_bias="shared" if hf.use_shared_relative_position_bias else "none",
               abs_pos="none", norm_eps=float(hf.layer_norm_eps), drop_path=0.0)
    _require(int(config.model.dim * config.model.mlp_ratio) == hf.intermediate_size,
             "intermediate_size", "must be hidden_size * a ratio that round-trips")
    return config


def _vision_from(r: StateReader, hf, config) -> dict[str, Any]:
    m = config.model
    d = m.dim
    frontend = {
        "cls_token": r.get("embeddings.cls_token", (1, 1, d)).reshape(d),
        # torch Conv2d [D, C, p, p] -> flax Conv [p, p, C, D]
        "patch_embed": {
            "kernel": r.get("embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0),
            "bias": r.get("embeddings.patch_embeddings.projection.bias")},
    }
    if "embeddings.mask_token" in r:
        frontend["mask_token"] = r.get("embeddings.mask_token", (1, 1, d)).reshape(d)
    else:  # HF use_mask_token=False: our v1 student needs one; BEiT inits it at 0
        frontend["mask_token"] = np.zeros(d, np.float32)
    if m.rel_pos_bias == "shared":
        frontend["rel_pos_bias"] = {"relative_position_bias_table": r.get(
            "encoder.relative_position_bias.relative_position_bias_table")}
    blocks = []
    for i in range(m.depth):
        p = f"encoder.layer.{i}."
        a = p + "attention.attention."
        block = {
            "attn": {"qkv": _qkv(r, a + "query", a + "key", a + "value", d),
                     "proj": r.linear(p + "attention.output.dense")},
            "mlp": {"fc1": r.linear(p + "intermediate.dense"),
                    "fc2": r.linear(p + "output.dense")},
            "norm1": r.norm(p + "layernorm_before"),
            "norm2": r.norm(p + "layernorm_after"),
        }
        if m.layer_scale_init > 0:
            block["gamma_1"] = r.get(p + "lambda_1", (d,))
            block["gamma_2"] = r.get(p + "lambda_2", (d,))
        blocks.append(block)
    return {"frontend": frontend, "encoder": {"blocks": stack(blocks)},
            "final_norm": r.norm("layernorm")}


def _vision_to(config, params):
    from transformers import Data2VecVisionConfig, Data2VecVisionModel
    m = config.model
    if config.version != "v1" or not m.layer_norm_first:
        raise ConversionError(
            "to_huggingface: HF Data2VecVision is the pre-LN BEiT ViT of data2vec 1.0; this "
            f"config is version={config.version!r}, model.layer_norm_first={m.layer_norm_first} "
            "(2.0 image models are post-LN and have no HF class)")
    if m.abs_pos != "none":
        raise ConversionError(f"to_huggingface: model.abs_pos={m.abs_pos!r} has no HF "
                              "Data2VecVision counterpart with a v1 model")
    d = m.dim
    hf_config = Data2VecVisionConfig(
        hidden_size=d, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(d * m.mlp_ratio), hidden_act="gelu", image_size=m.image_size,
        patch_size=m.patch_size, num_channels=m.channels, use_mask_token=True,
        use_absolute_position_embeddings=False, use_relative_position_bias=False,
        use_shared_relative_position_bias=m.rel_pos_bias == "shared",
        layer_scale_init_value=m.layer_scale_init, use_mean_pooling=False,
        layer_norm_eps=m.norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0)
    f = params["frontend"]
    sd = {"embeddings.cls_token": np.asarray(f["cls_token"]).reshape(1, 1, d),
          "embeddings.mask_token": np.asarray(f["mask_token"]).reshape(1, 1, d),
          "embeddings.patch_embeddings.projection.weight":
              np.asarray(f["patch_embed"]["kernel"]).transpose(3, 2, 0, 1),
          "embeddings.patch_embeddings.projection.bias": np.asarray(f["patch_embed"]["bias"])}
    if m.rel_pos_bias == "shared":
        sd["encoder.relative_position_bias.relative_position_bias_table"] = np.asarray(
            f["rel_pos_bias"]["relative_position_bias_table"])
    for i, b in enumerate(unstack(params["encoder"]["blocks"], m.depth)):
        p = f"encoder.layer.{i}."
        a = p + "attention.attention."
        (wq, bq), (wk, _), (wv, bv) = _split_qkv(b["attn"]["qkv"], d)  # k bias: see _qkv
        sd.update({a + "query.weight": wq, a + "query.bias": bq, a + "key.weight": wk,
                   a + "value.weight": wv, a + "value.bias": bv})
        for ours, theirs in ((b["attn"]["proj"], "attention.output.dense"),
                             (b["mlp"]["fc1"], "intermediate.dense"),
                             (b["mlp"]["fc2"], "output.dense")):
            sd.update({p + theirs + "." + k: v for k, v in _linear_out(ours).items()})
        for ours, theirs in ((b["norm1"], "layernorm_before"), (b["norm2"], "layernorm_after")):
            sd.update({p + theirs + "." + k: v for k, v in _norm_out(ours).items()})
        if m.layer_scale_init > 0:
            sd[p + "lambda_1"], sd[p + "lambda_2"] = b["gamma_1"], b["gamma_2"]
    sd.update({"layernorm." + k: v for k, v in _norm_out(params["final_norm"]).items()})
    return Data2VecVisionModel(hf_config, add_pooling_layer=False), sd


# ----------------------------------------------------------------------------- text
def _text_config(hf) -> ml_collections.ConfigDict:
    _require(hf.hidden_act == "gelu", "hidden_act", f"{hf.hidden_act!r}; ours is exact GELU")
    pos_type = getattr(hf, "position_embedding_type", "absolute")
    _require(pos_type in (None, "absolute"), "position_embedding_type",
             f"{pos_type!r}; ours are learned absolute positions")
    _require(getattr(hf, "is_decoder", False) is False, "is_decoder", "must be False")
    config = base_config("text", "base_v1")
    # RoBERTa numbers real tokens from pad_token_id + 1; rows up to the pad id
    # are never read by a right-padded real token.
    offset = hf.pad_token_id + 1
    _require(hf.max_position_embeddings > offset, "max_position_embeddings",
             f"{hf.max_position_embeddings} leaves no positions after pad_token_id + 1")
    _set_model(config, vocab_size=int(hf.vocab_size), dim=int(hf.hidden_size),
               depth=int(hf.num_hidden_layers), num_heads=int(hf.num_attention_heads),
               mlp_ratio=hf.intermediate_size / hf.hidden_size, qkv_bias=True,
               max_positions=int(hf.max_position_embeddings - offset),
               norm_eps=float(hf.layer_norm_eps), drop_path=0.0)
    with config.unlocked():
        config.data.max_len = min(config.data.max_len, config.model.max_positions)
    _require(int(config.model.dim * config.model.mlp_ratio) == hf.intermediate_size,
             "intermediate_size", "must be hidden_size * a ratio that round-trips")
    return config


def _text_from(r: StateReader, hf, config) -> dict[str, Any]:
    m = config.model
    d = m.dim
    offset = hf.pad_token_id + 1
    pos = r.get("embeddings.position_embeddings.weight")[offset:]
    # HF adds token_type_embeddings[token_type_ids]; with the default ids (all 0)
    # that is row 0 for every token, folded into every position.
    types = r.get("embeddings.token_type_embeddings.weight")
    frontend = {
        "token_embed": {"embedding": r.get("embeddings.word_embeddings.weight")},
        "pos_embed": pos + types[0],
        "emb_norm": r.norm("embeddings.LayerNorm"),
    }
    blocks = []
    for i in range(m.depth):
        p = f"encoder.layer.{i}."
        a = p + "attention.self."
        blocks.append({
            "attn": {"qkv": _qkv(r, a + "query", a + "key", a + "value", d),
                     "proj": r.linear(p + "attention.output.dense")},
            "mlp": {"fc1": r.linear(p + "intermediate.dense"),
                    "fc2": r.linear(p + "output.dense")},
            "norm1": r.norm(p + "attention.output.LayerNorm"),
            "norm2": r.norm(p + "output.LayerNorm"),
        })
    for k in ("pooler.dense.weight", "pooler.dense.bias"):  # the unused pooler
        if k in r:
            r.get(k)
    return {"frontend": frontend, "encoder": {"blocks": stack(blocks)}}


def _text_to(config, params):
    from transformers import Data2VecTextConfig, Data2VecTextModel
    m = config.model
    d = m.dim
    offset = PAD_ID + 1
    hf_config = Data2VecTextConfig(
        vocab_size=m.vocab_size, hidden_size=d, num_hidden_layers=m.depth,
        num_attention_heads=m.num_heads, intermediate_size=int(d * m.mlp_ratio),
        hidden_act="gelu", max_position_embeddings=m.max_positions + offset,
        type_vocab_size=1, layer_norm_eps=m.norm_eps, pad_token_id=PAD_ID,
        bos_token_id=PAD_ID + 1, eos_token_id=PAD_ID + 2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    f = params["frontend"]
    pos = np.asarray(f["pos_embed"])
    sd = {"embeddings.word_embeddings.weight": np.asarray(f["token_embed"]["embedding"]),
          "embeddings.position_embeddings.weight":
              np.concatenate([np.zeros((offset, d), pos.dtype), pos]),
          "embeddings.token_type_embeddings.weight": np.zeros((1, d), np.float32),
          **{"embeddings.LayerNorm." + k: v for k, v in _norm_out(f["emb_norm"]).items()}}
    for i, b in enumerate(unstack(params["encoder"]["blocks"], m.depth)):
        p = f"encoder.layer.{i}."
        a = p + "attention.self."
        for name, (w, bias) in zip(("query", "key", "value"), _split_qkv(b["attn"]["qkv"], d)):
            sd[a + name + ".weight"], sd[a + name + ".bias"] = w, bias
        for ours, theirs in ((b["attn"]["proj"], "attention.output.dense"),
                             (b["mlp"]["fc1"], "intermediate.dense"),
                             (b["mlp"]["fc2"], "output.dense")):
            sd.update({p + theirs + "." + k: v for k, v in _linear_out(ours).items()})
        for ours, theirs in ((b["norm1"], "attention.output.LayerNorm"),
                             (b["norm2"], "output.LayerNorm")):
            sd.update({p + theirs + "." + k: v for k, v in _norm_out(ours).items()})
    return Data2VecTextModel(hf_config, add_pooling_layer=False), sd


# ----------------------------------------------------------------------------- audio
def _audio_config(hf) -> ml_collections.ConfigDict:
    _require(hf.hidden_act == "gelu", "hidden_act", f"{hf.hidden_act!r}; ours is exact GELU")
    _require(hf.feat_extract_activation == "gelu", "feat_extract_activation",
             f"{hf.feat_extract_activation!r}; ours is exact GELU")
    _require(not getattr(hf, "add_adapter", False), "add_adapter", "adapters are not supported")
    # Our conv and feature LayerNorms use torch's default eps; HF's feature
    # projection LayerNorm uses layer_norm_eps.
    _require(hf.layer_norm_eps == 1e-5, "layer_norm_eps",
             f"{hf.layer_norm_eps}; must be 1e-5 (the feature LayerNorm's eps in our model)")
    _require(hf.conv_pos_kernel_size >= 3, "conv_pos_kernel_size", "must be >= 3")
    config = base_config("audio", "base_v1")
    depth = int(hf.num_conv_pos_embeddings)
    _set_model(config, conv_dims=tuple(int(c) for c in hf.conv_dim),
               conv_kernels=tuple(int(k) for k in hf.conv_kernel),
               conv_strides=tuple(int(s) for s in hf.conv_stride), conv_bias=bool(hf.conv_bias),
               dim=int(hf.hidden_size), depth=int(hf.num_hidden_layers),
               num_heads=int(hf.num_attention_heads),
               mlp_ratio=hf.intermediate_size / hf.hidden_size, qkv_bias=True,
               norm_eps=float(hf.layer_norm_eps), pos_conv="stack",
               pos_conv_width=int(hf.conv_pos_kernel_size) * depth, pos_conv_depth=depth,
               pos_conv_groups=int(hf.num_conv_pos_embedding_groups), alibi=False,
               pos_conv_zero_pad="input", drop_path=0.0)
    _require(int(config.model.dim * config.model.mlp_ratio) == hf.intermediate_size,
             "intermediate_size", "must be hidden_size * a ratio that round-trips")
    return config


def _audio_from(r: StateReader, hf, config) -> dict[str, Any]:
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
            "attn": {"qkv": _qkv(r, a + "q_proj", a + "k_proj", a + "v_proj", d),
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


def _audio_to(config, params):
    from transformers import Data2VecAudioConfig, Data2VecAudioModel
    m = config.model
    d = m.dim
    if m.alibi or m.pos_conv != "stack":
        raise ConversionError(
            f"to_huggingface: HF Data2VecAudio has no ALiBi and a stacked positional conv; "
            f"this config has model.alibi={m.alibi}, model.pos_conv={m.pos_conv!r}")
    if m.get("pos_conv_zero_pad", "layer") != "input":
        raise ConversionError(
            "to_huggingface: HF zeroes padded frames only at the positional conv's input; "
            "set model.pos_conv_zero_pad='input' (outputs then match with padding). "
            f"Got {m.get('pos_conv_zero_pad', 'layer')!r}")
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
        sd.update({p + "layer_norm." + k: v for k, v in _norm_out(f[f"conv_norm_{i}"]).items()})
    sd.update({"feature_projection.layer_norm." + k: v
               for k, v in _norm_out(f["feature_norm"]).items()})
    sd.update({"feature_projection.projection." + k: v for k, v in _linear_out(f["proj"]).items()})
    sd.update({"encoder.layer_norm." + k: v for k, v in _norm_out(c["emb_norm"]).items()})
    for i in range(m.pos_conv_depth):
        p = f"encoder.pos_conv_embed.layers.{i}.conv."
        sd[p + "weight"] = np.asarray(c[f"pos_conv_{i}"]["kernel"]).transpose(2, 1, 0)
        sd[p + "bias"] = np.asarray(c[f"pos_conv_{i}"]["bias"])
    for i, b in enumerate(unstack(params["encoder"]["blocks"], m.depth)):
        p = f"encoder.layers.{i}."
        a = p + "attention."
        for name, (w, bias) in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(b["attn"]["qkv"], d)):
            sd[a + name + ".weight"], sd[a + name + ".bias"] = w, bias
        for ours, theirs in ((b["attn"]["proj"], "attention.out_proj"),
                             (b["mlp"]["fc1"], "feed_forward.intermediate_dense"),
                             (b["mlp"]["fc2"], "feed_forward.output_dense")):
            sd.update({p + theirs + "." + k: v for k, v in _linear_out(ours).items()})
        for ours, theirs in ((b["norm1"], "layer_norm"), (b["norm2"], "final_layer_norm")):
            sd.update({p + theirs + "." + k: v for k, v in _norm_out(ours).items()})
    if has_mask:
        sd["masked_spec_embed"] = np.asarray(params["mask_emb"]["embedding"])
    return Data2VecAudioModel(hf_config), sd



# ----------------------------------------------------------------------------- API
_KINDS = {
    # model_type -> (modality, config fn, state fn)
    "data2vec-vision": ("image", _vision_config, _vision_from),
    "data2vec-text": ("text", _text_config, _text_from),
    "data2vec-audio": ("audio", _audio_config, _audio_from),
}


def from_huggingface(model_or_state: Any, hf_config: Any = None) -> Converted:
    """A transformers Data2Vec{Vision,Audio,Text}Model (or its state dict plus
    its config) -> `Converted(config, params)`, callable as an encoder.

    Fails with `ConversionError` on an unmapped or unused tensor, a wrong shape,
    or an architecture option our model lacks.
    """
    if hf_config is None:
        if not hasattr(model_or_state, "state_dict") or not hasattr(model_or_state, "config"):
            raise TypeError("from_huggingface: pass a transformers model, or a state dict "
                            "together with its config (hf_config=...)")
        state, hf_config = model_or_state.state_dict(), model_or_state.config
    else:
        state = model_or_state
    kind = getattr(hf_config, "model_type", None)
    if kind not in _KINDS:
        raise ConversionError(f"from_huggingface: model_type {kind!r}; expected one of "
                              f"{sorted(_KINDS)}")
    modality, config_fn, state_fn = _KINDS[kind]
    config = config_fn(hf_config)
    # A task model (e.g. ...ForImageClassification) prefixes its encoder.
    prefix = {"image": "data2vec_vision.", "audio": "data2vec_audio.",
              "text": "data2vec_text."}[modality]
    if any(k.startswith(prefix) for k in state):
        # Other tensors (the task head) stay and are reported as unmapped.
        state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    reader = StateReader(state, f"Hugging Face {kind} state dict", ignore=_IGNORE)
    params = state_fn(reader, hf_config, config)
    reader.finish()
    expected = expected_params(config)
    check_tree(params, {k: expected[k] for k in params}, "from_huggingface")
    return Converted(config, params)


def to_huggingface(config: ml_collections.ConfigDict, params: Any):
    """Our config and params (student or EMA teacher) -> a transformers model in
    eval mode; `model.save_pretrained(dir)` writes a folder that
    `Data2Vec*Model.from_pretrained(dir)` loads."""
    import torch
    params = {k: v for k, v in params.items()}
    needed = {"image": ("frontend", "encoder", "final_norm"), "text": ("frontend", "encoder"),
              "audio": ("frontend", "context", "encoder")}.get(config.modality, ())
    missing = [k for k in needed if k not in params]
    if missing:
        raise ConversionError(f"to_huggingface: params lack the subtrees {missing} "
                              f"(a {config.modality} encoder needs {list(needed)})")
    expected = expected_params(config)
    check_tree({k: params[k] for k in params if k in expected},
               {k: expected[k] for k in params if k in expected}, "to_huggingface")
    if config.modality == "image":
        model, sd = _vision_to(config, params)
    elif config.modality == "text":
        model, sd = _text_to(config, params)
    elif config.modality == "audio":
        model, sd = _audio_to(config, params)
    else:
        raise ConversionError(f"to_huggingface: no HF model for modality {config.modality!r}")
    tensors = {k: torch.from_numpy(np.array(v, np.float32, copy=True))
               for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not any(s in k for s in _IGNORE)]
    if missing or unexpected:
        raise ConversionError(f"to_huggingface: HF model keys missing {missing[:20]}, "
                              f"unexpected {unexpected[:20]}")
    return model.eval()
