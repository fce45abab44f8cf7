"""Hugging Face `Data2VecVisionModel` <-> our image model (docs/convert.md has the table).

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

MODEL_TYPE = "data2vec-vision"  # transformers config.model_type
PREFIX = "data2vec_vision."  # a task model's (e.g. ...ForSequenceClassification) encoder prefix
INPUT = "pixel_values"  # the encoder's input argument
ENCODER_SUBTREES = ("frontend", "encoder", "final_norm")  # our subtrees a Hugging Face encoder holds


def config_from_hf(hf) -> ml_collections.ConfigDict:
    hf_require(hf.hidden_act == "gelu", "hidden_act", f"{hf.hidden_act!r}; ours is exact GELU ('gelu')")
    hf_require(not hf.use_absolute_position_embeddings, "use_absolute_position_embeddings",
             "learned absolute positions are not in our v1 ViT (BEiT uses none)")
    hf_require(not hf.use_relative_position_bias, "use_relative_position_bias",
             "per-block relative position bias is not supported; our model has one shared "
             "table (use_shared_relative_position_bias=True)")
    hf_require(not hf.use_mean_pooling, "use_mean_pooling",
             "True makes HF's last_hidden_state skip the final LayerNorm; ours ends with it")
    hf_require(hf.hidden_size % hf.num_attention_heads == 0, "hidden_size", "not divisible by heads")
    size = hf.image_size if isinstance(hf.image_size, int) else hf.image_size[0]
    hf_require(isinstance(hf.image_size, int) or hf.image_size[0] == hf.image_size[1],
             "image_size", "must be square")
    config = base_config("image", "base_v1")
    set_model(config, image_size=size, patch_size=int(hf.patch_size),
               channels=int(hf.num_channels), dim=int(hf.hidden_size),
               depth=int(hf.num_hidden_layers), num_heads=int(hf.num_attention_heads),
               mlp_ratio=hf.intermediate_size / hf.hidden_size, qkv_bias=True,
               layer_norm_first=True, layer_scale_init=float(hf.layer_scale_init_value),
               rel_pos_bias="shared" if hf.use_shared_relative_position_bias else "none",
               abs_pos="none", norm_eps=float(hf.layer_norm_eps), drop_path=0.0)
    hf_require(int(config.model.dim * config.model.mlp_ratio) == hf.intermediate_size,
             "intermediate_size", "must be hidden_size * a ratio that round-trips")
    return config


def params_from_hf(r: StateReader, hf, config) -> dict[str, Any]:
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
            "attn": {"qkv": qkv(r, a + "query", a + "key", a + "value", d),
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


def to_hf(config, params):
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
        (wq, bq), (wk, _), (wv, bv) = split_qkv(b["attn"]["qkv"], d)  # k bias: see _qkv
        sd.update({a + "query.weight": wq, a + "query.bias": bq, a + "key.weight": wk,
                   a + "value.weight": wv, a + "value.bias": bv})
        for ours, theirs in ((b["attn"]["proj"], "attention.output.dense"),
                             (b["mlp"]["fc1"], "intermediate.dense"),
                             (b["mlp"]["fc2"], "output.dense")):
            sd.update({p + theirs + "." + k: v for k, v in linear_out(ours).items()})
        for ours, theirs in ((b["norm1"], "layernorm_before"), (b["norm2"], "layernorm_after")):
            sd.update({p + theirs + "." + k: v for k, v in norm_out(ours).items()})
        if m.layer_scale_init > 0:
            sd[p + "lambda_1"], sd[p + "lambda_2"] = b["gamma_1"], b["gamma_2"]
    sd.update({"layernorm." + k: v for k, v in norm_out(params["final_norm"]).items()})
    return Data2VecVisionModel(hf_config, add_pooling_layer=False), sd


def batch_from_hf(x: np.ndarray, attention_mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """HF `pixel_values` [B,C,H,W] -> our batch {"image": [B,H,W,C]}."""
    del attention_mask
    if x.ndim != 4:
        raise ValueError(f"pixel_values must be [B,C,H,W], got shape {x.shape}")
    return {"image": np.transpose(x, (0, 2, 3, 1)).astype(np.float32)}
