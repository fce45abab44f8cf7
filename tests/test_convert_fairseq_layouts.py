"""Every released fairseq data2vec audio and text layout converts.

State dicts carry the exact key names and shapes of each model's module tree
(tests/convert_helpers.py, written from fairseq's modules) with random tensors.
The references below are torch forwards written from fairseq's description
(wav2vec 2.0 conv extractor and positional convs, AltBlock /
TransformerSentenceEncoderLayer post-LN blocks, get_alibi's slopes, Decoder1d,
RobertaClassificationHead), not from our code.
"""

import pytest

pytest.importorskip("torch", reason="needs the convert extra: pip install torch transformers")
pytest.importorskip("transformers", reason="needs the convert extra")

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from d2v_jax import modalities
from d2v_jax.convert import ConversionError, from_fairseq
from d2v_jax.convert.heads import apply_head
from d2v_jax.models.decoder import decoder_from_config
from d2v_jax.train_state import teacher_params

from convert_helpers import (A, CH, PATCH, SIDE, beit_state, CONV, DEC_K, DEC_LAYERS, DEPTH, DIM, HEADS, PAD, POS_DEPTH,
                             POS_G, SV1, T, VOCAB, audio_ctc_checkpoint, finetuned_v2,
                             audio_v1_checkpoint, audio_v2_checkpoint, text_cls_checkpoint,
                             text_v1_checkpoint, text_v2_checkpoint)

ATOL = 1e-4


# ----------------------------------------------------------------------------- torch references
def conv_extractor(sd, p, wav):
    """wav2vec 2.0 ConvFeatureExtractionModel, layer_norm mode -> [B, T, C]."""
    x = wav[:, None]
    for i, (c, _, s) in enumerate(CONV):
        x = F.conv1d(x, sd[f"{p}{i}.0.weight"], stride=s)
        x = F.layer_norm(x.transpose(1, 2), (c,), sd[f"{p}{i}.2.1.weight"],
                         sd[f"{p}{i}.2.1.bias"], 1e-5).transpose(1, 2)
        x = F.gelu(x)
    return x.transpose(1, 2)


def pos_conv_stack(x, convs):
    """Sequential(Conv1d(k, padding=k//2, groups), SamePad, LN (no affine), GELU) xN."""
    h = x.transpose(1, 2)
    for w, b in convs:
        k = w.shape[-1]
        h = F.conv1d(h, w, b, padding=k // 2, groups=POS_G)
        if k % 2 == 0:
            h = h[..., :-1]  # SamePad
        h = F.gelu(F.layer_norm(h.transpose(1, 2), (DIM,)).transpose(1, 2))
    return h.transpose(1, 2)


def attention(x, q, k, v, proj, bias=None, key_pad=None):
    """Multi-head self-attention from separate projections (weight, bias) pairs."""
    b, t, _ = x.shape
    hd = DIM // HEADS
    split = lambda y: y.reshape(b, t, HEADS, hd).transpose(1, 2)
    q, k, v = (split(F.linear(x, *w)) for w in (q, k, v))
    logits = (q * hd ** -0.5) @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    if key_pad is not None:
        logits = logits.masked_fill(key_pad[:, None, None, :], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, DIM)
    return F.linear(out, *proj)


def alt_block(x, sd, p, eps, bias=None, key_pad=None):
    """data2vec 2.0 AltBlock, layer_norm_first=False (fused qkv)."""
    w, b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
    qkv = [(w[i * DIM:(i + 1) * DIM], b[i * DIM:(i + 1) * DIM]) for i in range(3)]
    x = x + attention(x, *qkv, (sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]),
                      bias, key_pad)
    x = F.layer_norm(x, (DIM,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
    h = F.linear(F.gelu(F.linear(x, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                 sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return F.layer_norm(x + h, (DIM,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)


def separate_layer(x, sd, p, key_pad=None):
    """TransformerSentenceEncoderLayer / TransformerEncoderLayer, post-LN."""
    lin = lambda n: (sd[p + n + ".weight"], sd[p + n + ".bias"])
    a = attention(x, lin("self_attn.q_proj"), lin("self_attn.k_proj"), lin("self_attn.v_proj"),
                  lin("self_attn.out_proj"), key_pad=key_pad)
    x = F.layer_norm(x + a, (DIM,), *lin("self_attn_layer_norm"), 1e-5)
    h = F.linear(F.gelu(F.linear(x, *lin("fc1"))), *lin("fc2"))
    return F.layer_norm(x + h, (DIM,), *lin("final_layer_norm"), 1e-5)


def alibi(t, scale):
    """fairseq get_alibi (dims=1) times the clamped per-head scale: [1, H, T, T]."""
    def slopes(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    pos = -(torch.arange(t)[None] - torch.arange(t)[:, None]).abs()
    return torch.tensor(slopes(HEADS))[:, None, None] * pos[None] * scale.clamp_min(0).reshape(
        1, HEADS, 1, 1)


def decoder1d(sd, p, x, residual=True, proj_layers=1):
    """fairseq Decoder1d: Conv1d (odd k) -> LN (no affine) -> GELU (+ residual), proj."""
    h = x.transpose(1, 2)
    res = h
    for i in range(DEC_LAYERS):
        h = F.conv1d(h, sd[f"{p}blocks.{i}.0.weight"], sd[f"{p}blocks.{i}.0.bias"],
                     padding=DEC_K // 2, groups=DIM // sd[f"{p}blocks.0.0.weight"].shape[1])
        h = F.gelu(F.layer_norm(h.transpose(1, 2), (h.shape[1],)).transpose(1, 2))
        if residual and res.shape[1] == h.shape[1]:
            h = h + res
        res = h
    h = h.transpose(1, 2)
    if proj_layers == 1:
        return F.linear(h, sd[p + "proj.weight"], sd[p + "proj.bias"])
    h = F.gelu(F.linear(h, sd[p + "proj.0.weight"], sd[p + "proj.0.bias"]))
    return F.linear(h, sd[p + "proj.2.weight"], sd[p + "proj.2.bias"])


def audio_v2_reference(sd, ema_or_sd, wav, lengths=None):
    """Data2VecMultiModel(features_only), AUDIO: the student's local features
    (the teacher has no extractor with ema_local_encoder=False). With padding
    (`lengths` in samples, the rest of each row zeros), as fairseq 2.0 runs it:
    `convert_padding_mask` gives the frame padding, nothing zeroes the padded
    frames before the positional convs (`contextualized_features` only zeroes
    masked frames), and the blocks mask padded keys."""
    x = conv_extractor(sd, A + "local_encoder.conv_layers.", wav)
    x = F.layer_norm(x, (x.shape[-1],), sd[A + "project_features.1.weight"],
                     sd[A + "project_features.1.bias"], 1e-5)
    x = F.linear(x, sd[A + "project_features.2.weight"], sd[A + "project_features.2.bias"])
    pad = None if lengths is None else frame_mask(lengths, x.shape[1])
    e = ema_or_sd
    convs = [(e[f"{A}relative_positional_encoder.{j}.0.weight"],
              e[f"{A}relative_positional_encoder.{j}.0.bias"]) for j in range(1, POS_DEPTH + 1)]
    x = x + pos_conv_stack(x, convs)
    x = F.layer_norm(x, (DIM,), e[A + "context_encoder.norm.weight"],
                     e[A + "context_encoder.norm.bias"], 1e-5)
    bias = alibi(x.shape[1], e[A + "alibi_scale"])
    for i in range(DEPTH):
        x = alt_block(x, e, f"blocks.{i}.", 1e-5, bias=bias, key_pad=pad)
    return x


def frame_mask(lengths, t):
    n = torch.tensor(lengths)
    for _, k, s in CONV:
        n = (n - k) // s + 1
    return torch.arange(t)[None] >= n[:, None]


def audio_v1_reference(sd, p, wav, lengths, ema=None):
    """data2vec_audio / w2v_model.extract_features: features LN -> projection ->
    padded frames zeroed -> pos convs -> LN -> post-LN layers (key padding)."""
    x = conv_extractor(sd, p + "feature_extractor.conv_layers.", wav)
    x = F.layer_norm(x, (x.shape[-1],), sd[p + "layer_norm.weight"], sd[p + "layer_norm.bias"])
    x = F.linear(x, sd[p + "post_extract_proj.weight"], sd[p + "post_extract_proj.bias"])
    pad = frame_mask(lengths, x.shape[1])
    x = x.masked_fill(pad[..., None], 0)
    e, q = (sd, p + "encoder.") if ema is None else (ema, "")
    convs = [(e[f"{q}pos_conv.{i}.0.weight"], e[f"{q}pos_conv.{i}.0.bias"])
             for i in range(POS_DEPTH)]
    x = x + pos_conv_stack(x, convs)
    x = F.layer_norm(x, (DIM,), e[q + "layer_norm.weight"], e[q + "layer_norm.bias"])
    for i in range(DEPTH):
        x = separate_layer(x, e, f"{q}layers.{i}.", key_pad=pad)
    return x, pad


def text_reference(emb, tokens, block, key_pad):
    """TextLocalEncoder / fairseq TransformerEncoder embeddings: E[tok] +
    P[make_positions] -> LayerNorm, then the blocks with key padding."""
    real = tokens.ne(PAD)
    pos = torch.cumsum(real, 1) * real + PAD
    x = emb["tokens"][tokens] + emb["positions"][pos]
    x = F.layer_norm(x, (DIM,), emb["norm_w"], emb["norm_b"], 1e-5)
    x = x * real[..., None]
    for i in range(DEPTH):
        x = block(x, i)
    return x


def text_batch():
    torch.manual_seed(3)
    tokens = torch.randint(4, VOCAB, (2, 9))
    tokens[1, 6:] = PAD
    return tokens, tokens.eq(PAD)


_ENCODE = {}


def encode(config, params, batch):
    """Our `encode`, one compilation per config (student and teacher share it)."""
    # `encode` reads only the model fields: pretrained and fine-tuned configs
    # (decoder and training fields differ) share one compilation.
    key = json.dumps([config.modality, config.version, config.model.to_dict()], sort_keys=True,
                     default=list)
    if key not in _ENCODE:
        model = modalities.build_model(config)
        _ENCODE[key] = jax.jit(lambda p, b: model.apply({"params": p}, b, method="encode"))
    # Only the subtrees `encode` reads: student and teacher trees then match.
    used = {k: params[k] for k in ("frontend", "context", "encoder") if k in params}
    return np.asarray(_ENCODE[key](used, batch))


# ----------------------------------------------------------------------------- audio
def padded_wav(seed, length=250):
    """Two clips of 400 samples, the second cut to `length` and zero-padded
    as fairseq's collater pads: (wav, sample padding mask, lengths)."""
    torch.manual_seed(seed)
    wav = torch.randn(2, 400)
    wav[1, length:] = 0
    pad = np.zeros((2, 400), bool)
    pad[1, length:] = True
    return wav, pad, [400, length]


@pytest.mark.slow  # compiles our encoder (~5 s on 2 shared cores)
def test_audio_v2_student_teacher_decoder_match_fairseq():
    """A padded batch, as fairseq 2.0 computes it: the converted config says
    `pos_conv_zero_pad="none"`, and student, teacher and the fine-tuned CTC
    model match at every real frame of both rows."""
    ckpt = audio_v2_checkpoint()
    config, params, ema_params = from_fairseq(ckpt)
    m = config.model
    assert (m.depth, m.dim, m.num_heads, m.alibi, m.pos_conv_depth) == (DEPTH, DIM, HEADS, True, 2)
    assert (m.conv_dims, m.conv_kernels, m.conv_strides) == ((16, 16), (10, 3), (5, 2))
    assert (config.target.top_k, config.target.layer_norm, config.masking.num_clones) == (
        2, "instance", 8)
    assert m.pos_conv_zero_pad == "none"
    sd, ema = ckpt["model"], ckpt["model"]["_ema"]
    wav, pad, lengths = padded_wav(1)
    batch = {"audio": wav.numpy(), "padding_mask": pad}
    with torch.no_grad():
        ref_s = audio_v2_reference(sd, sd, wav, lengths)
        ref_t = audio_v2_reference(sd, ema, wav, lengths)
    real = ~frame_mask(lengths, ref_s.shape[1]).numpy()
    assert 0 < real[1].sum() < real[0].sum() == real.shape[1]
    np.testing.assert_allclose(encode(config, params, batch)[real], ref_s.numpy()[real],
                               atol=ATOL)
    got_t = encode(config, teacher_params(params, ema_params, config), batch)
    np.testing.assert_allclose(got_t[real], ref_t.numpy()[real], atol=ATOL)
    assert (ref_t - ref_s).abs().max().item() > 1e-2  # the teacher is the _ema tensors
    # The teacher shares the student's extractor (ema_local_encoder=False): not EMA.
    assert sorted(ema_params) == ["context", "encoder"] and config.ema.shared == ("frontend",)
    # 2.0 fine-tuned for ASR: Wav2VecCtc around the multi model.
    head = {"w2v_encoder.proj.weight": torch.randn(12, DIM), "w2v_encoder.proj.bias": torch.randn(12)}
    out = from_fairseq(finetuned_v2(ckpt, "w2v_encoder.w2v_model.", "w2v_args", head))
    assert out.task == "ctc" and out.ema_params is None and "decoder" not in out.params
    assert out.config.model.pos_conv_zero_pad == "none"
    logits = F.linear(ref_s, head["w2v_encoder.proj.weight"], head["w2v_encoder.proj.bias"])
    got = apply_head("ctc", out.head, encode(out.config, out.params, batch))
    np.testing.assert_allclose(got[real], logits.numpy()[real], atol=ATOL)
    x = torch.randn(2, 39, DIM)
    dec = decoder_from_config(config.decoder, (-1,), DIM, jnp.float32)
    got = dec.apply({"params": params["decoder"]}, x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(got), decoder1d(sd, A + "decoder.", x).numpy(),
                                   atol=ATOL)


@pytest.mark.slow  # compiles our encoder (~5 s on 2 shared cores)
def test_audio_v1_and_ctc_match_fairseq_with_padding():
    ckpt = audio_v1_checkpoint()
    config, params, ema_params = from_fairseq(ckpt)
    assert config.version == "v1" and config.model.pos_conv == "stack"
    assert (config.target.top_k, config.masking.ratio, config.ema.anneal_steps) == (2, 0.65, 30000)
    sd = ckpt["model"]
    torch.manual_seed(2)
    wav = torch.randn(2, 400)
    wav[1, 250:] = 0
    pad = np.zeros((2, 400), bool)
    pad[1, 250:] = True
    batch = {"audio": wav.numpy(), "padding_mask": pad}
    with torch.no_grad():
        ref, fpad = audio_v1_reference(sd, "", wav, [400, 250])
        ref_t, _ = audio_v1_reference(sd, "", wav, [400, 250], ema=sd["_ema"])
    real = ~fpad.numpy()
    got = encode(config, params, batch)
    np.testing.assert_allclose(got[real], ref.numpy()[real], atol=ATOL)
    np.testing.assert_allclose(encode(config, teacher_params(params, ema_params, config), batch)[real], ref_t.numpy()[real],
                               atol=ATOL)
    np.testing.assert_array_equal(params["head"]["kernel"], sd["final_proj.weight"].numpy().T)
    np.testing.assert_array_equal(params["mask_emb"]["embedding"], sd["mask_emb"].numpy())

    ctc = audio_ctc_checkpoint()
    out = from_fairseq(ctc)
    config, params, ema_params = out
    assert out.task == "ctc" and ema_params is None
    csd = ctc["model"]
    with torch.no_grad():
        ref, _ = audio_v1_reference(csd, "w2v_encoder.w2v_model.", wav, [400, 250])
        logits = F.linear(ref, csd["w2v_encoder.proj.weight"], csd["w2v_encoder.proj.bias"])
    got = apply_head("ctc", out.head, encode(config, params, batch))
    np.testing.assert_allclose(got[real], logits.numpy()[real], atol=ATOL)


def test_every_audio_and_text_layout_converts_from_half_precision_files():
    """The fp16-run file (float16 student values in float32, float32 `_ema`)
    and a state dict left in float16 convert for every audio and text layout:
    the params are the file's values as float32 (no derived table to check)."""
    from convert_helpers import fp16_run_file, half_file
    layouts = {"audio_v2": audio_v2_checkpoint(), "audio_v1": audio_v1_checkpoint(),
               "audio_ctc": audio_ctc_checkpoint(), "text_v2": text_v2_checkpoint(),
               "text_v1": text_v1_checkpoint(), "text_cls": text_cls_checkpoint()}
    for name, ckpt in layouts.items():
        for variant in (fp16_run_file(ckpt), half_file(ckpt, torch.float16)):
            out = from_fairseq(variant)
            flat = dict(jax.tree_util.tree_flatten_with_path(out.params)[0])
            leaves = [np.asarray(v) for v in flat.values()]
            assert all(x.dtype == np.float32 for x in leaves if x.dtype.kind == "f"), name
            sd = variant["model"]
            # One tensor mapped as is: a LayerNorm scale of the first block.
            key = next(k for k in sd if k.endswith(("norm1.weight", "self_attn_layer_norm.weight")))
            got = [v for p, v in flat.items() if "norm1" in jax.tree_util.keystr(p)
                   and jax.tree_util.keystr(p).endswith("['scale']")][0]
            np.testing.assert_array_equal(np.asarray(got)[0], sd[key].float().numpy(), err_msg=name)


# ----------------------------------------------------------------------------- text
@pytest.mark.slow  # compiles our encoder (~5 s on 2 shared cores)
def test_text_v2_student_teacher_decoder_match_fairseq():
    """base_text_only_task: decoder without residual, projection_layers=2."""
    ckpt = text_v2_checkpoint(proj_layers=2)
    config, params, ema_params = from_fairseq(ckpt)
    m, d = config.model, config.decoder
    assert (m.vocab_size, m.max_positions, m.depth, config.target.top_k) == (VOCAB, 20, DEPTH, 2)
    assert (d.residual, d.projection_layers, d.projection_ratio) == (False, 2, 2.0)
    sd, ema = ckpt["model"], ckpt["model"]["_ema"]
    tokens, pad = text_batch()
    emb = {"tokens": sd[T + "local_encoder.embed_tokens.weight"],
           "positions": sd[T + "local_encoder.embed_positions.weight"],
           "norm_w": sd[T + "local_encoder.layernorm_embedding.weight"],
           "norm_b": sd[T + "local_encoder.layernorm_embedding.bias"]}
    with torch.no_grad():
        ref = text_reference(emb, tokens, lambda x, i: alt_block(x, sd, f"blocks.{i}.", 1e-5,
                                                                 key_pad=pad), pad)
        ref_t = text_reference(emb, tokens, lambda x, i: alt_block(x, ema, f"{i}.", 1e-5,
                                                                   key_pad=pad), pad)
    batch = {"tokens": tokens.numpy(), "padding_mask": pad.numpy()}
    real = ~pad.numpy()
    np.testing.assert_allclose(encode(config, params, batch)[real], ref.numpy()[real], atol=ATOL)
    np.testing.assert_allclose(encode(config, teacher_params(params, ema_params, config), batch)[real], ref_t.numpy()[real],
                               atol=ATOL)
    # 2.0 fine-tuned: Data2VecTextClassificationModel (multi model under "model.").
    p = "classification_heads.sentence_classification_head."
    head = {p + "dense.weight": torch.randn(DIM, DIM) * 0.2, p + "dense.bias": torch.randn(DIM),
            p + "out_proj.weight": torch.randn(3, DIM), p + "out_proj.bias": torch.randn(3)}
    out = from_fairseq(finetuned_v2(ckpt, "model.", "pretrained_model_args", head))
    assert out.task == "classification" and "decoder" not in out.params
    with torch.no_grad():
        logits = F.linear(torch.tanh(F.linear(ref[:, 0], head[p + "dense.weight"],
                                              head[p + "dense.bias"])),
                          head[p + "out_proj.weight"], head[p + "out_proj.bias"])
    got = apply_head("classification", out.head, encode(out.config, out.params, batch))
    np.testing.assert_allclose(got, logits.numpy(), atol=ATOL)
    x = torch.randn(2, config.data.max_len, DIM)
    dec = decoder_from_config(config.decoder, (config.data.max_len,), DIM, jnp.float32)
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(dec.apply({"params": params["decoder"]}, x.numpy())),
                                   decoder1d(sd, T + "decoder.", x, residual=False,
                                             proj_layers=2).numpy(), atol=ATOL)


@pytest.mark.slow  # compiles our encoder (~5 s on 2 shared cores)
def test_text_v1_and_classifier_match_fairseq():
    ckpt = text_v1_checkpoint()
    config, params, ema_params = from_fairseq(ckpt)
    assert config.version == "v1" and (config.target.layer_norm, config.loss.beta) == ("layer", 4)
    sd = ckpt["model"]
    tokens, pad = text_batch()

    def run(e, q):
        emb = {"tokens": e[q + "embed_tokens.weight"], "positions": e[q + "embed_positions.weight"],
               "norm_w": e[q + "layernorm_embedding.weight"],
               "norm_b": e[q + "layernorm_embedding.bias"]}
        return text_reference(emb, tokens, lambda x, i: separate_layer(x, e, f"{q}layers.{i}.",
                                                                       key_pad=pad), pad)

    with torch.no_grad():
        ref, ref_t = run(sd, SV1), run(sd["encoder._ema"], "")
        head = F.linear(F.gelu(F.linear(ref, sd["encoder.regression_head.0.weight"],
                                        sd["encoder.regression_head.0.bias"])),
                        sd["encoder.regression_head.2.weight"], sd["encoder.regression_head.2.bias"])
    batch = {"tokens": tokens.numpy(), "padding_mask": pad.numpy()}
    real = ~pad.numpy()
    got = encode(config, params, batch)
    np.testing.assert_allclose(got[real], ref.numpy()[real], atol=ATOL)
    np.testing.assert_allclose(encode(config, teacher_params(params, ema_params, config), batch)[real], ref_t.numpy()[real],
                               atol=ATOL)
    h = params["head_fc2"]
    ours = jax.nn.gelu(got @ params["head_fc1"]["kernel"] + params["head_fc1"]["bias"],
                       approximate=False) @ h["kernel"] + h["bias"]
    np.testing.assert_allclose(np.asarray(ours)[real], head.numpy()[real], atol=ATOL)

    cls = text_cls_checkpoint()
    out = from_fairseq(cls)
    assert out.task == "classification" and out.ema_params is None
    csd = cls["model"]
    p = "classification_heads.sentence_classification_head."
    with torch.no_grad():
        x = run(csd, SV1)[:, 0]
        logits = F.linear(torch.tanh(F.linear(x, csd[p + "dense.weight"], csd[p + "dense.bias"])),
                          csd[p + "out_proj.weight"], csd[p + "out_proj.bias"])
    got = apply_head("classification", out.head, encode(out.config, out.params, batch))
    np.testing.assert_allclose(got, logits.numpy(), atol=ATOL)


# ----------------------------------------------------------------------------- failures
def test_unknown_and_unmappable_layouts_name_their_keys():
    ckpt = audio_v2_checkpoint()
    extra = dict(ckpt["model"], **{A + "alibi_bias": torch.zeros(1, HEADS, 4, 4)})
    with pytest.raises(ConversionError, match=r"not mapped: \['modality_encoders.AUDIO.alibi_bias'\]"):
        from_fairseq({"model": extra, "cfg": ckpt["cfg"]})
    per_layer = dict(ckpt["model"], **{A + "alibi_scale": torch.ones(DEPTH, 1, HEADS, 1, 1)})
    with pytest.raises(ConversionError, match="learned_alibi_scale_per_layer"):
        from_fairseq({"model": per_layer, "cfg": ckpt["cfg"]})
    t = text_v1_checkpoint()
    sd = dict(t["model"], **{"encoder.lm_head.dense.weight": torch.zeros(DIM, DIM)})
    with pytest.raises(ConversionError, match="encoder.lm_head.dense.weight"):
        from_fairseq({"model": sd, "cfg": t["cfg"]})
    with pytest.raises(ConversionError, match="no known data2vec layout.*first keys"):
        from_fairseq({"model": {"decoder.embed_tokens.weight": torch.zeros(3, 2)}})
    with pytest.raises(ConversionError, match="attention_heads"):
        from_fairseq(text_v1_checkpoint()["model"])


# ----------------------------------------------------------------------------- vision 1.0 (BEiT code)
def beit_index(side):
    """BEiT's relative_position_index (modeling_finetune.RelativePositionBias)."""
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += side - 1
    rel[:, :, 1] += side - 1
    rel[:, :, 0] *= 2 * side - 1
    n = (2 * side - 1) ** 2 + 3
    index = torch.zeros((side * side + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:], index[0:, 0], index[0, 0] = n - 3, n - 2, n - 1
    return index


def beit_reference(sd, image):
    """BEiT VisionTransformer.forward_features (pre-LN, layer scale, q/v biases,
    relative position bias shared or per block), then norm, or mean pooling ->
    fc_norm -> head."""
    x = F.conv2d(image, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1)
    b, t, _ = x.shape
    idx = beit_index(SIDE).view(-1)
    bias_of = lambda table: table[idx].view(t, t, -1).permute(2, 0, 1)[None]
    shared = sd.get("rel_pos_bias.relative_position_bias_table")
    for i in range(DEPTH):
        g = lambda n: sd[f"blocks.{i}.{n}"]
        h = F.layer_norm(x, (DIM,), g("norm1.weight"), g("norm1.bias"), 1e-6)
        qkv = F.linear(h, g("attn.qkv.weight"),
                       torch.cat([g("attn.q_bias"), torch.zeros(DIM), g("attn.v_bias")]))
        q, k, v = qkv.reshape(b, t, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        att = (q * (DIM // HEADS) ** -0.5) @ k.transpose(-2, -1)
        att = att + bias_of(shared if shared is not None else g("attn.relative_position_bias_table"))
        a = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, DIM)
        x = x + g("gamma_1") * F.linear(a, g("attn.proj.weight"), g("attn.proj.bias"))
        h = F.layer_norm(x, (DIM,), g("norm2.weight"), g("norm2.bias"), 1e-6)
        h = F.linear(F.gelu(F.linear(h, g("mlp.fc1.weight"), g("mlp.fc1.bias"))),
                     g("mlp.fc2.weight"), g("mlp.fc2.bias"))
        x = x + g("gamma_2") * h
    if "norm.weight" in sd:
        return F.layer_norm(x, (DIM,), sd["norm.weight"], sd["norm.bias"], 1e-6), None
    f = F.layer_norm(x[:, 1:].mean(1), (DIM,), sd["fc_norm.weight"], sd["fc_norm.bias"], 1e-6)
    return x, F.linear(f, sd["head.weight"], sd["head.bias"])


@pytest.mark.slow  # compiles our encoder twice (~5 s each on 2 shared cores)
def test_vision_v1_beit_code_pretrained_and_finetuned_match():
    sd = beit_state()
    ema = beit_state(seed=1)
    config, params, ema_params = from_fairseq({"model": sd, "model_ema": ema, "args": None})
    m = config.model
    assert (m.rel_pos_bias, m.final_norm, m.num_heads, m.image_size) == ("shared", True, HEADS, 16)
    image = torch.randn(2, CH, PATCH * SIDE, PATCH * SIDE)
    batch = {"image": image.permute(0, 2, 3, 1).numpy()}
    with torch.no_grad():
        ref, _ = beit_reference(sd, image)
        # The teacher's final `norm` is not an EMA parameter of ours: the teacher
        # regresses block outputs; `encode` of the teacher uses the student's.
        ref_t, _ = beit_reference({**ema, "norm.weight": sd["norm.weight"],
                                   "norm.bias": sd["norm.bias"]}, image)
    np.testing.assert_allclose(encode_v1(config, params, batch), ref.numpy(), atol=ATOL)
    np.testing.assert_allclose(encode_v1(config, {**params, **ema_params}, batch), ref_t.numpy(),
                               atol=ATOL)
    np.testing.assert_array_equal(params["head"]["kernel"], sd["lm_head.weight"].numpy().T)
    ft = beit_state(finetuned=True)
    out = from_fairseq({"model": ft})
    assert (out.config.model.rel_pos_bias, out.config.model.final_norm, out.task) == (
        "per_block", False, "image_classification")
    with torch.no_grad():
        ref, logits = beit_reference(ft, image)
    hidden = encode_v1(out.config, out.params, batch)
    np.testing.assert_allclose(hidden, ref.numpy(), atol=ATOL)
    np.testing.assert_allclose(apply_head(out.task, out.head, hidden, 1e-6), logits.numpy(),
                               atol=ATOL)


def encode_v1(config, params, batch):
    """Our image `encode` (reads frontend, encoder and final_norm)."""
    used = {k: params[k] for k in ("frontend", "encoder", "final_norm") if k in params}
    model = modalities.build_model(config)
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, batch, method="encode"))(used))
