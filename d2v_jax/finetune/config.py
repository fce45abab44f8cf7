"""Fine-tune config: the allowed values, validation and the number of steps."""

from __future__ import annotations

import math

import ml_collections

from d2v_jax.data import bad_samples
from d2v_jax.data import labeled
from d2v_jax.errors import check_field
from d2v_jax.optim import DECAY_SCOPES

MODES = ("finetune", "linear_probe")
POOLS = ("mean", "cls")
HEAD_NORMS = ("batch", "layer", "none")
INIT_PARAMS = ("student", "teacher")
# Head kinds: the labeled tasks, and CTC speech recognition (letters per frame).
TASKS = (*labeled.TASKS, "ctc")
SCHEDULES = ("cosine", "constant", "tri_stage", "polynomial")
CTC_REDUCTIONS = ("sentence", "token")
# Heads: pool -> norm -> Linear (MAE / BEiT), or fairseq's RobertaClassificationHead.
HEAD_KINDS = ("linear", "roberta")
HEAD_INITS = ("truncated_normal", "normal", "torch_linear")


_check = check_field  # ConfigError (a ValueError): `config.<field>: <msg>`


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ConfigError naming the first impossible field of a fine-tune config."""
    _check(config.mode in MODES, "mode", f"{config.mode!r} not in {MODES}")
    _check(config.task in TASKS, "task", f"{config.task!r} not in {TASKS}")
    _check(config.head.pool in POOLS, "head.pool", f"{config.head.pool!r} not in {POOLS}")
    _check(config.head.norm in HEAD_NORMS, "head.norm", f"{config.head.norm!r} not in {HEAD_NORMS}")
    _check(config.init.params in INIT_PARAMS, "init.params",
           f"{config.init.params!r} not in {INIT_PARAMS}")
    _check(0 < config.optim.layer_decay <= 1, "optim.layer_decay",
           f"{config.optim.layer_decay} is not in (0, 1]")
    _check(config.data.batch_size >= 1, "data.batch_size", f"{config.data.batch_size} < 1")
    bad_samples.settings(config)  # data.on_bad_sample, data.max_bad_fraction
    _check(config.data.eval_batch_size >= 1, "data.eval_batch_size",
           f"{config.data.eval_batch_size} < 1")
    _check(config.optim.schedule in SCHEDULES, "optim.schedule",
           f"{config.optim.schedule!r} is not one of {SCHEDULES}")
    if config.task == "ctc":
        k, l = config.masking, config.loss
        _check(0 <= k.mask_prob <= 1, "masking.mask_prob", f"{k.mask_prob} is not in [0, 1]")
        _check(0 <= k.mask_channel_prob <= 1, "masking.mask_channel_prob",
               f"{k.mask_channel_prob} is not in [0, 1]")
        _check(k.mask_length >= 1 and k.mask_channel_length >= 1, "masking.mask_length",
               f"mask_length={k.mask_length} / mask_channel_length={k.mask_channel_length} < 1")
        _check(l.ctc_reduction in CTC_REDUCTIONS, "loss.ctc_reduction",
               f"{l.ctc_reduction!r} not in {CTC_REDUCTIONS}")
    h, o = config.head, config.optim
    _check(h.get("kind", "linear") in HEAD_KINDS, "head.kind",
           f"{h.get('kind')!r} not in {HEAD_KINDS}")
    _check(h.get("init", "truncated_normal") in HEAD_INITS, "head.init",
           f"{h.get('init')!r} not in {HEAD_INITS}")
    _check(0 <= h.get("dropout", 0.0) < 1, "head.dropout", f"{h.get('dropout')} is not in [0, 1)")
    _check(h.get("kind", "linear") != "roberta" or h.pool == "cls", "head.pool",
           f"{h.pool!r}: the roberta head reads the first position (<s>); set head.pool='cls'")
    _check(o.get("decay_scope", "matrices") in DECAY_SCOPES, "optim.decay_scope",
           f"{o.get('decay_scope')!r} not in {DECAY_SCOPES}")
    _check(0 <= o.get("warmup_init_ratio", 0.0) <= 1, "optim.warmup_init_ratio",
           f"{o.get('warmup_init_ratio')} is not in [0, 1]")
    _check(o.get("power", 1.0) > 0, "optim.power", f"{o.get('power')} <= 0")
    mix = config.get("mixup", None)
    if mix is not None and (mix.alpha > 0 or mix.cutmix_alpha > 0) and config.mode != "linear_probe":
        _check(config.task == "classification", "mixup.alpha",
               f"mixup / cutmix mix class targets; config.task is {config.task!r}")
        _check(config.data.batch_size % 2 == 0, "data.batch_size",
               f"{config.data.batch_size} is odd: mixup / cutmix pair each example with the "
               "batch's reverse (timm's Mixup needs an even batch)")
    freeze = config.optim.get("freeze_finetune_updates", 0)
    _check(freeze >= 0, "optim.freeze_finetune_updates", f"{freeze} < 0")
    if config.task == "classification":
        _check(0 <= config.loss.label_smoothing < 1, "loss.label_smoothing",
               f"{config.loss.label_smoothing} is not in [0, 1)")
    return config


def num_steps(config: ml_collections.ConfigDict, num_labels: int) -> int:
    """`train.num_steps` if set, else ceil(epochs * labels / batch) clipped to
    [min_steps, max_steps]."""
    t = config.train
    if t.num_steps is not None:
        _check(t.num_steps >= 1, "train.num_steps", f"{t.num_steps} < 1")
        return int(t.num_steps)
    steps = math.ceil(t.epochs * num_labels / config.data.batch_size)
    return int(min(max(steps, t.min_steps), t.max_steps))
