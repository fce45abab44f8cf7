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
PER_BLOCK_TABLE = "attention.attention.relative_position_bias.relative_position_bias_table"


def config_from_hf(hf) -> ml_collections.ConfigDict:
    hf_require(hf.hidden_act == "gelu", "hidden_act", f"{hf.hidden_act!r}; ours is exact GELU ('gelu')")
    hf_require(not hf.use_absolute_position_embeddings, "use_absolute_position_embeddings",
             "learned absolute positions are not in our v1 ViT (BEiT uses none)")
    hf_require(not (hf.use_relative_position_bias and hf.use_shared_relative_position_bias),
               "use_relative_position_bias", "per-block tables together with a shared one: "
               "our model has one or the other (model.rel_pos_bias)")
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
               rel_pos_bias=("per_block" if hf.use_relative_position_bias else
                             "shared" if hf.use_shared_relative_position_bias else "none"),
               abs_pos="none", norm_eps=float(hf.layer_norm_eps), drop_path=0.0,
               # use_mean_pooling: HF's encoder ends without a LayerNorm (the
               # pooler normalizes the mean instead), so does ours then.
               final_norm=not hf.use_mean_pooling)
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
    elif m.rel_pos_bias == "per_block":  # [L, size, H], block i's table at i
        frontend["rel_pos_bias"] = {"relative_position_bias_table": np.stack([r.get(
            f"encoder.layer.{i}.{PER_BLOCK_TABLE}") for i in range(m.depth)])}
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
    params = {"frontend": frontend, "encoder": {"blocks": stack(blocks)}}
    if m.final_norm:
        params["final_norm"] = r.norm("layernorm")
    return params


def encoder_subtrees(config) -> tuple[str, ...]:
    """Our subtrees an HF encoder holds (no final_norm with use_mean_pooling)."""
    return ENCODER_SUBTREES if config.model.get("final_norm", True) else ENCODER_SUBTREES[:2]


def check_export(config) -> None:
    """A config HF Data2VecVision cannot hold -> ConversionError naming the field."""
    m = config.model
    if config.version != "v1" or not m.layer_norm_first:
        raise ConversionError(
            "to_huggingface: HF Data2VecVision is the pre-LN BEiT ViT of data2vec 1.0; this "
            f"config is version={config.version!r}, model.layer_norm_first={m.layer_norm_first} "
            "(2.0 image models are post-LN and have no HF class)")
    if m.abs_pos != "none":
        raise ConversionError(f"to_huggingface: model.abs_pos={m.abs_pos!r} has no HF "
                              "Data2VecVision counterpart with a v1 model")


def head_from_hf(r: StateReader, hf) -> tuple[str | None, Any]:
    """Data2VecVisionForImageClassification's pooler and classifier ->
    ("image_classification", {"fc_norm" (mean pooling), "head"}). A base
    model's pooler (unused by last_hidden_state) is read and dropped."""
    fc_norm = r.norm("pooler.layernorm") if "pooler.layernorm.weight" in r else None
    if "classifier.weight" not in r:
        return None, None
    head = {"head": r.linear("classifier")}
    if hf.use_mean_pooling:
        head["fc_norm"] = fc_norm
    return "image_classification", head


def to_hf(config, params, head=None, task=None):
    from transformers import (Data2VecVisionConfig, Data2VecVisionForImageClassification,
                              Data2VecVisionModel)
    m = config.model
    check_export(config)
    final_norm = m.get("final_norm", True)
    if task not in (None, "image_classification"):
        raise ConversionError(f"to_huggingface: task {task!r}; HF vision task heads: "
                              "'image_classification'")
    if head is not None and ("fc_norm" in head) == final_norm:
        raise ConversionError(
            "to_huggingface: HF pools the mean of the patch tokens through a LayerNorm only "
            "with use_mean_pooling, whose encoder has no final LayerNorm; a head with fc_norm "
            f"needs model.final_norm=False, one without needs True (got {final_norm})")
    d = m.dim
    hf_config = Data2VecVisionConfig(
        hidden_size=d, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(d * m.mlp_ratio), hidden_act="gelu", image_size=m.image_size,
        patch_size=m.patch_size, num_channels=m.channels, use_mask_token=True,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=m.rel_pos_bias == "per_block",
        use_shared_relative_position_bias=m.rel_pos_bias == "shared",
        layer_scale_init_value=m.layer_scale_init, use_mean_pooling=not final_norm,
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
        if m.rel_pos_bias == "per_block":
            sd[p + PER_BLOCK_TABLE] = np.asarray(
                f["rel_pos_bias"]["relative_position_bias_table"])[i]
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
    if final_norm:
        sd.update({"layernorm." + k: v for k, v in norm_out(params["final_norm"]).items()})
    if head is None:
        return Data2VecVisionModel(hf_config, add_pooling_layer=False), sd
    out = linear_out(head["head"])
    hf_config.num_labels = int(out["weight"].shape[0])
    sd = {PREFIX + k: v for k, v in sd.items()}
    if "fc_norm" in head:
        sd.update({PREFIX + "pooler.layernorm." + k: v for k, v in norm_out(head["fc_norm"]).items()})
    sd.update({"classifier." + k: v for k, v in out.items()})
    return Data2VecVisionForImageClassification(hf_config), sd


def batch_from_hf(x: np.ndarray, attention_mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """HF `pixel_values` [B,C,H,W] -> our batch {"image": [B,H,W,C]}."""
    del attention_mask
    if x.ndim != 4:
        raise ValueError(f"pixel_values must be [B,C,H,W], got shape {x.shape}")
    return {"image": np.transpose(x, (0, 2, 3, 1)).astype(np.float32)}
