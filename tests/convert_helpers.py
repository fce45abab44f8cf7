"""Helpers of the conversion tests (tests/test_convert_*.py): tiny Hugging Face
models and a fairseq data2vec 2.0 image checkpoint built from random tensors.

Needs the `convert` extra (torch, transformers): import it after the test
module's `pytest.importorskip` calls.
"""

import jax
import numpy as np
import omegaconf
import torch

# ----------------------------------------------------------------------------- Hugging Face


def perturbed(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hidden(model, **inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state.numpy()


def assert_same_params(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert [k for k, _ in flat_a] == list(flat_b)
    for k, v in flat_a:
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_b[k]), err_msg=str(k))


VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              image_size=16, patch_size=4, num_channels=3, use_mask_token=True,
              use_shared_relative_position_bias=True, use_relative_position_bias=False,
              use_absolute_position_embeddings=False, use_mean_pooling=False,
              layer_scale_init_value=0.1, layer_norm_eps=1e-6)

# ----------------------------------------------------------------------------- fairseq
# A state dict with fairseq's key layout and random tensors.

DIM, DEPTH, HEADS, PATCH, SIDE, CH = 32, 2, 4, 4, 4, 3  # 16x16 images, 4x4 patches
DEC_DIM, DEC_K, DEC_LAYERS, DEC_G = 16, 3, 2, 4
I = "modality_encoders.IMAGE."


def mae_sincos(dim, side):
    """MAE's get_2d_sincos_pos_embed (cls_token=False), written out."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def rand(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def alt_block_tensors(p, dim=None, hidden=None):
    """A data2vec 2.0 AltBlock (fused qkv, post-LN) under prefix `p`."""
    dim = dim or DIM
    hidden = hidden or 4 * dim
    return {p + "attn.qkv.weight": rand(3 * dim, dim), p + "attn.qkv.bias": rand(3 * dim),
            p + "attn.proj.weight": rand(dim, dim), p + "attn.proj.bias": rand(dim),
            p + "norm1.weight": 1 + rand(dim), p + "norm1.bias": rand(dim),
            p + "norm2.weight": 1 + rand(dim), p + "norm2.bias": rand(dim),
            p + "mlp.fc1.weight": rand(hidden, dim), p + "mlp.fc1.bias": rand(hidden),
            p + "mlp.fc2.weight": rand(dim, hidden), p + "mlp.fc2.bias": rand(dim)}


def encoder_tensors(prefix, blocks_prefix, local=True, prenet=0, depth=DEPTH):
    sd = {}
    if local:
        sd[prefix + "local_encoder.proj.weight"] = rand(DIM, CH, PATCH, PATCH)
        sd[prefix + "local_encoder.proj.bias"] = rand(DIM)
    sd[prefix + "fixed_positional_encoder.positions"] = torch.tensor(
        mae_sincos(DIM, SIDE), dtype=torch.float32)[None]
    sd[prefix + "extra_tokens"] = rand(1, 1, DIM)
    sd[prefix + "context_encoder.norm.weight"] = 1 + rand(DIM)
    sd[prefix + "context_encoder.norm.bias"] = rand(DIM)
    for i in range(prenet):
        sd.update(alt_block_tensors(f"{prefix}context_encoder.blocks.{i}."))
    for i in range(depth):
        sd.update(alt_block_tensors(f"{blocks_prefix}{i}."))
    return sd


def fairseq_checkpoint(ema_layout="full", prenet=0, depth=DEPTH, cfg=None):
    """A data2vec_multi IMAGE checkpoint (released base: prenet 2 + depth 10)."""
    torch.manual_seed(0)
    sd = encoder_tensors(I, "blocks.", prenet=prenet, depth=depth)
    for i in range(DEC_LAYERS):
        cin = DIM if i == 0 else DEC_DIM
        sd[f"{I}decoder.blocks.{i}.0.weight"] = rand(DEC_DIM, cin // DEC_G, DEC_K, DEC_K)
        sd[f"{I}decoder.blocks.{i}.0.bias"] = rand(DEC_DIM)
    sd[f"{I}decoder.proj.weight"] = rand(DIM, DEC_DIM)
    sd[f"{I}decoder.proj.bias"] = rand(DIM)
    if ema_layout == "full":  # ema_local_encoder=True: teacher has its own patch embedding
        sd["_ema"] = encoder_tensors(I, "blocks.", prenet=prenet, depth=depth)
    else:  # ema_encoder_only: blocks as "{i}.*"
        sd["_ema"] = {k: v for k, v in encoder_tensors("x.", "", depth=depth).items()
                      if k[0].isdigit()}
    model_cfg = {"num_heads": HEADS, "norm_eps": 1e-6, **(cfg or {})}
    return {"model": sd, "cfg": {"model": model_cfg}}


# ----------------------------------------------------------------------------- file precisions
def fp16_run_file(ckpt):
    """The checkpoint a `common.fp16: true` run writes (every released recipe):
    the trainer calls `model.half()`, so the student (a 2.0 image model's
    sin-cos table too) lives in float16, and `Trainer.save_checkpoint` casts
    it back with `utils.move_to_cpu` (float16 -> float32); the EMA teacher
    (`_ema`, a dict of tensors) is kept in float32 (`ema_fp32`) and saved as
    it is."""
    sd = {k: ({n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v.half().float())
          for k, v in ckpt["model"].items()}
    return {"model": sd, "cfg": ckpt["cfg"]}


def half_file(ckpt, dtype):
    """A state dict left in half precision (a half-precision export): every
    tensor, the teacher's too, in `dtype`."""
    sd = {k: ({n: t.to(dtype) for n, t in v.items()} if isinstance(v, dict) else v.to(dtype))
          for k, v in ckpt["model"].items()}
    return {"model": sd, "cfg": ckpt["cfg"]}


def with_omegaconf(ckpt):
    """The cfg as older fairseq saved it: an omegaconf DictConfig, not a dict."""
    return {"model": ckpt["model"], "cfg": omegaconf.OmegaConf.create(ckpt["cfg"])}


# ----------------------------------------------------------------------------- fairseq audio/text
# Key names and shapes of each released model's module tree, written
# from fairseq's modules: data2vec2.py + modalities/{audio,text}.py (2.0),
# data2vec_audio.py + wav2vec2.py (audio 1.0, Wav2VecCtc), data2vec_text.py +
# fairseq TransformerEncoder (text 1.0, RoBERTa-style).

A = "modality_encoders.AUDIO."
T = "modality_encoders.TEXT."
SV1 = "encoder.sentence_encoder."
CONV = [(16, 10, 5), (16, 3, 2)]  # (dim, kernel, stride): 400 samples -> 39 frames
CONV_SPEC = "[(16, 10, 5)] + [(16, 3, 2)]"
POS_K, POS_DEPTH, POS_G = 5, 2, 4
VOCAB, MAXPOS, PAD = 40, 20, 1


def ln(dim):
    return 1 + rand(dim), rand(dim)


def put_norm(sd, p, dim):
    sd[p + ".weight"], sd[p + ".bias"] = ln(dim)


def put_linear(sd, p, out, inp):
    sd[p + ".weight"], sd[p + ".bias"] = rand(out, inp), rand(out)


def conv_extractor_tensors(sd, p):
    """ConvFeatureExtractionModel(mode='layer_norm'): conv_layers.{i}.0 (no bias),
    .2.1 the Fp32LayerNorm inside Sequential(TransposeLast, LN, TransposeLast)."""
    cin = 1
    for i, (c, k, _) in enumerate(CONV):
        sd[f"{p}{i}.0.weight"] = rand(c, cin, k, scale=0.5)
        put_norm(sd, f"{p}{i}.2.1", c)
        cin = c


def separate_qkv_layer(sd, p, dim=DIM):
    """TransformerSentenceEncoderLayer / TransformerEncoderLayer (post-LN)."""
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        put_linear(sd, f"{p}self_attn.{n}", dim, dim)
    put_norm(sd, p + "self_attn_layer_norm", dim)
    put_linear(sd, p + "fc1", 4 * dim, dim)
    put_linear(sd, p + "fc2", dim, 4 * dim)
    put_norm(sd, p + "final_layer_norm", dim)


def decoder1d_tensors(sd, p, proj_layers=1):
    for i in range(DEC_LAYERS):
        cin = DIM if i == 0 else DEC_DIM
        sd[f"{p}blocks.{i}.0.weight"] = rand(DEC_DIM, cin // DEC_G, DEC_K)
        sd[f"{p}blocks.{i}.0.bias"] = rand(DEC_DIM)
    if proj_layers == 1:
        put_linear(sd, p + "proj", DIM, DEC_DIM)
    else:
        put_linear(sd, p + "proj.0", 2 * DEC_DIM, DEC_DIM)
        put_linear(sd, p + "proj.2", DIM, 2 * DEC_DIM)


def audio_v2_checkpoint(seed=0):
    """data2vec_multi AUDIO (base_audio_only_task: prenet 0, ALiBi scale per head,
    ema_encoder_only=False, ema_local_encoder=False)."""
    torch.manual_seed(seed)

    def context(sd):
        for j in range(1, POS_DEPTH + 1):
            sd[f"{A}relative_positional_encoder.{j}.0.weight"] = rand(DIM, DIM // POS_G, POS_K)
            sd[f"{A}relative_positional_encoder.{j}.0.bias"] = rand(DIM)
        put_norm(sd, A + "context_encoder.norm", DIM)
        sd[A + "alibi_scale"] = 0.5 + torch.rand(1, 1, HEADS, 1, 1)
        for i in range(DEPTH):
            sd.update(alt_block_tensors(f"blocks.{i}."))
        return sd

    sd = {}
    conv_extractor_tensors(sd, A + "local_encoder.conv_layers.")
    put_norm(sd, A + "project_features.1", CONV[-1][0])
    put_linear(sd, A + "project_features.2", DIM, CONV[-1][0])
    context(sd)
    decoder1d_tensors(sd, A + "decoder.")
    sd["_ema"] = context({})
    cfg = {"model": {"num_heads": HEADS, "norm_eps": 1e-5, "depth": DEPTH,
                     "average_top_k_layers": 2, "instance_norm_target_layer": True,
                     "clone_batch": 8, "ema_encoder_only": False,
                     "modalities": {"audio": {"feature_encoder_spec": CONV_SPEC,
                                              "conv_pos_depth": POS_DEPTH,
                                              "conv_pos_width": POS_K * POS_DEPTH,
                                              "conv_pos_groups": POS_G, "prenet_depth": 0,
                                              "mask_prob": 0.5, "mask_length": 5,
                                              "use_alibi_encoder": True,
                                              "learned_alibi_scale_per_head": True}}}}
    return {"model": sd, "cfg": cfg}


def audio_v1_state(p=""):
    """data2vec_audio (base_librispeech: pos_conv_depth 5 stack, post-LN)."""
    sd = {}
    conv_extractor_tensors(sd, p + "feature_extractor.conv_layers.")
    put_norm(sd, p + "layer_norm", CONV[-1][0])
    put_linear(sd, p + "post_extract_proj", DIM, CONV[-1][0])
    sd[p + "mask_emb"] = torch.rand(DIM)
    for i in range(POS_DEPTH):
        sd[f"{p}encoder.pos_conv.{i}.0.weight"] = rand(DIM, DIM // POS_G, POS_K)
        sd[f"{p}encoder.pos_conv.{i}.0.bias"] = rand(DIM)
    put_norm(sd, p + "encoder.layer_norm", DIM)
    for i in range(DEPTH):
        separate_qkv_layer(sd, f"{p}encoder.layers.{i}.")
    return sd


def audio_v1_cfg():
    return {"encoder_attention_heads": HEADS, "conv_feature_layers": CONV_SPEC,
            "average_top_k_layers": 2, "instance_norm_target_layer": True, "mask_prob": 0.65,
            "mask_length": 10, "ema_decay": 0.999, "ema_end_decay": 0.9999,
            "ema_anneal_end_step": 30000}


def audio_v1_checkpoint(seed=0):
    torch.manual_seed(seed)
    sd = audio_v1_state()
    put_linear(sd, "final_proj", DIM, DIM)
    ema = {}
    for i in range(POS_DEPTH):
        ema[f"pos_conv.{i}.0.weight"] = sd[f"encoder.pos_conv.{i}.0.weight"].clone()
        ema[f"pos_conv.{i}.0.bias"] = sd[f"encoder.pos_conv.{i}.0.bias"].clone()
    put_norm(ema, "layer_norm", DIM)
    for i in range(DEPTH):
        separate_qkv_layer(ema, f"layers.{i}.")
    sd["_ema"] = ema
    return {"model": sd, "cfg": {"model": audio_v1_cfg()}}


def audio_ctc_checkpoint(seed=0, vocab=12):
    """Wav2VecCtc around data2vec_audio (remove_pretraining_modules: no final_proj, no EMA)."""
    torch.manual_seed(seed)
    sd = audio_v1_state("w2v_encoder.w2v_model.")
    put_linear(sd, "w2v_encoder.proj", vocab, DIM)
    return {"model": sd, "cfg": {"model": {"w2v_args": {"model": audio_v1_cfg()}}}}


def text_v2_checkpoint(seed=0, proj_layers=1):
    """data2vec_multi TEXT (base_text_only_task: prenet 0, ema_encoder_only)."""
    torch.manual_seed(seed)
    sd = {T + "local_encoder.embed_tokens.weight": rand(VOCAB, DIM, scale=1.0),
          T + "local_encoder.embed_positions.weight": rand(MAXPOS + PAD + 1, DIM, scale=1.0)}
    put_norm(sd, T + "local_encoder.layernorm_embedding", DIM)
    for i in range(DEPTH):
        sd.update(alt_block_tensors(f"blocks.{i}."))
    decoder1d_tensors(sd, T + "decoder.", proj_layers)
    sd["_ema"] = {k[len("blocks."):]: rand(*v.shape) + (1 if "norm" in k and "weight" in k else 0)
                  for k, v in sd.items() if k.startswith("blocks.")}
    cfg = {"model": {"num_heads": HEADS, "norm_eps": 1e-5, "depth": DEPTH,
                     "average_top_k_layers": 2, "instance_norm_target_layer": True,
                     "ema_encoder_only": True,
                     "modalities": {"text": {"max_source_positions": MAXPOS, "mask_prob": 0.48,
                                             "prenet_depth": 0,
                                             "decoder": {"decoder_residual": proj_layers == 1,
                                                         "projection_layers": proj_layers}}}}}
    return {"model": sd, "cfg": cfg}


def text_v1_state():
    sd = {SV1 + "embed_tokens.weight": rand(VOCAB, DIM, scale=1.0),
          SV1 + "embed_positions.weight": rand(MAXPOS + PAD + 1, DIM, scale=1.0),
          SV1 + "version": torch.tensor([3.0])}
    put_norm(sd, SV1 + "layernorm_embedding", DIM)
    for i in range(DEPTH):
        separate_qkv_layer(sd, f"{SV1}layers.{i}.")
    return sd


def text_v1_cfg():
    return {"head_layers": 2, "average_top_k_layers": 2, "layer_norm_target_layer": True,
            "loss_beta": 4, "transformer": {"no_scale_embedding": True,
                                            "max_source_positions": MAXPOS,
                                            "encoder": {"attention_heads": HEADS,
                                                        "normalize_before": False}}}


def text_v1_checkpoint(seed=0):
    """data2vec_text (head_layers 2, ema_transformer_layers_only)."""
    torch.manual_seed(seed)
    sd = text_v1_state()
    put_linear(sd, "encoder.regression_head.0", 2 * DIM, DIM)
    put_linear(sd, "encoder.regression_head.2", DIM, 2 * DIM)
    ema = {k[len(SV1):]: v.clone() for k, v in sd.items() if k.startswith(SV1)}
    for i in range(DEPTH):
        separate_qkv_layer(ema, f"layers.{i}.")
    sd["encoder._ema"] = ema
    return {"model": sd, "cfg": {"model": text_v1_cfg()}}


def text_cls_checkpoint(seed=0, classes=3):
    """data2vec_text fine-tuned (remove_pretraining_modules) with one RoBERTa head."""
    torch.manual_seed(seed)
    sd = text_v1_state()
    put_linear(sd, "classification_heads.sentence_classification_head.dense", DIM, DIM)
    put_linear(sd, "classification_heads.sentence_classification_head.out_proj", classes, DIM)
    return {"model": sd, "cfg": {"model": text_v1_cfg()}}


def finetuned_v2(ckpt, prefix, cfg_key, head):
    """A fine-tuning wrapper around a data2vec_multi checkpoint as fairseq saves
    it after remove_pretraining_modules: no decoder, no _ema, keys under
    `prefix`, the pretraining cfg under cfg.model.<cfg_key>.model, plus `head`."""
    sd = {prefix + k: v for k, v in ckpt["model"].items()
          if k != "_ema" and ".decoder." not in k}
    sd.update(head)
    return {"model": sd, "cfg": {"model": {cfg_key: ckpt["cfg"]}}}


def beit_state(finetuned=False, seed=0, classes=5):
    """data2vec 1.0 vision in the BEiT code's layout (facebookresearch/data2vec_vision):
    pretraining = modeling_cyclical (shared rel_pos_bias, mask_token, norm, lm_head);
    fine-tuned = modeling_finetune (per-block tables, mean pooling: fc_norm, head)."""
    torch.manual_seed(seed)
    size = (2 * SIDE - 1) ** 2 + 3
    sd = {"cls_token": rand(1, 1, DIM), "patch_embed.proj.weight": rand(DIM, CH, PATCH, PATCH),
          "patch_embed.proj.bias": rand(DIM)}
    if not finetuned:
        sd["mask_token"] = rand(1, 1, DIM)
        sd["rel_pos_bias.relative_position_bias_table"] = rand(size, HEADS, scale=1.0)
        sd["rel_pos_bias.relative_position_index"] = torch.zeros(SIDE * SIDE + 1, SIDE * SIDE + 1,
                                                                 dtype=torch.long)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        put_norm(sd, p + "norm1", DIM)
        put_norm(sd, p + "norm2", DIM)
        sd[p + "attn.qkv.weight"] = rand(3 * DIM, DIM)
        sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = rand(DIM), rand(DIM)
        put_linear(sd, p + "attn.proj", DIM, DIM)
        put_linear(sd, p + "mlp.fc1", 4 * DIM, DIM)
        put_linear(sd, p + "mlp.fc2", DIM, 4 * DIM)
        sd[p + "gamma_1"], sd[p + "gamma_2"] = 0.1 + rand(DIM), 0.1 + rand(DIM)
        if finetuned:
            sd[p + "attn.relative_position_bias_table"] = rand(size, HEADS, scale=1.0)
            sd[p + "attn.relative_position_index"] = torch.zeros(SIDE * SIDE + 1,
                                                                 SIDE * SIDE + 1, dtype=torch.long)
    if finetuned:
        put_norm(sd, "fc_norm", DIM)
        put_linear(sd, "head", classes, DIM)
    else:
        put_norm(sd, "norm", DIM)
        put_linear(sd, "lm_head", DIM, DIM)
    return sd
