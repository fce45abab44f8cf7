"""The fine-tuning protocols of experiments/finetune.py are the official ones.

Every row is one recipe value: our config key, the official value and where
it comes from, written from the official files (fairseq 3d262bb
`examples/data2vec` and `examples/wav2vec`, `fairseq/tasks` and `criterions`;
data2vec_vision `beit/` for image 1.0), not from our experiment file.
`test_finetune_recipe_values` asserts ours == official for every row except
the listed deviations, each of which must still deviate. The tables in
docs/recipes.md (between the `finetune-recipes` markers) are generated from
the same rows: `python tests/test_finetune_recipes.py` rewrites them and
`test_docs_finetune_recipes_is_current` keeps them in step.
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

# Sources: fairseq examples/data2vec/ (config/..., models/..., data/...),
# examples/wav2vec/, fairseq/ (tasks, criterions, models); data2vec_vision beit/.
MAE = "config/vision/finetuning/mae_imagenet_clean.yaml"
MAEL = "config/vision/finetuning/mae_imagenet_large_clean.yaml"
MAE_MODEL = "models/mae_image_classification.py (MaeImageClassificationConfig default)"
MAE_DATA = "data/mae_finetuning_image_dataset.py"
TIMM = "timm transforms_imagenet_train default"
FAIRSEQ_ADAM = "fairseq/optim/adam.py (adam_eps default)"
COSINE = "fairseq/optim/lr_scheduler/cosine_lr_scheduler.py"
BEIT = "beit/README.md ViT-B fine-tune command"
RUN = "beit/run_class_finetuning.py (argparse default)"
POLY = "fairseq/optim/lr_scheduler/polynomial_decay_schedule.py (default)"
SP_TASK = "fairseq/tasks/sentence_prediction.py"
SP_CRIT = "fairseq/criterions/sentence_prediction.py"
TEXT_CLS = "models/data2vec_text_classification.py"
W2V_ASR = "fairseq/models/wav2vec/wav2vec2_asr.py (Wav2Vec2AsrConfig default)"
TRI = "fairseq/optim/lr_scheduler/tri_stage_lr_scheduler.py (default)"
IMAGENET_STEPS = 1_281_167 // 1024  # BEiT: len(dataset_train) // total_batch_size




IMAGENET_V2 = [
    ("mode", "finetune", f"{MAE_MODEL}: linear_classifier false"),
    ("init.params", "student", f"{MAE_MODEL}: load_state_dict(state['model']), _ema removed"),
    ("data.source", "image_folder", f"{MAE_DATA}: datasets.ImageFolder(<data>/<split>)"),
    ("data.batch_size", 512, f"{MAE}: dataset.batch_size 32 x distributed_world_size 16"),
    ("data.crop_scale", (0.08, 1.0), f"{TIMM}: RandomResizedCropAndInterpolation scale"),
    ("data.crop_ratio", (3 / 4, 4 / 3), f"{TIMM}: ratio"),
    ("data.flip", True, f"{TIMM}: hflip 0.5"),
    (None, "bicubic", f"{MAE_DATA}: interpolation='bicubic'; eval Resize(..., BICUBIC)"),
    (None, "no ColorJitter", f"{MAE_DATA}: color_jitter None (timm drops it with RandAugment)"),
    ("data.rand_augment", "rand-m9-mstd0.5-inc1", f"{MAE_DATA}: aa"),
    ("data.random_erasing.prob", 0.25, f"{MAE_DATA}: reprob"),
    ("data.random_erasing.mode", "pixel", f"{MAE_DATA}: remode"),
    ("data.random_erasing.count", 1, f"{MAE_DATA}: recount"),
    ("data.eval_crop_ratio", 224 / 256, f"{MAE_DATA}: crop_pct 224/256: Resize(256), CenterCrop(224)"),
    ("mixup.alpha", 0.7, f"{MAE}: model.mixup"),
    ("mixup.cutmix_alpha", 1.0, f"{MAE_MODEL}: cutmix"),
    ("mixup.prob", 0.9, f"{MAE}: model.mixup_prob"),
    ("mixup.switch_prob", 0.5, f"{MAE_MODEL}: mixup_switch_prob"),
    ("mixup.mode", "batch", f"{MAE_MODEL}: mixup_mode"),
    ("loss.label_smoothing", 0.1, f"{MAE_MODEL}: label_smoothing (in timm's mixup targets)"),
    ("head.kind", "linear", "models/mae_image_classification.py: fc_norm -> head Linear"),
    ("head.pool", "mean", f"{MAE_MODEL}: prediction_mode MEAN_POOLING, extra tokens removed"),
    ("head.norm", "layer", f"{MAE_MODEL}: use_fc_norm (LayerNorm eps 1e-6)"),
    ("head.init", "normal", "models/mae_image_classification.py: trunc_normal_ (bounds +-2)"),
    ("head.init_std", 0.02, "models/mae_image_classification.py: trunc_normal_(std=0.02)"),
    ("encoder.drop_path", 0.1, f"{MAE_MODEL}: drop_path_rate"),
    ("encoder.dropout", 0.0, f"{MAE_MODEL}: encoder_dropout, post_mlp_drop"),
    ("encoder.attn_dropout", 0.0, f"{MAE_MODEL}: attention_dropout"),
    ("encoder.activation_dropout", 0.0, f"{MAE_MODEL}: activation_dropout"),
    ("encoder.layerdrop", 0.0, f"{MAE_MODEL}: layerdrop"),
    (None, "linspace(0, 0.1, 10) over the main blocks, prenet dpr[0..1]",
     "models/mae_image_classification.py: drop path rates"),
    ("train.stochastic_encoder", True, "fairseq trains in model.train(): drop path acts"),
    ("optim.lr", 1e-3, f"{MAE}: optimizer.groups.default.lr_float"),
    ("optim.b1", 0.9, f"{MAE}: adam_betas"),
    ("optim.b2", 0.95, f"{MAE}: adam_betas"),
    ("optim.eps", 1e-8, FAIRSEQ_ADAM),
    ("optim.weight_decay", 0.05, f"{MAE}: weight_decay"),
    ("optim.decay_scope", "matrices", "models/mae_image_classification.py: weight_decay_scale 0 "
                                      "where len(shape) == 1 or .bias"),
    ("optim.decay_names", ("cls_token",), "extra_tokens is [1, 1, D]: decayed"),
    ("optim.clip_norm", 0.0, "optimization.clip_norm default 0 (none)"),
    ("optim.schedule", "cosine", f"{MAE}: lr_scheduler cosine"),
    ("optim.warmup_steps", 16_000, f"{MAE}: warmup_updates"),
    ("optim.end_lr_ratio", 1e-6 / 1e-3, f"{MAE}: min_lr 1e-6"),
    ("optim.warmup_init_ratio", 1e-6 / 1e-3, f"{COSINE}: warmup_init_lr -1 = min_lr"),
    ("optim.layer_decay", 0.65, f"{MAE_MODEL}: layer_decay"),
    ("optim.layer_decay_frontend", False, "models/mae_image_classification.py: data2vec_multi "
                                          "sets lr_scale on the blocks only"),
    ("optim.layer_decay_top", (), "no table outside the blocks"),
    ("train.num_steps", 250_200, f"{MAE}: max_update"),
    (None, "fp16", f"{MAE}: common.fp16"),
]

IMAGENET_V2_LARGE = derive(IMAGENET_V2, {MAE: MAEL}, {
    "encoder.drop_path": (0.2, f"{MAEL}: drop_path_rate"),
    "optim.lr": (5e-4, f"{MAEL}: optimizer.groups.default.lr_float"),
    "optim.clip_norm": (4.0, f"{MAEL}: optimization.clip_norm"),
    "optim.end_lr_ratio": (1e-7 / 5e-4, f"{MAEL}: min_lr 1e-7"),
    "optim.warmup_init_ratio": (1e-7 / 5e-4, f"{COSINE}: warmup_init_lr -1 = min_lr"),
    "optim.layer_decay": (0.75, f"{MAEL}: layer_decay"),
    "train.num_steps": (125_200, f"{MAEL}: max_update"),
})
# ViT-L has no prenet blocks: its rates are linspace(0, 0.2, 24), as ours.
IMAGENET_V2_LARGE = [(None, "linspace(0, 0.2, 24)", src) if k is None and v.startswith("linspace")
                     else (k, v, src) for k, v, src in IMAGENET_V2_LARGE]

IMAGENET_V1 = [
    ("mode", "finetune", f"{BEIT}: --finetune (no --linear_classifier)"),
    ("data.source", "image_folder", "beit/datasets.py: ImageFolder(train / val)"),
    ("data.batch_size", 1024, f"{BEIT}: --batch_size 128 x --world_size 8, --update_freq 1"),
    ("data.crop_scale", (0.08, 1.0), f"{TIMM}: RandomResizedCropAndInterpolation scale"),
    ("data.crop_ratio", (3 / 4, 4 / 3), f"{TIMM}: ratio"),
    ("data.flip", True, f"{TIMM}: hflip 0.5"),
    (None, "bicubic", f"{RUN}: --train_interpolation bicubic; eval Resize(interpolation=3)"),
    (None, "no ColorJitter", f"{RUN}: --color_jitter 0.4, dropped by timm with RandAugment"),
    ("data.rand_augment", "rand-m9-mstd0.5-inc1", f"{RUN}: --aa"),
    ("data.random_erasing.prob", 0.25, f"{RUN}: --reprob"),
    ("data.random_erasing.mode", "pixel", f"{RUN}: --remode"),
    ("data.random_erasing.count", 1, f"{RUN}: --recount"),
    ("data.eval_crop_ratio", 224 / 256, "beit/datasets.py: crop_pct 224 / 256 below 384 px"),
    (None, "(0.5, 0.5, 0.5)", "beit/datasets.py: IMAGENET_INCEPTION_MEAN / STD (the command "
                              "omits --imagenet_default_mean_and_std)"),
    ("mixup.alpha", 0.8, f"{BEIT}: --mixup 0.8"),
    ("mixup.cutmix_alpha", 1.0, f"{BEIT}: --cutmix 1.0"),
    ("mixup.prob", 1.0, f"{RUN}: --mixup_prob"),
    ("mixup.switch_prob", 0.5, f"{RUN}: --mixup_switch_prob"),
    ("mixup.mode", "batch", f"{RUN}: --mixup_mode"),
    ("loss.label_smoothing", 0.1, f"{RUN}: --smoothing"),
    ("head.kind", "linear", "beit/modeling_finetune.py: fc_norm -> head"),
    ("head.pool", "mean", f"{RUN}: --use_mean_pooling (default true)"),
    ("head.norm", "layer", "beit/modeling_finetune.py: fc_norm LayerNorm(eps 1e-6)"),
    ("head.init", "normal", "beit/modeling_finetune.py: trunc_normal_ (bounds +-2)"),
    ("head.init_std", 2e-5, f"beit/modeling_finetune.py: std 0.02 x {RUN}: --init_scale 0.001"),
    ("encoder.drop_path", 0.2, f"{BEIT}: --drop_path 0.2"),
    ("encoder.dropout", 0.0, f"{BEIT}: --drop 0.0"),
    ("encoder.attn_dropout", 0.0, f"{RUN}: --attn_drop_rate"),
    ("encoder.activation_dropout", 0.0, "timm Mlp: one dropout after fc2 only"),
    ("encoder.layerdrop", 0.0, "no layer-drop in BEiT"),
    ("encoder.rel_pos_bias", "per_block", f"{RUN}: --rel_pos_bias; the shared table is copied "
                                          "into each block"),
    ("encoder.final_norm", False, "beit/modeling_finetune.py: use_mean_pooling -> norm Identity"),
    ("train.stochastic_encoder", True, "BEiT trains in model.train(): drop path acts"),
    ("optim.lr", 4e-3, f"{BEIT}: --lr 4e-3"),
    ("optim.b1", 0.9, f"{RUN}: --opt_betas None (AdamW default)"),
    ("optim.b2", 0.999, f"{RUN}: --opt_betas None (AdamW default)"),
    ("optim.eps", 1e-8, f"{RUN}: --opt_eps"),
    ("optim.weight_decay", 0.0, f"{BEIT}: --weight_decay 0.0"),
    ("optim.decay_scope", "matrices", "beit/optim_factory.py: no decay if 1-D or .bias"),
    ("optim.no_decay", ("cls_token",), "beit/modeling_finetune.py: no_weight_decay()"),
    ("optim.clip_norm", 0.0, f"{RUN}: --clip_grad None"),
    ("optim.schedule", "cosine", "beit/utils.py: cosine_scheduler"),
    ("optim.warmup_steps", 10 * IMAGENET_STEPS, f"{BEIT}: --warmup_epochs 10 x 1,251 steps/epoch"),
    ("optim.end_lr_ratio", 1e-6 / 4e-3, f"{RUN}: --min_lr 1e-6"),
    ("optim.warmup_init_ratio", 0.0, "beit/utils.py: cosine_scheduler start_warmup_value 0"),
    ("optim.layer_decay", 0.65, f"{BEIT}: --layer_decay 0.65"),
    ("optim.layer_decay_frontend", True, "beit/optim_factory.py: patch_embed, cls_token at "
                                         "layer 0 -> decay^(L + 1)"),
    ("optim.layer_decay_per_block", ("rel_pos_bias",), "blocks.i.attn.relative_position_bias_table"
                                                       " -> layer i + 1"),
    ("optim.layer_decay_top", (), "beit/optim_factory.py: only head / fc_norm at scale 1"),
    ("train.num_steps", 100 * IMAGENET_STEPS, f"{BEIT}: --epochs 100 x 1,251 steps/epoch"),
    (None, "fp16", f"{BEIT}: --enable_deepspeed (fp16)"),
]

# text_finetuning/<task>.yaml: (batch_size, lr, warmup_updates, max_update, num_classes,
# criterion report, best_checkpoint_metric) as the files give them
GLUE_YAML = {
    "cola": (16, 2e-5, 320, 5336, 2, ("mcc",), "mcc"),
    "mnli": (32, 2e-5, 7432, 123873, 3, (), "accuracy_matched"),
    "mrpc": (16, 2e-5, 137, 2296, 2, ("acc_and_f1",), "acc_and_f1"),
    "qnli": (32, 2e-5, 1986, 33112, 2, (), "accuracy"),
    "qqp": (32, 2e-5, 28318, 113272, 2, ("acc_and_f1",), "acc_and_f1"),
    "rte": (16, 2e-5, 122, 2036, 2, (), "accuracy"),
    "sst_2": (32, 2e-5, 1256, 20935, 2, (), "accuracy"),
    "sts_b": (16, 4e-5, 214, 3598, 1, ("pearson_and_spearman",), "pearson_and_spearman"),
}
REPORT = {"mcc": "criterion.report_mcc", "acc_and_f1": "criterion.report_acc_and_f1",
          "pearson_and_spearman": "criterion.report_pearson_and_spearman"}


def glue_rows(task):
    y = f"config/v2/text_finetuning/{task}.yaml"
    batch, lr, warmup, updates, classes, report, best = GLUE_YAML[task]
    regression = task == "sts_b"
    rows = [
        ("mode", "finetune", f"{TEXT_CLS}: the whole model trains"),
        ("init.params", "student", f"{TEXT_CLS}: load_model_weights drops _ema"),
        ("task", "regression" if regression else "classification",
         f"{y}: criterion.regression_target" if regression else f"{SP_CRIT}: nll_loss"),
        ("data.source", "glue", f"{y}: task sentence_prediction"),
        ("data.glue_task", task, f"{y}"),
        ("data.init_token", "<s>", f"{y}: init_token 0 (<s>)"),
        ("data.separator_token", "</s>", f"{y}: separator_token 2 (</s>)"),
        ("data.too_long", "error", f"{SP_TASK}: shorten_method none"),
        (None, "max_positions 512", f"{y}: max_positions"),
        ("data.batch_size", batch, f"{y}: dataset.batch_size (1 GPU)"),
        (None, "max_tokens 4400", f"{y}: dataset.max_tokens"),
        ("head.kind", "roberta", f"{TEXT_CLS}: RobertaClassificationHead"),
        ("head.pool", "cls", "fairseq/models/roberta/model.py: features[:, 0, :]"),
        ("head.dropout", 0.0, f"{TEXT_CLS}: pooler_dropout"),
        (None, "tanh", f"{TEXT_CLS}: pooler_activation_fn"),
        ("head.init", "torch_linear", f"{TEXT_CLS}: head built after the model (nn.Linear init)"),
        ("head.num_outputs", classes, f"{y}: num_classes"),
        (None, "dropout 0.1, attention dropout 0.1", f"{TEXT_CLS}: the pretrained model's "
                                                     "config, unchanged"),
        ("train.stochastic_encoder", True, "fairseq trains in model.train(): dropout acts"),
        ("loss.label_smoothing", 0.0, f"{SP_CRIT}: nll_loss"),
        ("optim.lr", lr, f"{y}: optimization.lr"),
        ("optim.b1", 0.9, f"{y}: adam_betas"),
        ("optim.b2", 0.98, f"{y}: adam_betas"),
        ("optim.eps", 1e-6, f"{y}: adam_eps"),
        ("optim.weight_decay", 0.1, f"{y}: weight_decay"),
        ("optim.decay_scope", "all", "plain `adam`: weight_decay applies to every parameter"),
        ("optim.clip_norm", 0.0, f"{y}: clip_norm"),
        ("optim.schedule", "polynomial", f"{y}: lr_scheduler polynomial_decay"),
        ("optim.power", 1.0, f"{POLY}: power"),
        ("optim.end_lr_ratio", 0.0, f"{POLY}: end_learning_rate"),
        ("optim.warmup_steps", warmup, f"{y}: warmup_updates"),
        ("optim.layer_decay", 1.0, f"{TEXT_CLS}: no layer-wise lr"),
        ("train.num_steps", updates, f"{y}: max_update"),
        (None, "max_epoch 10", f"{y}: optimization.max_epoch"),
        ("eval.metrics", report, f"{y}: " + (REPORT[report[0]] if report else "accuracy")),
        ("eval.headline", best, f"{y}: best_checkpoint_metric"
         + (" (valid = dev_matched)" if task == "mnli" else "")),
        (None, "fp16", f"{y}: common.fp16"),
    ]
    if regression:
        rows.insert(20, ("loss.standardize_targets", False, f"{SP_CRIT}: mse_loss on the targets"))
    return rows


# base_<split>.yaml: (lr, max_update, freeze_finetune_updates, mask_prob,
# mask_channel_prob, layerdrop) as the files give them
W2V_YAML = {"10m": (5e-5, 13_000, 10_000, 0.65, 0.25, 0.1),
            "1h": (5e-5, 13_000, 10_000, 0.65, 0.25, 0.1),
            "10h": (5e-5, 20_000, 10_000, 0.65, 0.5, 0.05),
            "100h": (3e-5, 80_000, 0, 0.65, 0.5, 0.1),
            "960h": (1e-4, 320_000, 0, 0.5, 0.1, 0.1)}


def librispeech_rows(split):
    y = f"wav2vec/config/finetuning/base_{split}.yaml"
    lr, updates, freeze, mask, channel, layerdrop = W2V_YAML[split]
    gpus = "distributed_world_size 8" if split == "960h" else (
        "distributed_world_size 2 x update_freq 4")
    return [
        ("task", "ctc", f"{y}: criterion ctc"),
        ("data.source", "asr_manifest", f"{y}: task audio_finetuning (fairseq manifests)"),
        ("data.train_subset", "train", "fairseq/dataclass/configs.py: train_subset"),
        ("data.eval_subsets", ("dev_other",), f"{y}: valid_subset"),
        ("data.max_tokens", 25_600_000, f"{y}: max_tokens 3,200,000 x {gpus}"),
        ("data.batch_size", 8, "fairseq/dataclass/configs.py: required_batch_size_multiple"),
        (None, "labels: ltr", f"{y}: task.labels"),
        (None, "normalize: false", f"{y}: task.normalize"),
        ("encoder.dropout", 0.0, f"{W2V_ASR}: dropout"),
        ("encoder.attn_dropout", 0.0, f"{W2V_ASR}: attention_dropout"),
        ("encoder.activation_dropout", 0.1, f"{y}: model.activation_dropout"),
        ("encoder.layerdrop", layerdrop, f"{y}: model.layerdrop"),
        ("encoder.feature_grad_mult", 0.0, f"{y}: model.feature_grad_mult"),
        ("head.final_dropout", 0.0, f"{W2V_ASR}: final_dropout"),
        ("masking.mask_prob", mask, f"{y}: model.mask_prob (apply_mask true)"),
        ("masking.mask_length", 10, f"{W2V_ASR}: mask_length"),
        ("masking.mask_channel_prob", channel, f"{y}: model.mask_channel_prob"),
        ("masking.mask_channel_length", 64, f"{y}: model.mask_channel_length"),
        (None, "static spans, min_masks 2, require_same_masks",
         "fairseq/data/data_utils.py: compute_mask_indices"),
        ("loss.ctc_reduction", "sentence", f"{y}: sentence_avg true"),
        ("loss.zero_infinity", True, f"{y}: criterion.zero_infinity"),
        ("loss.blank", 0, "fairseq/criterions/ctc.py: blank_idx = dictionary bos (0)"),
        ("optim.lr", lr, f"{y}: optimization.lr"),
        ("optim.b1", 0.9, f"{y}: adam_betas"),
        ("optim.b2", 0.98, f"{y}: adam_betas"),
        ("optim.eps", 1e-8, f"{y}: adam_eps"),
        ("optim.weight_decay", 0.0, "fairseq/optim/adam.py: weight_decay default"),
        ("optim.clip_norm", 0.0, "optimization.clip_norm default 0 (none)"),
        ("optim.schedule", "tri_stage", f"{y}: lr_scheduler tri_stage"),
        ("optim.phase_ratio", (0.1, 0.4, 0.5), f"{y}: phase_ratio"),
        ("optim.init_lr_scale", 0.01, f"{TRI}: init_lr_scale"),
        ("optim.final_lr_scale", 0.05, f"{y}: final_lr_scale"),
        ("optim.layer_decay", 1.0, f"{W2V_ASR}: layer_decay"),
        ("optim.freeze_finetune_updates", freeze, f"{y}: model.freeze_finetune_updates"),
        ("train.num_steps", updates, f"{y}: max_update"),
        (None, "fp16", f"{y}: common.fp16"),
    ]


RECIPES = {"imagenet_v2": IMAGENET_V2, "imagenet_v2_large": IMAGENET_V2_LARGE,
           "imagenet_v1": IMAGENET_V1,
           **{f"glue_{t}": glue_rows(t) for t in GLUE_YAML},
           **{f"librispeech_{s}": librispeech_rows(s) for s in W2V_YAML}}

TITLES = {
    "imagenet_v2": "ImageNet, ViT-B data2vec 2.0 (fairseq vision/finetuning/mae_imagenet_clean.yaml)",
    "imagenet_v2_large": "ImageNet, ViT-L data2vec 2.0 (fairseq mae_imagenet_large_clean.yaml)",
    "imagenet_v1": "ImageNet, ViT-B data2vec 1.0 (data2vec_vision beit/run_class_finetuning.py)",
    **{f"glue_{t}": f"GLUE {t.upper().replace('_', '-')}, data2vec 2.0 text "
                    f"(fairseq v2/text_finetuning/{t}.yaml)" for t in GLUE_YAML},
    **{f"librispeech_{s}": f"LibriSpeech CTC, {s} of labels (fairseq wav2vec/config/finetuning/"
                           f"base_{s}.yaml)" for s in W2V_YAML},
}

FP16 = ("compute dtype from the checkpoint's config (`model.dtype`: bfloat16 on GPU/TPU, "
        "float32 on CPU), no fp16 loss scaler")
DEVIATIONS = {
    ("*", "doc:fp16"): FP16,
    ("imagenet_v1", "doc:fp16"): FP16,
    ("*", "doc:linspace(0, 0.1, 10) over the main blocks, prenet dpr[0..1]"): (
        "drop path linspace(0, rate, 12) over all 12 blocks (fairseq gives the 2 prenet "
        "blocks linspace(0, dpr[1]) and the 10 main ones linspace(dpr[2], rate)): the same "
        "end points, every block's rate within 0.004 of fairseq's"),
    ("*", "doc:linspace(0, 0.2, 24)"): "as official: linspace(0, rate, depth) over the 24 blocks",
    ("imagenet_v1", "doc:(0.5, 0.5, 0.5)"): (
        "the pixel normalization is the pretraining checkpoint's (ImageNet mean / std, as the "
        "README's pretraining command sets): a fine-tune that renormalizes the inputs its "
        "encoder learned on would be a second, unintended change"),
    ("*", "doc:max_tokens 4400"): (
        "every batch has data.batch_size rows (static shapes); fairseq also caps a batch at "
        "4,400 tokens, i.e. fewer rows only when a batch's rows are longer than 137 / 275 "
        "tokens on average (rare in GLUE)"),
    ("*", "doc:max_positions 512"): ("as official: a row longer than the backbone's positions "
                                     "(512) is refused (data.too_long='error')"),
    ("*", "doc:max_epoch 10"): ("train.num_steps = max_update, which the yamls set to 10 epochs "
                                "of the task; the run stops there"),
    ("*", "doc:labels: ltr"): "as official: the .ltr letters are the targets (.wrd the references)",
    ("*", "doc:normalize: false"): (
        "the waveform normalization is the pretrained checkpoint's `data.normalize` (data2vec "
        "audio pretrains with normalize: true; fairseq asserts the fine-tune sets the same, so "
        "data2vec runs pass task.normalize=true)"),
    ("*", "doc:static spans, min_masks 2, require_same_masks"): (
        "span starts drawn with probability mask_prob / mask_length per frame (finetune/ctc.py "
        "span_mask): the same expected masked share, a count that varies per row"),
    ("*", "doc:bicubic"): "as official: bicubic crops, resizes and RandAugment geometry",
    ("*", "doc:no ColorJitter"): "as official: no colour jitter",
    ("*", "doc:tanh"): "as official: dense -> tanh -> out_proj",
    ("*", "doc:dropout 0.1, attention dropout 0.1"): (
        "as official: the backbone's own dropout (the converted checkpoint's config) acts in "
        "training (train.stochastic_encoder)"),
}
for split in W2V_YAML:
    DEVIATIONS[(f"librispeech_{split}", "data.eval_subsets")] = (
        "dev_other first (the headline, fairseq's valid_subset); dev_clean, test_clean and "
        "test_other are decoded too, the sets the papers report")


def load(experiment):
    return load_config(f"experiments/finetune.py:{experiment}", {})


@pytest.mark.parametrize("experiment", sorted(RECIPES))
def test_finetune_recipe_values(experiment):
    wrong = tables.wrong_values(RECIPES[experiment], load(experiment), DEVIATIONS, experiment,
                                doc_rows_need_notes=True)
    assert not wrong, "\n".join(wrong)


BEGIN = "<!-- finetune-recipes:begin (generated by python tests/test_finetune_recipes.py) -->"
END = "<!-- finetune-recipes:end -->"


def render() -> str:
    """The generated fine-tuning part of docs/recipes.md: one table per protocol."""
    return tables.render(RECIPES, TITLES, DEVIATIONS, load,
                         lambda e: f"`experiments/finetune.py:{e}`")


def test_docs_finetune_recipes_is_current():
    assert tables.generated_part(DOC, BEGIN, END) == render().strip(), (
        "docs/recipes.md is stale: run `python tests/test_finetune_recipes.py` to regenerate")


if __name__ == "__main__":
    os.chdir(ROOT)
    tables.rewrite(DOC, BEGIN, END, render())
    print(f"wrote {DOC}")
