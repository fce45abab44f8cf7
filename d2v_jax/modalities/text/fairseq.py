"""fairseq data2vec text checkpoints -> our config, params and ema_params.

Three layouts (docs/convert.md has the tables):

- 2.0, `data2vec_multi` with a TEXT encoder: `modality_encoders.TEXT.*`
  (`local_encoder.embed_tokens`, `embed_positions`, `layernorm_embedding`,
  the 1-D decoder), main `blocks.*`, the teacher's blocks under `_ema` as
  `{i}.*` (`ema_encoder_only`, the released recipe).
- 1.0, `data2vec_text` (RoBERTa-style): `encoder.sentence_encoder.*`
  (embeddings, `layers.*` with separate q/k/v, post-LN), the regression head
  `encoder.regression_head.{0,2}` (Linear(D,2D) -> GELU -> Linear(2D,D)) and
  the teacher under `encoder._ema`.
- fine-tuned for classification: the 1.0 encoder, or the 2.0 data2vec_multi
  under `model.*` (`Data2VecTextClassificationModel`, no decoder or teacher),
  and one `classification_heads.<name>.{dense,out_proj}` (RoBERTa's head:
  first token -> dense -> tanh -> out_proj), returned as `head`, task
  "classification".

Token ids are the checkpoint's fairseq dictionary ids (pad = 1 unless the
position table says otherwise); positions start after the pad id as in
fairseq, so a right-padded row's real tokens see the same positions. The
config's `tokenizer.kind` is `gpt2` (fairseq's id layout): fine-tuning or
pretraining further reads the GPT-2 BPE files that `python -m d2v_jax.prepare
--tokenizer_for=<converted dir>` checks against the vocabulary and saves there.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from d2v_jax.convert.common import (ConversionError, StateReader, base_config, check_tree,
                                    expected_params)
from d2v_jax.convert.fairseq_common import (ALT_BLOCK, SEPARATE_QKV_BLOCK, FairseqConversion,
                                            apply_training_cfg, block_prefixes, blocks, cfg_get,
                                            classification_head, ema_subset, encoder_only_ema,
                                            heads_from,
                                            mlp_ratio, num_blocks, odd_kernel, read, split_ema,
                                            split_wrapper)

TEXT = "modality_encoders.TEXT."
WRAPPED = "model."  # Data2VecTextClassificationModel's data2vec_multi
V1 = "encoder.sentence_encoder."
KEY_PREFIX = f"{TEXT} | {WRAPPED}{TEXT} | {V1}"  # what `convert.from_fairseq` matches on
FAIRSEQ_PAD = 1  # fairseq Dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3


def matches(state: Mapping[str, Any]) -> bool:
    """A data2vec_multi TEXT or data2vec_text checkpoint, pretrained or
    fine-tuned for classification (2.0: the multi model under `model.`)."""
    return (any(k.startswith((TEXT, WRAPPED + TEXT)) for k in state)
            or V1 + "embed_tokens.weight" in state)


def from_fairseq(checkpoint: Mapping[str, Any], num_heads: int | None = None
                 ) -> FairseqConversion:
    """A fairseq data2vec text checkpoint (2.0, 1.0, or 1.0 fine-tuned with a
    classification head) -> `(config, params, ema_params)` (+ `.head`, `.task`)."""
    state = checkpoint["model"] if "model" in checkpoint else checkpoint
    if any(k.startswith(TEXT) for k in state):
        return _from_multi(checkpoint, num_heads)
    if any(k.startswith(WRAPPED + TEXT) for k in state):  # Data2VecTextClassificationModel
        inner, outer = split_wrapper(checkpoint, WRAPPED,
                                     ("model", "pretrained_model_args", "model"))
        config, params, _ = _from_multi(inner, num_heads, finetuned=True)
        r = StateReader(outer, "fairseq state dict (data2vec text classification)")
        head = classification_head(r, "fairseq data2vec text classification")
        r.finish()
        if head is None:
            raise ConversionError("fairseq state dict: a 'model.'-wrapped data2vec_multi TEXT "
                                  "without classification_heads.*")
        return FairseqConversion(config, params, None, head=head, task="classification")
    return _from_v1(checkpoint, num_heads)


def _embeddings(r: StateReader, p: str, config, pad: int, scale: float = 1.0) -> dict[str, Any]:
    """Token table (times fairseq's embed_scale, folded in), positions from
    row pad + 1 on (fairseq numbers real tokens pad+1, pad+2, ...), the
    embedding LayerNorm."""
    m = config.model
    table = r.get(p + "embed_positions.weight")
    norm = p + ("layernorm_embedding" if p + "layernorm_embedding.weight" in r
                else "emb_layer_norm")  # the older fairseq name
    return {"token_embed": {"embedding": r.get(p + "embed_tokens.weight") * np.float32(scale)},
            "pos_embed": table[pad + 1: pad + 1 + m.max_positions],
            "emb_norm": r.norm(norm)}


def _text_model(config, vocab: int, dim: int, depth: int, heads: int, hidden: int,
                positions: int, eps: float) -> None:
    with config.unlocked():
        # fairseq dictionary ids (<s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask>): the
        # released checkpoints' vocabulary is RoBERTa's GPT-2 BPE + dict.txt,
        # whose files `python -m d2v_jax.prepare --tokenizer_for` saves beside it.
        config.tokenizer.kind = "gpt2"
        m = config.model
        m.vocab_size, m.dim, m.depth, m.num_heads = vocab, dim, depth, heads
        m.mlp_ratio = mlp_ratio(hidden, dim)
        m.max_positions, m.norm_eps, m.drop_path = positions, eps, 0.0
        config.data.max_len = min(config.data.max_len, positions)
        config.target.top_k = min(config.target.top_k, depth)


def _positions(state, key: str, max_positions: Any) -> tuple[int, int]:
    """(pad id, usable positions) from the table [max + pad + 1, D]."""
    rows = tuple(state[key].shape)[0]
    pad = FAIRSEQ_PAD if max_positions is None else rows - int(max_positions) - 1
    if pad < 0 or rows - pad - 1 < 1:
        raise ConversionError(f"fairseq state dict: {key!r} has {rows} rows; with "
                              f"max_source_positions={max_positions} the pad id would be {pad}")
    return pad, rows - pad - 1


# ----------------------------------------------------------------------------- 2.0
def _decoder_proj(r: StateReader, prefix: str) -> dict[str, Any]:
    """fairseq Decoder1d's projection: one Linear (`proj`) or, with
    projection_layers=n > 1, Sequential(Linear, GELU, ..., Linear) (`proj.0`,
    `proj.2`, ...) -> our `proj_0`, `proj_1`, ... and the last one `proj`."""
    if prefix + "proj.weight" in r:
        return {"proj": r.linear(prefix + "proj")}
    layers, _ = _projection(r.state, prefix, 1)
    ids = list(range(0, 2 * layers, 2))  # Linear at 0, 2, ...; GELU between
    out = {f"proj_{j}": r.linear(f"{prefix}proj.{i}") for j, i in enumerate(ids[:-1])}
    out["proj"] = r.linear(f"{prefix}proj.{ids[-1]}")
    return out


def _projection(state: Mapping[str, Any], prefix: str, dec_dim: int) -> tuple[int, float]:
    """(projection_layers, projection_ratio) from the decoder's weights."""
    if prefix + "proj.weight" in state:
        return 1, 2.0
    layers = sorted(int(k[len(prefix) + 5:].split(".")[0]) for k in state
                    if k.startswith(prefix + "proj.") and k.endswith(".weight"))
    if layers != list(range(0, 2 * len(layers), 2)):
        raise ConversionError(f"fairseq state dict: decoder projection layers {layers} under "
                              f"{prefix}proj.; expected Linear at 0, 2, ...")
    return len(layers), tuple(state[f"{prefix}proj.0.weight"].shape)[0] / dec_dim


def _from_multi(checkpoint, num_heads, finetuned: bool = False) -> FairseqConversion:
    cfg, state, ema = split_ema(checkpoint)
    mc = cfg_get(cfg, "model")
    tc = cfg_get(mc, "modalities", "text")
    where = "fairseq data2vec_multi TEXT"
    p = TEXT + "local_encoder."
    if cfg_get(mc, "layer_norm_first", default=False) or "norm.weight" in state:
        raise ConversionError(f"{where}: layer_norm_first=True; our 2.0 text model is post-LN")
    if not cfg_get(tc, "no_scale_embedding", default=True):
        raise ConversionError(f"{where}: cfg no_scale_embedding=False is not supported")
    if num_blocks(state, TEXT + "context_encoder.blocks."):
        raise ConversionError(f"{where}: prenet blocks (prenet_depth > 0) and their "
                              "context_encoder.norm have no counterpart in our text model")
    vocab, dim = tuple(state[p + "embed_tokens.weight"].shape)
    pad, positions = _positions(state, p + "embed_positions.weight",
                                cfg_get(tc, "max_source_positions"))
    depth = num_blocks(state, "blocks.")
    hidden = tuple(state["blocks.0.mlp.fc1.weight"].shape)[0]
    dec_layers = num_blocks(state, TEXT + "decoder.blocks.")  # 0: fine-tuned, no decoder
    if dec_layers:
        w0 = tuple(state[TEXT + "decoder.blocks.0.0.weight"].shape)  # [Ddec, D/G, k]
        odd_kernel(w0[2], "modalities.text.decoder.decoder_kernel")
    config = base_config("text", "base_v2")
    _text_model(config, vocab, dim, depth, heads_from(cfg, num_heads, ("model", "num_heads")),
                hidden, positions, float(cfg_get(mc, "norm_eps", default=1e-5)))
    with config.unlocked():
        d = config.decoder
        d.residual = bool(cfg_get(tc, "decoder", "decoder_residual", default=d.residual))
        d.mask_noise_std = float(cfg_get(tc, "mask_noise_std", default=d.mask_noise_std))
        if dec_layers:
            d.dim, d.kernel, d.layers, d.groups = w0[0], w0[2], dec_layers, dim // w0[1]
            d.residual = bool(cfg_get(tc, "decoder", "decoder_residual", default=True))
            d.projection_layers, d.projection_ratio = _projection(state, TEXT + "decoder.",
                                                                  w0[0])
        if cfg_get(tc, "decoder", "input_dropout") is not None:
            d.input_dropout = float(cfg_get(tc, "decoder", "input_dropout"))
        config.masking.ratio = float(cfg_get(tc, "mask_prob", default=config.masking.ratio))
    apply_training_cfg(config, mc)
    expected = expected_params(config)
    r = StateReader(state, "fairseq state dict")
    params = {"frontend": _embeddings(r, p, config, pad),
              "encoder": blocks(r, block_prefixes(state, "blocks."), ALT_BLOCK, dim)}
    if dec_layers:
        dec = read(r, TEXT + "decoder.blocks.",
                   [((f"conv_{i}",), f"{i}.0", "conv1d") for i in range(dec_layers)])
        dec.update(_decoder_proj(r, TEXT + "decoder."))
        params["decoder"] = dec
    r.finish()
    check_tree(params, {k: expected[k] for k in params}, "from_fairseq params")
    ema_params = None
    if ema is not None:
        er = StateReader(ema, "fairseq state dict '_ema'")
        main = encoder_only_ema(state, ema, er, dim)  # the released recipe
        if main is not None:
            teacher = {"encoder": main}
        else:
            teacher = {"encoder": blocks(er, block_prefixes(ema, "blocks."), ALT_BLOCK, dim)}
            if p + "embed_tokens.weight" in ema:  # the teacher's own embeddings
                teacher["frontend"] = _embeddings(er, p, config, pad)
                with config.unlocked():
                    config.ema.shared = tuple(s for s in config.ema.shared if s != "frontend")
        er.finish()
        ema_params = ema_subset(config, teacher, expected, params)
    return FairseqConversion(config, params, ema_params)


# ----------------------------------------------------------------------------- 1.0
def _from_v1(checkpoint, num_heads) -> FairseqConversion:
    cfg, state, ema = split_ema(checkpoint, "encoder._ema")
    mc = cfg_get(cfg, "model")
    tr = cfg_get(mc, "transformer")
    where = "fairseq data2vec_text"
    if cfg_get(tr, "encoder", "normalize_before", default=False):
        raise ConversionError(f"{where}: cfg transformer.encoder.normalize_before=True "
                              "(pre-LN); our text model is post-LN")
    if V1 + "layer_norm.weight" in state:
        raise ConversionError(f"{where}: {V1}layer_norm.weight is the final LayerNorm of a "
                              "pre-LN encoder; our text model is post-LN")
    vocab, dim = tuple(state[V1 + "embed_tokens.weight"].shape)
    pad, positions = _positions(state, V1 + "embed_positions.weight",
                                cfg_get(tr, "max_source_positions",
                                        default=cfg_get(mc, "max_positions")))
    depth = num_blocks(state, V1 + "layers.")
    hidden = tuple(state[V1 + "layers.0.fc1.weight"].shape)[0]
    # fairseq's TransformerConfig default scales token embeddings by sqrt(D);
    # data2vec text sets no_scale_embedding=True. Either folds into the table.
    scale = 1.0 if cfg_get(tr, "no_scale_embedding", default=True) else float(np.sqrt(dim))
    config = base_config("text", "base_v1")
    heads = heads_from(cfg, num_heads, ("model", "transformer", "encoder", "attention_heads"))
    _text_model(config, vocab, dim, depth, heads, hidden, positions, 1e-5)
    apply_training_cfg(config, mc)
    r = StateReader(state, "fairseq state dict")
    params = {"frontend": _embeddings(r, V1, config, pad, scale),
              "encoder": blocks(r, block_prefixes(state, V1 + "layers."), SEPARATE_QKV_BLOCK,
                                dim)}
    if "encoder.regression_head.0.weight" in r:
        if "encoder.regression_head.2.weight" not in r:
            raise ConversionError(f"{where}: a 1-layer regression head (head_layers=1); ours "
                                  "is Linear(D, 2D) -> GELU -> Linear(2D, D) (head_layers=2)")
        params.update(read(r, "encoder.regression_head.", ((("head_fc1",), "0", "linear"),
                                                            (("head_fc2",), "2", "linear"))))
    head = classification_head(r, where)
    r.finish()
    expected = expected_params(config)
    check_tree(params, {k: expected[k] for k in params}, "from_fairseq params")
    ema_params = None
    if ema is not None:  # the sentence encoder's names, without "encoder.sentence_encoder."
        er = StateReader(ema, "fairseq state dict 'encoder._ema'")
        if "embed_tokens.weight" in ema:
            # ema_transformer_layers_only: fairseq's skip_keys copy the student's
            # embeddings into the teacher every step; ours shares them (ema.shared).
            _embeddings(er, "", config, pad, scale)
        teacher = {"encoder": blocks(er, block_prefixes(ema, "layers."), SEPARATE_QKV_BLOCK, dim)}
        er.finish()
        ema_params = ema_subset(config, teacher, expected, params)
    return FairseqConversion(config, params, ema_params, head=head,
                             task="classification" if head is not None else None)
