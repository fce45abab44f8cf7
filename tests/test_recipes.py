"""The base / large experiments are the official recipes (SPEC 2-7).

Every row below is one recipe value: our config key, the official value and
where it comes from, written from the official config files (fairseq
`examples/data2vec` at 3d262bb; data2vec_vision `beit/` for image 1.0), not
from our experiment files. `test_recipe_values` asserts ours == official for
every row except the listed deviations, and that each deviation still
deviates (a stale reason fails too). docs/recipes.md is generated from the same
table (`python tests/test_recipes.py` rewrites it) and
`test_docs_recipes_is_current` keeps it in step.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from d2v_jax.config import load_config  # noqa: E402

import recipe_tables as tables  # noqa: E402
from recipe_tables import derive  # noqa: E402

DOC = os.path.join(ROOT, "docs", "recipes.md")

# Official sources (paths in fairseq examples/data2vec/ or data2vec_vision/).
V2I = "config/v2/base_images_only_task.yaml"
V2IL = "config/v2/large_images_only_task.yaml"
V2A = "config/v2/base_audio_only_task.yaml"
V2T = "config/v2/base_text_only_task.yaml"
A1 = "config/audio/pretraining/base_librispeech.yaml"
T1 = "config/text/pretraining/base.yaml"
D2V2 = "models/data2vec2.py (Data2VecMultiConfig default)"
D2VA = "models/data2vec_audio.py / wav2vec2.py (default)"
D2VT = "models/data2vec_text.py (default)"
MOD = "models/modalities/"
BEIT = "beit/README.md ViT-B command"
BEITL = "beit/README.md ViT-L command"
RUN = "beit/run_cyclical.py (argparse default)"
MODEL = "beit/modeling_cyclical.py"
ENGINE = "beit/engine_for_cyclical.py"
FAIRSEQ_ADAM = "fairseq/optim/adam.py (adam_eps default)"
COSINE = "fairseq/optim/lr_scheduler/cosine_lr_scheduler.py (min_lr default 0)"

FP16_REASON = ("model.dtype=auto: bfloat16 compute on GPU/TPU (f32's exponent range, so no "
               "loss scaler as fp16 needs), float32 on CPU; params, EMA, optimizer state and "
               "the loss stay float32 either way (the tiny CPU recipes pin float32)")
PAD_REASON = ("fairseq crops every utterance of a batch to the shortest one (no padding); we "
              "pad to a length bucket with a padding mask so fewer samples are thrown away "
              "and shapes stay static; data.pad=False crops as fairseq")
ZERO_PAD_REASON = ("padded frames zeroed before and after every positional conv layer, so "
                   "a clip's encoding does not depend on its batch's padding; fairseq meets "
                   "no padding in pretraining (it crops batches), and converted checkpoints "
                   "set the official value, so fine-tuning them sees fairseq's padding "
                   "(tests/test_audio_model.py::test_pos_conv_zero_pad_modes)")
TOKENIZER_REASON = ("`auto`: `gpt2` (RoBERTa's vocabulary, fairseq's ids) as soon as its files "
                    "(tokenizer.encoder_json / vocab_bpe / dict) or a fairseq data directory are "
                    "given; without them (nothing is downloaded) a byte-level BPE is trained on "
                    "your corpus")
BUCKETS_REASON = ("static shapes under jit: a row is padded to the smallest of 4 lengths that "
                  "holds it, not to its batch's longest row, and a batch of one length holds "
                  "max_tokens // length rows (a multiple of 128, fairseq's count); rows are drawn "
                  "at random within a length each epoch, where fairseq batches length-sorted "
                  "neighbours (modalities/text/batching.py)")
ALL_DECAY = "plain `adam`: weight_decay applies to every parameter (SPEC 7)"
COMPOSITE = ("`composite`: data2vec2.py sets weight_decay_scale 0 where len(shape) == 1, "
             "`.bias` or `alibi_scale`")

# (key, official value, source). A key of None is a documentation-only row
# (no config field); its reason is in DEVIATIONS / NOTES.


IMAGE_V2 = [
    ("model.dim", 768, f"{D2V2}: embed_dim"),
    ("model.depth", 12, f"{V2I}: depth 10 + modalities.image.prenet_depth 2"),
    ("model.num_heads", 12, f"{D2V2}: num_heads"),
    ("model.mlp_ratio", 4.0, f"{D2V2}: mlp_ratio"),
    ("model.image_size", 224, f"{MOD}image.py: input_size"),
    ("model.patch_size", 16, f"{MOD}image.py: patch_size"),
    ("model.layer_norm_first", False, f"{D2V2}: layer_norm_first"),
    ("model.abs_pos", "sincos", f"{MOD}image.py: fixed_positions (2-D sin-cos)"),
    ("model.norm_eps", 1e-6, f"{V2I}: norm_eps"),
    ("model.dropout", 0.0, f"{V2I}: encoder_dropout, post_mlp_drop"),
    ("model.attn_dropout", 0.0, f"{V2I}: attention_dropout"),
    ("model.activation_dropout", 0.0, f"{V2I}: activation_dropout"),
    ("model.drop_path", 0.0, f"{D2V2}: start/end_drop_path_rate"),
    ("model.layerdrop", 0.0, f"{D2V2}: layerdrop"),
    ("model.init_std", 0.02, "init_bert_params: normal_(0, 0.02)"),
    ("model.init_truncation", None, "init_bert_params: untruncated"),
    ("model.token_init_std", 1.0, f"{V2I}: init_extra_token_zero false (normal_ std 1)"),
    ("model.patch_embed_init", "xavier", f"{MOD}image.py: PatchEmbed xavier_uniform_"),
    ("decoder.dim", 768, f"{V2I}: decoder.decoder_dim"),
    ("decoder.groups", 16, f"{V2I}: decoder.decoder_groups"),
    ("decoder.kernel", 3, f"{V2I}: decoder.decoder_kernel"),
    ("decoder.layers", 6, f"{V2I}: decoder.decoder_layers"),
    ("decoder.residual", True, f"{MOD}modules.py: decoder_residual default"),
    ("decoder.projection_layers", 1, f"{MOD}modules.py: projection_layers default"),
    ("decoder.input_dropout", 0.0, f"{V2I}: decoder.input_dropout"),
    ("decoder.mask_noise_std", 0.01, f"{V2I}: mask_noise_std"),
    ("target.top_k", 10, f"{V2I}: average_top_k_layers"),
    ("target.layer_norm", "instance", f"{V2I}: instance_norm_target_layer"),
    ("target.final_norm", "layer", f"{V2I}: layer_norm_targets"),
    ("loss.beta", 0.0, f"{D2V2}: loss_beta"),
    ("loss.scale", None, f"{D2V2}: loss_scale None = 1/sqrt(D)"),
    ("loss.cls_weight", 0.01, f"{V2I}: cls_loss"),
    ("loss.cls_reduction", "ref_rows", "data2vec2.py: cls term x local sample_size (SPEC 6)"),
    ("loss.cls_ref_rows", 256, f"{V2I}: dataset.batch_size 16 x clone_batch 16 per GPU"),
    ("ema.start", 0.9998, f"{V2I}: ema_decay"),
    ("ema.end", 0.99999, f"{V2I}: ema_end_decay"),
    ("ema.anneal_steps", 100_000, f"{V2I}: ema_anneal_end_step"),
    ("ema.shared", (), f"{V2I}: ema_encoder_only false, ema_local_encoder true"),
    ("masking.kind", "inverse_block", f"{V2I}: inverse_mask true"),
    ("masking.ratio", 0.8, f"{V2I}: mask_prob"),
    ("masking.prob_adjust", 0.07, f"{V2I}: mask_prob_adjust"),
    ("masking.block_size", 3, f"{V2I}: mask_length"),
    ("masking.num_clones", 16, f"{V2I}: clone_batch"),
    ("data.batch_size", 256, f"{V2I}: dataset.batch_size 16 x distributed_world_size 16"),
    ("data.crop_scale", (0.2, 1.0), "data/mae_image_dataset.py: RandomResizedCrop scale"),
    ("data.flip", True, "data/mae_image_dataset.py: RandomHorizontalFlip"),
    ("data.color_jitter", (0.0, 0.0, 0.0), "data/mae_image_dataset.py: no ColorJitter"),
    ("data.mean", (0.485, 0.456, 0.406), "data/mae_image_dataset.py: Normalize"),
    ("optim.lr", 1e-3, f"{V2I}: optimization.lr"),
    ("optim.b1", 0.9, f"{V2I}: adam_betas"),
    ("optim.b2", 0.95, f"{V2I}: adam_betas"),
    ("optim.eps", 1e-8, FAIRSEQ_ADAM),
    ("optim.weight_decay", 0.05, f"{V2I}: weight_decay"),
    ("optim.decay_scope", "matrices", COMPOSITE),
    ("optim.decay_names", ("cls_token",), "extra_tokens is [1, 1, D]: decayed by `composite`"),
    ("optim.clip_norm", 4.0, f"{V2I}: clip_norm"),
    ("optim.schedule", "cosine", f"{V2I}: lr_scheduler cosine"),
    ("optim.warmup_steps", 50_040, f"{V2I}: warmup_updates"),
    ("optim.end_lr_ratio", 0.0, COSINE),
    ("train.num_steps", 375_300, f"{V2I}: max_update"),
    ("model.dtype", "fp16", "common.fp16: true"),
]

IMAGE_V2_LARGE = derive(IMAGE_V2, {V2I: V2IL}, {
    "model.dim": (1024, f"{V2IL}: embed_dim"),
    "model.depth": (24, f"{V2IL}: depth 24, prenet_depth 0"),
    "model.num_heads": (16, f"{V2IL}: num_heads"),
    "decoder.dim": (1024, f"{V2IL}: decoder.decoder_dim"),
    "decoder.kernel": (5, f"{V2IL}: decoder.decoder_kernel"),
    "decoder.layers": (3, f"{V2IL}: decoder.decoder_layers"),
    "target.top_k": (18, f"{V2IL}: average_top_k_layers"),
    "loss.cls_ref_rows": (128, f"{V2IL}: dataset.batch_size 8 x clone_batch 16 per GPU"),
    "ema.anneal_steps": (150_000, f"{V2IL}: ema_anneal_end_step"),
    "masking.ratio": (0.75, f"{V2IL}: mask_prob"),
    "masking.prob_adjust": (0.1, f"{V2IL}: mask_prob_adjust"),
    "data.batch_size": (128, f"{V2IL}: dataset.batch_size 8 x distributed_world_size 16"),
    "optim.lr": (4e-4, f"{V2IL}: optimization.lr"),
})

IMAGE_V1 = [
    ("model.dim", 768, "beit_base_patch16_224"),
    ("model.depth", 12, "beit_base_patch16_224"),
    ("model.num_heads", 12, "beit_base_patch16_224"),
    ("model.mlp_ratio", 4.0, "beit_base_patch16_224"),
    ("model.patch_size", 16, "beit_base_patch16_224"),
    ("model.layer_norm_first", True, f"{MODEL}: pre-LN Block"),
    ("model.rel_pos_bias", "shared", f"{RUN}: rel_pos_bias true -> use_shared_rel_pos_bias"),
    ("model.abs_pos", "none", f"{RUN}: abs_pos_emb false"),
    ("model.norm_eps", 1e-6, f"{MODEL}: LayerNorm eps 1e-6"),
    ("model.layer_scale_init", 1e-4, f"{BEIT}: --layer_scale_init_value 1e-4"),
    ("model.drop_path", 0.25, f"{BEIT}: --drop_path 0.25"),
    ("model.attn_dropout", 0.05, f"{BEIT}: --attn_drop_rate 0.05"),
    ("model.dropout", 0.0, f"{RUN}: drop 0"),
    ("model.activation_dropout", 0.0, "timm Mlp: one dropout after fc2 only"),
    ("model.init_std", 0.02, f"{MODEL}: init_std"),
    ("model.init_truncation", 1.0, f"{MODEL}: trunc_normal_(a=-std, b=std)"),
    ("model.init_depth_rescale", True, f"{MODEL}: fix_init_weight 1/sqrt(2 l)"),
    ("target.top_k", 6, f"{BEIT}: --target_layers [6..11]"),
    ("target.layer_norm", "layer", f"{ENGINE}: F.layer_norm per layer"),
    ("target.final_norm", "layer", f"{BEIT}: --post_target_layer_norm"),
    ("target.eps", 1e-5, f"{ENGINE}: F.layer_norm default eps"),
    ("loss.beta", 2.0, f"{BEIT}: --l1_beta 2.0"),
    ("loss.scale", 1 / 768, f"{ENGINE}: smooth_l1_loss mean reduction = sum over D / D"),
    ("loss.cls_weight", 0.0, "no CLS loss in 1.0"),
    ("ema.start", 0.9998, f"{BEIT}: --ema_decay 0.9998 --ema_start_at 0 (constant)"),
    ("ema.end", 0.9998, f"{BEIT}: --ema_decay 0.9998"),
    ("ema.shared", (), "the whole model is EMA (ModelEmaV2)"),
    ("masking.kind", "block", "beit/masking_generator.py"),
    ("masking.num_masked", 120, f"{BEIT}: --num_mask_patches 120"),
    ("masking.min_num_patches", 16, f"{BEIT}: --min_mask_patches_per_block 16"),
    ("masking.min_aspect", 0.3, "beit/masking_generator.py: min_aspect 0.3"),
    ("data.batch_size", 2048, f"{BEIT}: --batch_size 128 x --world_size 16"),
    ("data.crop_scale", (0.08, 1.0), "beit/transforms.py: RandomResizedCrop...TwoPic scale"),
    ("data.color_jitter", (0.4, 0.4, 0.4), "beit/datasets.py: ColorJitter(0.4, 0.4, 0.4)"),
    ("data.flip", True, "beit/datasets.py: RandomHorizontalFlip"),
    ("data.mean", (0.485, 0.456, 0.406), f"{BEIT}: --imagenet_default_mean_and_std"),
    ("optim.lr", 2e-3, f"{BEIT}: --lr 2e-3"),
    ("optim.b1", 0.9, f"{RUN}: opt_betas None (AdamW default)"),
    ("optim.b2", 0.999, f"{RUN}: opt_betas None (AdamW default)"),
    ("optim.eps", 1e-8, f"{RUN}: opt_eps"),
    ("optim.weight_decay", 0.05, f"{BEIT}: --weight_decay 0.05"),
    ("optim.decay_scope", "matrices", "beit/optim_factory.py: no decay if 1-D or .bias"),
    ("optim.decay_names", ("mask_token", "relative_position_bias_table"),
     "mask_token [1, 1, D] and the table [N, H] are decayed by optim_factory"),
    ("optim.no_decay", ("cls_token",), f"{MODEL}: no_weight_decay() = pos_embed, cls_token"),
    ("optim.clip_norm", 3.0, f"{BEIT}: --clip_grad 3.0"),
    ("optim.schedule", "cosine", "beit/utils.py: cosine_scheduler"),
    ("optim.warmup_steps", 6250, f"{BEIT}: --warmup_epochs 10 x 625 steps/epoch"),
    ("optim.end_lr_ratio", 1e-5 / 2e-3, f"{RUN}: min_lr 1e-5"),
    ("train.num_steps", 500_000, f"{BEIT}: --epochs 800 x 625 steps/epoch"),
    (None, "0", "beit/utils.py cosine_scheduler: start_warmup_value 0 (run_cyclical.py never "
                "passes its warmup_lr)"),
    ("model.dtype", "fp16", "run_cyclical.py: apex/amp loss scaler"),
]

IMAGE_V1_LARGE = derive(IMAGE_V1, {BEIT: BEITL, "beit_base": "beit_large"}, {
    "model.dim": (1024, "beit_large_patch16_224"),
    "model.depth": (24, "beit_large_patch16_224"),
    "model.num_heads": (16, "beit_large_patch16_224"),
    "model.layer_scale_init": (1e-5, f"{BEITL}: --layer_scale_init_value 1e-5"),
    "model.drop_path": (0.2, f"{BEITL}: --drop_path 0.2"),
    "model.attn_dropout": (0.15, f"{BEITL}: --attn_drop_rate 0.15"),
    "target.top_k": (6, f"{BEITL}: --target_layers [18..23]"),
    "loss.beta": (2.0, f"{BEITL}: --l1_beta=2"),
    "loss.scale": (1 / 1024, f"{ENGINE}: smooth_l1_loss mean reduction = sum over D / D"),
    "data.batch_size": (4096, f"{BEITL}: --batch_size 64 x --world_size 64"),
    "optim.lr": (1e-3, f"{BEITL}: --lr 1e-3"),
    "optim.weight_decay": (0.05, f"{RUN}: weight_decay"),
    "optim.warmup_steps": (80 * 312, f"{BEITL}: --warmup_epochs 80 x 312 steps/epoch"),
    "optim.end_lr_ratio": (1e-5 / 1e-3, f"{RUN}: min_lr 1e-5"),
    "train.num_steps": (800 * 312, f"{BEITL}: --epochs 800 x 312 steps/epoch"),
}) + [(None, "a second 800 epochs at EMA 0.9999", f"{BEITL} (continued pretraining)")]

AUDIO_V1 = [
    ("model.dim", 768, f"{A1}: encoder_embed_dim"),
    ("model.depth", 12, f"{D2VA}: encoder_layers"),
    ("model.num_heads", 12, f"{D2VA}: encoder_attention_heads"),
    ("model.conv_kernels", (10, 3, 3, 3, 3, 2, 2), f"{D2VA}: conv_feature_layers"),
    ("model.conv_strides", (5, 2, 2, 2, 2, 2, 2), f"{D2VA}: conv_feature_layers"),
    ("model.conv_bias", False, f"{A1}: extractor_mode layer_norm, conv_bias false"),
    ("model.feature_grad_mult", 1.0, f"{A1}: feature_grad_mult"),
    ("model.pos_conv_depth", 5, f"{A1}: pos_conv_depth"),
    ("model.pos_conv_width", 95, f"{A1}: conv_pos"),
    ("model.pos_conv_groups", 16, f"{D2VA}: conv_pos_groups"),
    ("model.pos_conv_zero_pad", "input",
     "fairseq/models/wav2vec/wav2vec2.py TransformerEncoder.extract_features: padded frames "
     "zeroed once, before pos_conv"),
    ("model.alibi", False, "1.0 has no ALiBi"),
    ("model.dropout", 0.1, f"{D2VA}: dropout"),
    ("model.attn_dropout", 0.1, f"{D2VA}: attention_dropout"),
    ("model.activation_dropout", 0.0, f"{D2VA}: activation_dropout"),
    ("model.dropout_input", 0.0, f"{A1}: dropout_input"),
    ("model.layerdrop", 0.05, f"{A1}: encoder_layerdrop"),
    ("model.norm_eps", 1e-5, "torch LayerNorm default"),
    ("target.top_k", 8, f"{A1}: average_top_k_layers"),
    ("target.layer_norm", "instance", f"{A1}: instance_norm_target_layer"),
    ("target.final_norm", "none", f"{D2VA}: no final target norm"),
    ("loss.beta", 0.0, f"{A1}: loss_beta"),
    ("loss.scale", None, f"{A1}: loss_scale null = 1/sqrt(D)"),
    ("ema.start", 0.999, f"{A1}: ema_decay"),
    ("ema.end", 0.9999, f"{A1}: ema_end_decay"),
    ("ema.anneal_steps", 30_000, f"{A1}: ema_anneal_end_step"),
    ("ema.shared", ("frontend", "context/pos_conv*"), f"{A1}: ema_layers_only true"),
    ("masking.kind", "span", "compute_mask_indices (static, overlapping)"),
    ("masking.ratio", 0.65, f"{A1}: mask_prob"),
    ("masking.span", 10, f"{A1}: mask_length"),
    ("masking.min_masks", 1, "data2vec_audio.py: compute_mask_indices(min_masks=1)"),
    ("masking.same_count", True, f"{A1}: require_same_masks"),
    ("data.max_sample_size", 320_000, f"{A1}: max_sample_size"),
    ("data.min_sample_size", 32_000, f"{A1}: min_sample_size"),
    ("data.normalize", True, f"{A1}: normalize"),
    ("data.max_tokens", 16 * 3_800_000, f"{A1}: max_tokens 3.8M x distributed_world_size 16"),
    ("data.batch_size", 16, "rows a multiple of the 16 GPUs (= per-GPU max_tokens)"),
    ("data.pad", False, "audio_pretraining: enable_padding false (crop to the batch)"),
    ("optim.lr", 5e-4, f"{A1}: lr"),
    ("optim.b1", 0.9, f"{A1}: adam_betas"),
    ("optim.b2", 0.98, f"{A1}: adam_betas"),
    ("optim.eps", 1e-6, f"{A1}: adam_eps"),
    ("optim.weight_decay", 0.01, f"{A1}: weight_decay"),
    ("optim.decay_scope", "all", ALL_DECAY),
    ("optim.clip_norm", 0.0, "optimization.clip_norm default 0 (none)"),
    ("optim.schedule", "tri_stage", f"{A1}: lr_scheduler tri_stage"),
    ("optim.phase_ratio", (0.03, 0.9, 0.07), f"{A1}: phase_ratio"),
    ("optim.init_lr_scale", 0.01, "tri_stage_lr_scheduler.py: init_lr_scale"),
    ("optim.final_lr_scale", 0.01, "tri_stage_lr_scheduler.py: final_lr_scale"),
    ("train.num_steps", 400_000, f"{A1}: max_update"),
    ("model.dtype", "fp16", f"{A1}: common.fp16"),
]

AUDIO_V2 = [
    ("model.dim", 768, f"{V2A}: embed_dim"),
    ("model.depth", 12, f"{V2A}: depth"),
    ("model.num_heads", 12, f"{D2V2}: num_heads"),
    ("model.conv_kernels", (10, 3, 3, 3, 3, 2, 2), f"{V2A}: feature_encoder_spec"),
    ("model.conv_strides", (5, 2, 2, 2, 2, 2, 2), f"{V2A}: feature_encoder_spec"),
    ("model.pos_conv_depth", 5, f"{V2A}: conv_pos_depth"),
    ("model.pos_conv_width", 95, f"{V2A}: conv_pos_width"),
    ("model.pos_conv_groups", 16, f"{V2A}: conv_pos_groups"),
    ("model.pos_conv_zero_pad", "none",
     f"{MOD}base.py contextualized_features: only masked frames are zeroed"),
    ("model.alibi", True, f"{V2A}: use_alibi_encoder, learned_alibi_scale_per_head"),
    ("model.norm_eps", 1e-5, f"{V2A}: norm_eps"),
    ("model.dropout", 0.1, f"{D2V2}: encoder_dropout, post_mlp_drop"),
    ("model.attn_dropout", 0.1, f"{D2V2}: attention_dropout"),
    ("model.activation_dropout", 0.0, f"{D2V2}: activation_dropout"),
    ("model.layerdrop", 0.05, f"{V2A}: layerdrop"),
    ("model.prenet_dropout", 0.1, f"{V2A}: prenet_dropout"),
    ("decoder.dim", 384, f"{V2A}: decoder.decoder_dim"),
    ("decoder.groups", 16, f"{V2A}: decoder.decoder_groups"),
    ("decoder.kernel", 7, f"{V2A}: decoder.decoder_kernel"),
    ("decoder.layers", 4, f"{V2A}: decoder.decoder_layers"),
    ("decoder.residual", True, f"{MOD}modules.py: decoder_residual default"),
    ("decoder.projection_layers", 1, f"{MOD}modules.py: projection_layers default"),
    ("decoder.input_dropout", 0.1, f"{V2A}: decoder.input_dropout"),
    ("decoder.mask_noise_std", 0.01, f"{V2A}: mask_noise_std"),
    ("target.top_k", 8, f"{V2A}: average_top_k_layers"),
    ("target.layer_norm", "instance", f"{V2A}: instance_norm_target_layer"),
    ("target.final_norm", "none", f"{V2A}: layer_norm_targets false"),
    ("loss.beta", 0.0, f"{V2A}: loss_beta"),
    ("loss.scale", None, f"{V2A}: loss_scale null = 1/sqrt(D)"),
    ("ema.start", 0.999, f"{V2A}: ema_decay"),
    ("ema.end", 0.99999, f"{V2A}: ema_end_decay"),
    ("ema.anneal_steps", 75_000, f"{V2A}: ema_anneal_end_step"),
    ("ema.shared", ("frontend",), f"{V2A}: ema_local_encoder false"),
    ("masking.kind", "block_1d", "data_utils.py: compute_block_mask_1d"),
    ("masking.ratio", 0.5, f"{V2A}: mask_prob"),
    ("masking.prob_adjust", 0.05, f"{V2A}: mask_prob_adjust"),
    ("masking.span", 5, f"{V2A}: mask_length"),
    ("masking.num_clones", 8, f"{V2A}: clone_batch"),
    ("data.max_sample_size", 320_000, f"{V2A}: max_sample_size"),
    ("data.min_sample_size", 32_000, f"{V2A}: min_sample_size"),
    ("data.max_tokens", 8 * 1_000_000, f"{V2A}: max_tokens 1M x distributed_world_size 8"),
    ("data.batch_size", 8, "rows a multiple of the 8 GPUs (= per-GPU max_tokens)"),
    ("data.pad", False, "audio_pretraining: enable_padding false (crop to the batch)"),
    ("optim.lr", 7.5e-4, f"{V2A}: lr"),
    ("optim.b2", 0.98, f"{V2A}: adam_betas"),
    ("optim.eps", 1e-6, f"{V2A}: adam_eps"),
    ("optim.weight_decay", 0.01, f"{V2A}: weight_decay"),
    ("optim.decay_scope", "all", ALL_DECAY),
    ("optim.clip_norm", 0.0, f"{V2A}: no clip_norm (default 0)"),
    ("optim.schedule", "cosine", f"{V2A}: lr_scheduler cosine"),
    ("optim.warmup_steps", 8000, f"{V2A}: warmup_updates"),
    ("optim.end_lr_ratio", 0.0, COSINE),
    ("train.num_steps", 400_000, f"{V2A}: max_update"),
    ("model.dtype", "fp16", f"{V2A}: common.fp16"),
]

TEXT_V1 = [
    ("model.dim", 768, f"{T1}: encoder.embed_dim"),
    ("model.depth", 12, f"{T1}: encoder.layers"),
    ("model.num_heads", 12, f"{T1}: encoder.attention_heads"),
    ("model.max_positions", 512, f"{T1}: max_source_positions"),
    ("model.dropout", 0.1, f"{T1}: transformer.dropout"),
    ("model.attn_dropout", 0.1, f"{T1}: attention_dropout"),
    ("model.activation_dropout", 0.0, "transformer default activation_dropout"),
    ("model.layerdrop", 0.0, f"{T1}: encoder.layerdrop"),
    ("target.top_k", 10, f"{T1}: average_top_k_layers"),
    ("target.layer_norm", "layer", f"{T1}: layer_norm_target_layer"),
    ("target.final_norm", "none", f"{D2VT}: no final target norm"),
    ("loss.beta", 4.0, f"{T1}: loss_beta"),
    ("loss.scale", 1.0, f"{T1}: loss_scale 1"),
    (None, "Linear(D, 2D) -> GELU -> Linear(2D, D)", f"{T1}: head_layers 2"),
    ("ema.start", 0.999, f"{T1}: ema_decay"),
    ("ema.end", 0.9999, f"{T1}: ema_end_decay"),
    ("ema.anneal_steps", 300_000, f"{T1}: ema_anneal_end_step"),
    ("ema.shared", ("frontend",), f"{T1}: ema_transformer_layers_only"),
    ("masking.kind", "span", f"{T1}: mask_multiple_length 4"),
    ("masking.ratio", 0.35, f"{T1}: mask_prob"),
    ("masking.span", 4, f"{T1}: mask_multiple_length"),
    ("masking.leave_unmasked_prob", 0.0, f"{T1}: leave_unmasked_prob"),
    ("masking.random_token_prob", 0.0, f"{T1}: random_token_prob"),
    ("masking.mask_specials", True, "data/mask_tokens_dataset.py: draws over len(item)"),
    ("tokenizer.kind", "gpt2", f"{T1}: task.data, fairseq-preprocess'd with RoBERTa's GPT-2 BPE"),
    ("data.doc_sep", "fairseq", "fairseq-preprocess: a record per line, an empty line ends a document"),
    ("data.max_len", 512, f"{T1}: tokens_per_sample (blocks of 511, then <s>)"),
    ("data.packing", "complete_doc", f"{T1}: sample_break_mode (TokenBlockDataset)"),
    ("data.too_long", "skip", "trainer.py get_train_iterator: ignore_invalid_inputs=True drops "
                              "blocks longer than max_positions"),
    ("data.max_tokens", 16 * 8192, f"{T1}: max_tokens 8192 x distributed_world_size 16"),
    ("data.batch_size", 128, "required_batch_size_multiple 8 (dataclass default) x 16 GPUs"),
    ("data.buckets", "the batch's longest row",
     "data_utils.batch_by_size: rows sorted by length, padded to the longest of the batch"),
    ("ema.teacher_input", "clean", f"{D2VT}: the EMA model embeds target_tokens in eval mode"),
    ("optim.lr", 2e-4, f"{T1}: lr"),
    ("optim.b2", 0.98, f"{T1}: adam_betas"),
    ("optim.eps", 1e-6, f"{T1}: adam_eps"),
    ("optim.weight_decay", 0.01, f"{T1}: weight_decay"),
    ("optim.decay_scope", "all", ALL_DECAY),
    ("optim.clip_norm", 5.0, f"{T1}: clip_norm"),
    ("optim.schedule", "cosine", f"{T1}: lr_scheduler cosine"),
    ("optim.warmup_steps", 10_000, f"{T1}: warmup_updates"),
    ("optim.end_lr_ratio", 0.0, COSINE),
    ("train.num_steps", 1_000_000, f"{T1}: max_update"),
    ("model.dtype", "fp16", f"{T1}: common.fp16"),
]

TEXT_V2 = [
    ("model.dim", 768, f"{V2T}: embed_dim"),
    ("model.depth", 12, f"{V2T}: depth"),
    ("model.num_heads", 12, f"{D2V2}: num_heads"),
    ("model.max_positions", 512, f"{V2T}: tokens_per_sample"),
    ("model.norm_eps", 1e-5, f"{V2T}: norm_eps"),
    ("model.dropout", 0.1, f"{D2V2}: encoder_dropout, post_mlp_drop"),
    ("model.attn_dropout", 0.1, f"{D2V2}: attention_dropout"),
    ("model.activation_dropout", 0.0, f"{D2V2}: activation_dropout"),
    ("model.layerdrop", 0.0, f"{V2T}: layerdrop"),
    ("decoder.dim", 768, f"{V2T}: decoder.decoder_dim"),
    ("decoder.groups", 1, f"{V2T}: decoder.decoder_groups"),
    ("decoder.kernel", 9, f"{V2T}: decoder.decoder_kernel"),
    ("decoder.layers", 5, f"{V2T}: decoder.decoder_layers"),
    ("decoder.residual", False, f"{V2T}: decoder_residual false"),
    ("decoder.projection_layers", 2, f"{V2T}: projection_layers"),
    ("decoder.projection_ratio", 2.0, f"{V2T}: projection_ratio"),
    ("decoder.input_dropout", 0.1, f"{V2T}: decoder.input_dropout"),
    ("decoder.mask_noise_std", 0.01, f"{V2T}: mask_noise_std"),
    ("target.top_k", 12, f"{V2T}: average_top_k_layers"),
    ("target.layer_norm", "instance", f"{V2T}: instance_norm_target_layer"),
    ("target.final_norm", "none", f"{V2T}: layer_norm_targets / instance_norm_targets false"),
    ("loss.beta", 0.0, f"{V2T}: loss_beta"),
    ("loss.scale", 1.0, f"{V2T}: loss_scale 1"),
    ("ema.start", 0.9999, f"{V2T}: ema_decay"),
    ("ema.end", 0.99999, f"{V2T}: ema_end_decay"),
    ("ema.anneal_steps", 100_000, f"{V2T}: ema_anneal_end_step"),
    ("ema.shared", ("frontend",), f"{V2T}: ema_encoder_only true"),
    ("masking.kind", "random", f"{V2T}: mask_length 1 -> random_masking"),
    ("masking.ratio", 0.48, f"{V2T}: mask_prob"),
    ("masking.num_clones", 8, f"{V2T}: clone_batch"),
    ("masking.mask_specials", True, f"{MOD}base.py: random_masking over all L"),
    ("tokenizer.kind", "gpt2", f"{V2T}: task.data bookwiki_aml-full-mmap2-bin (RoBERTa's BPE)"),
    ("data.doc_sep", "fairseq", "fairseq-preprocess: a record per line, an empty line ends a document"),
    ("data.max_len", 512, f"{V2T}: tokens_per_sample"),
    ("data.packing", "stream", f"{V2T}: sample_break_mode none"),
    ("data.max_tokens", 0, f"{V2T}: no max_tokens, a batch_size"),
    ("data.batch_size", 64, f"{V2T}: dataset.batch_size 4 x distributed_world_size 16"),
    ("ema.teacher_input", "student", f"{D2V2}: ema_encoder_only, the teacher reads "
                                     "extractor_out['local_features'] (after the local "
                                     "encoder's dropout)"),
    ("optim.lr", 2e-4, f"{V2T}: lr"),
    ("optim.b2", 0.98, f"{V2T}: adam_betas"),
    ("optim.eps", 1e-6, f"{V2T}: adam_eps"),
    ("optim.weight_decay", 0.01, f"{V2T}: weight_decay"),
    ("optim.decay_scope", "matrices", COMPOSITE),
    ("optim.clip_norm", 1.0, f"{V2T}: clip_norm"),
    ("optim.schedule", "cosine", f"{V2T}: lr_scheduler cosine"),
    ("optim.warmup_steps", 4000, f"{V2T}: warmup_updates"),
    ("optim.end_lr_ratio", 0.0, COSINE),
    ("train.num_steps", 1_000_000, f"{V2T}: max_update"),
    ("model.dtype", "fp16", f"{V2T}: common.fp16"),
]

RECIPES = {
    "image.py:base_v1": IMAGE_V1,
    "image.py:large_v1": IMAGE_V1_LARGE,
    "image.py:base_v2": IMAGE_V2,
    "image.py:large_v2": IMAGE_V2_LARGE,
    "audio.py:base_v1": AUDIO_V1,
    "audio.py:base_v2": AUDIO_V2,
    "text.py:base_v1": TEXT_V1,
    "text.py:base_v2": TEXT_V2,
}

TITLES = {
    "image.py:base_v1": "Image, data2vec 1.0, ViT-B/16 (data2vec_vision BEiT code)",
    "image.py:large_v1": "Image, data2vec 1.0, ViT-L/16 (data2vec_vision BEiT code, first 800 epochs)",
    "image.py:base_v2": "Image, data2vec 2.0, ViT-B/16 (fairseq v2/base_images_only_task.yaml)",
    "image.py:large_v2": "Image, data2vec 2.0, ViT-L/16 (fairseq v2/large_images_only_task.yaml)",
    "audio.py:base_v1": "Speech, data2vec 1.0, base (fairseq audio/pretraining/base_librispeech.yaml)",
    "audio.py:base_v2": "Speech, data2vec 2.0, base (fairseq v2/base_audio_only_task.yaml)",
    "text.py:base_v1": "Text, data2vec 1.0, base (fairseq text/pretraining/base.yaml)",
    "text.py:base_v2": "Text, data2vec 2.0, base (fairseq v2/base_text_only_task.yaml)",
}

# Deliberate deviations: (experiment or "*", key) -> reason. Every one must
# still deviate (test_recipe_values checks), so a fixed one leaves this list.
DEVIATIONS = {
    ("*", "model.dtype"): FP16_REASON,
    ("audio.py:base_v1", "data.pad"): PAD_REASON,
    ("audio.py:base_v2", "data.pad"): PAD_REASON,
    ("*", "model.pos_conv_zero_pad"): ZERO_PAD_REASON,
    ("*", "tokenizer.kind"): TOKENIZER_REASON,
    ("text.py:base_v1", "data.buckets"): BUCKETS_REASON,
    # Documentation-only rows (no config field), keyed by their official text.
    ("image.py:large_v1", "doc:a second 800 epochs at EMA 0.9999"): (
        "we reproduce the first 800-epoch phase; continue from its checkpoint with "
        "--config.ema.start=0.9999 --config.ema.end=0.9999"),
}


def _experiments():
    return sorted(RECIPES)


def load(experiment):
    file, arg = experiment.split(":")
    return load_config(f"experiments/{file}:{arg}", {})


@pytest.mark.parametrize("experiment", _experiments())
def test_recipe_values(experiment):
    wrong = tables.wrong_values(RECIPES[experiment], load(experiment), DEVIATIONS, experiment)
    assert not wrong, "\n".join(wrong)


ORDER = ["image.py:base_v1", "image.py:large_v1", "image.py:base_v2", "image.py:large_v2",
         "audio.py:base_v1", "audio.py:base_v2", "text.py:base_v1", "text.py:base_v2"]
BEGIN, END = "<!-- recipes:begin (generated by python tests/test_recipes.py) -->", "<!-- recipes:end -->"


def render() -> str:
    """The generated part of docs/recipes.md: one table per experiment."""
    return tables.render(RECIPES, TITLES, DEVIATIONS, load, lambda e: f"`experiments/{e}`", ORDER)


def test_docs_recipes_is_current():
    assert tables.generated_part(DOC, BEGIN, END) == render().strip(), (
        "docs/recipes.md is stale: run `python tests/test_recipes.py` to regenerate its tables")


if __name__ == "__main__":
    os.chdir(ROOT)
    tables.rewrite(DOC, BEGIN, END, render())
    print(f"wrote {DOC}")
