r"""Fine-tuning and linear probes of a data2vec encoder on labeled data.

  python -m d2v_jax.finetune --config experiments/finetune.py:mnist_5k \
      --init_from runs/tiny_v2 --workdir runs/ft   [--config.data.label_fraction=0.05 ...]

`--init_from` names a pretraining work dir: its checkpoint's student (or, with
`init.params=teacher`, EMA teacher) weights initialize the encoder, exactly;
the architecture and input normalization come from that checkpoint's config.
Without it the `backbone` (an experiment, or a pretraining work dir: its
architecture) trains from scratch.

Modes (`config.mode`):
- `linear_probe`: the encoder is frozen (features under stop_gradient, its
  updates set to zero), a LayerNorm + linear head on mean-pooled or CLS
  features is trained.
- `finetune`: everything trains; block i of L gets lr * layer_decay^(L - i),
  the front-end layer_decay^(L + 1), the head 1 (BEiT / data2vec recipe). The
  scale is applied per slice of the scanned `blocks` axis.

Heads: classification (cross-entropy; accuracy and macro-F1), regression
(squared error on standardized targets; RMSE and MAE in the target's units), or
`task='ctc'`: speech recognition, a linear CTC head on every frame over a
letter vocabulary (`|` = word boundary), greedy decoding, WER and CER, the
wav2vec 2.0 / data2vec fine-tuning recipe (frozen conv extractor, encoder
frozen for `optim.freeze_finetune_updates`, time / channel masks, layer-drop,
tri-stage lr); results.json also holds decoded test examples (`ctc`).
Test metrics are on the split fixed by `data.split_seed` (or the task's own
test files: ImageNet's val/, GLUE's dev sets, LibriSpeech's evaluation sets),
at the last step (no model selection on the test set); `eval.metrics` adds the
GLUE ones (`metrics.py`: MCC, F1, Pearson, Spearman).

The official protocols (`experiments/finetune.py:imagenet_v2`, `glue_rte`,
`librispeech_10h`, ...; docs/finetuning.md) add: the image recipes' in-step
augmentation (erasing noise, mixup / cutmix, soft targets; the train
transform's `device_augment`), the encoder's dropout / drop path in training
(`train.stochastic_encoder`), RoBERTa's classification head (`head.kind`),
fairseq's polynomial schedule and weight-decay scopes. Writes `workdir/results.json`,
`workdir/metrics.jsonl` and `workdir/finetune.png`.
"""

# Modules: `config` (validation, step count), `backbone` (pretrained weights,
# backbone config, labeled data), `model` (encoder + pooled head), `optim`
# (layer-wise lr decay, AdamW), `steps` (train / predict steps, metrics), `loop`
# (`prepare`, `train_and_evaluate`, results, plot), `__main__` (the command line).

from d2v_jax.finetune.backbone import (backbone_config_for, held_out_of_pretraining,
                                       load_pretrained, make_labeled_data, prepare_backbone)
from d2v_jax.finetune.config import HEAD_NORMS, INIT_PARAMS, MODES, POOLS, num_steps, validate
from d2v_jax.finetune.loop import HEADLINE, Run, plot, prepare, train_and_evaluate
from d2v_jax.finetune.model import CTCModel, FinetuneModel, build_model, load_backbone_into
from d2v_jax.finetune.optim import layer_scales, make_optimizer, make_schedule, scale_by_tree
from d2v_jax.finetune.steps import (CTCPredict, FinetuneState, classification_metrics,
                                    compute_loss, evaluate, evaluate_ctc, macro_f1,
                                    make_ctc_steps, make_steps, regression_metrics)

__all__ = [
    "HEADLINE", "HEAD_NORMS", "INIT_PARAMS", "MODES", "POOLS", "CTCModel", "CTCPredict",
    "FinetuneModel", "FinetuneState", "evaluate_ctc", "make_ctc_steps",
    "Run", "backbone_config_for", "build_model", "classification_metrics", "compute_loss",
    "evaluate", "held_out_of_pretraining", "layer_scales", "load_backbone_into",
    "load_pretrained", "macro_f1", "make_labeled_data", "make_optimizer", "make_schedule",
    "make_steps", "num_steps", "plot", "prepare", "prepare_backbone", "regression_metrics",
    "scale_by_tree", "train_and_evaluate", "validate",
]
