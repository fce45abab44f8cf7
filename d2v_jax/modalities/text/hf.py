"""Hugging Face `Data2VecTextModel` <-> our text model (docs/convert.md has the table).

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
from d2v_jax.modalities.text.vocab import BOS_ID, EOS_ID, PAD_ID

FAIRSEQ_LAYOUT = (0, 1, 2)  # (bos, pad, eos) of a fairseq dictionary (gpt2 tokenizer)

MODEL_TYPE = "data2vec-text"  # transformers config.model_type
PREFIX = "data2vec_text."  # a task model's (e.g. ...ForSequenceClassification) encoder prefix
INPUT = "input_ids"  # the encoder's input argument
ENCODER_SUBTREES = ("frontend", "encoder")  # our subtrees a Hugging Face encoder holds


def config_from_hf(hf) -> ml_collections.ConfigDict:
    hf_require(hf.hidden_act == "gelu", "hidden_act", f"{hf.hidden_act!r}; ours is exact GELU")
    pos_type = getattr(hf, "position_embedding_type", "absolute")
    hf_require(pos_type in (None, "absolute"), "position_embedding_type",
             f"{pos_type!r}; ours are learned absolute positions")
    hf_require(getattr(hf, "is_decoder", False) is False, "is_decoder", "must be False")
    config = base_config("text", "base_v1")
    # RoBERTa numbers real tokens from pad_token_id + 1; rows up to the pad id
    # are never read by a right-padded real token.
    offset = hf.pad_token_id + 1
    hf_require(hf.max_position_embeddings > offset, "max_position_embeddings",
             f"{hf.max_position_embeddings} leaves no positions after pad_token_id + 1")
    set_model(config, vocab_size=int(hf.vocab_size), dim=int(hf.hidden_size),
               depth=int(hf.num_hidden_layers), num_heads=int(hf.num_attention_heads),
               mlp_ratio=hf.intermediate_size / hf.hidden_size, qkv_bias=True,
               max_positions=int(hf.max_position_embeddings - offset),
               norm_eps=float(hf.layer_norm_eps), drop_path=0.0)
    with config.unlocked():
        config.data.max_len = min(config.data.max_len, config.model.max_positions)
        if (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id) == FAIRSEQ_LAYOUT:
            config.tokenizer.kind = "gpt2"  # RoBERTa's vocabulary: fairseq dictionary ids
    hf_require(int(config.model.dim * config.model.mlp_ratio) == hf.intermediate_size,
             "intermediate_size", "must be hidden_size * a ratio that round-trips")
    return config


def params_from_hf(r: StateReader, hf, config) -> dict[str, Any]:
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
            "attn": {"qkv": qkv(r, a + "query", a + "key", a + "value", d),
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


def encoder_subtrees(config) -> tuple[str, ...]:
    return ENCODER_SUBTREES


def check_export(config) -> None:
    del config  # every text config of ours has an HF counterpart


def head_from_hf(r: StateReader, hf) -> tuple[str | None, Any]:
    """Data2VecTextForSequenceClassification's `classifier` (RoBERTa's head:
    first token -> dense -> tanh -> out_proj) -> ("classification", ...)."""
    if "classifier.out_proj.weight" not in r:
        return None, None
    return "classification", {"dense": r.linear("classifier.dense"),
                              "out_proj": r.linear("classifier.out_proj")}


def to_hf(config, params, head=None, task=None):
    from transformers import (Data2VecTextConfig, Data2VecTextForSequenceClassification,
                              Data2VecTextModel)
    m = config.model
    if task not in (None, "classification"):
        raise ConversionError(f"to_huggingface: task {task!r}; HF text task heads: "
                              "'classification'")
    d = m.dim
    # The tokenizer's id layout: fairseq's (gpt2: <s> 0, <pad> 1, </s> 2) or ours.
    bos, pad, eos = (FAIRSEQ_LAYOUT if config.tokenizer.get("kind") == "gpt2"
                     else (BOS_ID, PAD_ID, EOS_ID))
    offset = pad + 1
    hf_config = Data2VecTextConfig(
        vocab_size=m.vocab_size, hidden_size=d, num_hidden_layers=m.depth,
        num_attention_heads=m.num_heads, intermediate_size=int(d * m.mlp_ratio),
        hidden_act="gelu", max_position_embeddings=m.max_positions + offset,
        type_vocab_size=1, layer_norm_eps=m.norm_eps, pad_token_id=pad,
        bos_token_id=bos, eos_token_id=eos, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    f = params["frontend"]
    pos = np.asarray(f["pos_embed"])
    sd = {"embeddings.word_embeddings.weight": np.asarray(f["token_embed"]["embedding"]),
          "embeddings.position_embeddings.weight":
              np.concatenate([np.zeros((offset, d), pos.dtype), pos]),
          "embeddings.token_type_embeddings.weight": np.zeros((1, d), np.float32),
          **{"embeddings.LayerNorm." + k: v for k, v in norm_out(f["emb_norm"]).items()}}
    for i, b in enumerate(unstack(params["encoder"]["blocks"], m.depth)):
        p = f"encoder.layer.{i}."
        a = p + "attention.self."
        for name, (w, bias) in zip(("query", "key", "value"), split_qkv(b["attn"]["qkv"], d)):
            sd[a + name + ".weight"], sd[a + name + ".bias"] = w, bias
        for ours, theirs in ((b["attn"]["proj"], "attention.output.dense"),
                             (b["mlp"]["fc1"], "intermediate.dense"),
                             (b["mlp"]["fc2"], "output.dense")):
            sd.update({p + theirs + "." + k: v for k, v in linear_out(ours).items()})
        for ours, theirs in ((b["norm1"], "attention.output.LayerNorm"),
                             (b["norm2"], "output.LayerNorm")):
            sd.update({p + theirs + "." + k: v for k, v in norm_out(ours).items()})
    if head is None:
        return Data2VecTextModel(hf_config, add_pooling_layer=False), sd
    out = linear_out(head["out_proj"])
    hf_config.num_labels = int(out["weight"].shape[0])
    sd = {PREFIX + k: v for k, v in sd.items()}
    sd.update({"classifier.dense." + k: v for k, v in linear_out(head["dense"]).items()})
    sd.update({"classifier.out_proj." + k: v for k, v in out.items()})
    return Data2VecTextForSequenceClassification(hf_config), sd


def batch_from_hf(x: np.ndarray, attention_mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """HF `input_ids` [B,T] (+ attention_mask, 1 = real) -> our batch."""
    pad = np.zeros(x.shape, bool) if attention_mask is None else ~attention_mask.astype(bool)
    return {"tokens": x.astype(np.int32), "padding_mask": pad}
