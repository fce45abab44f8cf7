"""Loading and validating experiment configs.

An experiment file is a Python file with `get_config(arg)`; `load_config(
"experiments/image.py:tiny_v2")` mirrors what `--config` does on the command
line. `validate` rejects impossible combinations with a message that names the
field, so a typo or a shape that cannot work fails before any compilation.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections

_NORMS = ("instance", "layer", "batch", "none")
_FINAL_NORMS = ("instance", "layer", "none")


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`path/to/file.py[:arg]` -> locked ConfigDict, with dotted-key overrides."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    mod_spec = importlib.util.spec_from_file_location("_d2v_experiment", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    for key, value in (overrides or {}).items():
        set_field(config, key, value)
    return config


def parse_overrides(text: str) -> dict:
    """'a.b=1,c=x' -> {'a.b': 1, 'c': 'x'} (values parsed as Python literals when they are)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def set_field(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets `a.b.c`; a misspelt field is an error naming it, never a new key."""
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise KeyError(f"config has no field {'.'.join(parents[:i + 1])!r}")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"config has no field {key!r}; fields under "
                       f"{'.'.join(parents) or 'config'}: {sorted(node.keys())}")
    with node.unlocked():
        node[leaf] = value


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"config.{field}: {msg}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ValueError naming the first impossible field."""
    m, t = config.model, config.target
    _check(config.version in ("v1", "v2"), "version", f"{config.version!r} is not 'v1' or 'v2'")
    _check(m.dim % m.num_heads == 0, "model.num_heads",
           f"model.dim={m.dim} is not divisible by num_heads={m.num_heads}")
    _check(1 <= t.top_k <= m.depth, "target.top_k",
           f"{t.top_k} must be in [1, model.depth={m.depth}]")
    _check(t.layer_norm in _NORMS, "target.layer_norm", f"{t.layer_norm!r} not in {_NORMS}")
    _check(t.final_norm in _FINAL_NORMS, "target.final_norm",
           f"{t.final_norm!r} not in {_FINAL_NORMS}")
    _check(config.loss.beta >= 0, "loss.beta", f"{config.loss.beta} < 0")
    e = config.ema
    _check(0 <= e.start <= 1 and 0 <= e.end <= 1, "ema", f"start={e.start}, end={e.end} not in [0, 1]")
    k = config.masking
    _check(0 < k.ratio < 1, "masking.ratio", f"{k.ratio} is not in (0, 1)")
    _check(k.num_clones >= 1, "masking.num_clones", f"{k.num_clones} < 1")
    _check(config.data.batch_size >= 1, "data.batch_size", f"{config.data.batch_size} < 1")
    _check(config.train.num_steps >= 1, "train.num_steps", f"{config.train.num_steps} < 1")
    _check(0.0 < config.collapse.max_target_pos_share <= 1.0, "collapse.max_target_pos_share",
           f"{config.collapse.max_target_pos_share} is not in (0, 1]")
    _check(config.collapse.action in ("warn", "stop"), "collapse.action",
           f"{config.collapse.action!r} is not 'warn' or 'stop'")
    r = config.train
    _check(r.checkpoint_every >= 0, "train.checkpoint_every", f"{r.checkpoint_every} < 0")
    _check(r.keep_checkpoints >= 1, "train.keep_checkpoints", f"{r.keep_checkpoints} < 1")
    _check(r.get("keep_every", 0) >= 0, "train.keep_every", f"{r.get('keep_every')} < 0")
    _check(r.get("nonfinite", "stop") in ("stop", "skip"), "train.nonfinite",
           f"{r.get('nonfinite')!r} is not 'stop' or 'skip'")
    if config.modality == "image":
        _validate_image(config)
    elif config.modality == "text":
        _validate_text(config)
    elif config.modality == "audio":
        _validate_audio(config)
    return config


def _validate_image(config: ml_collections.ConfigDict) -> None:
    m, k = config.model, config.masking
    _check(m.image_size % m.patch_size == 0, "model.image_size",
           f"{m.image_size} is not divisible by model.patch_size={m.patch_size}")
    n = (m.image_size // m.patch_size) ** 2
    _check(len(config.data.mean) == m.channels and len(config.data.std) == m.channels,
           "data.mean", f"data.mean/std have {len(config.data.mean)}/{len(config.data.std)} "
           f"entries but model.channels={m.channels}")
    from d2v_jax.models.image import PATCH_EMBED_INITS

    _check(m.patch_embed_init in PATCH_EMBED_INITS, "model.patch_embed_init",
           f"{m.patch_embed_init!r} not in {sorted(PATCH_EMBED_INITS)}")
    holdout = config.data.get("holdout_fraction", 0.0)
    _check(0.0 <= holdout < 1.0, "data.holdout_fraction", f"{holdout} is not in [0, 1)")
    if config.version == "v2":
        _check(k.kind == "inverse_block", "masking.kind",
               "2.0 runs the student on visible patches only, which needs the same masked "
               f"count in every row: use 'inverse_block', not {k.kind!r}")
        _check(config.decoder.dim % config.decoder.groups == 0, "decoder.groups",
               f"decoder.dim={config.decoder.dim} is not divisible by groups={config.decoder.groups}")
        _check(m.dim % config.decoder.groups == 0, "decoder.groups",
               f"model.dim={m.dim} is not divisible by decoder.groups={config.decoder.groups}")
        _check(m.abs_pos != "sincos" or m.dim % 4 == 0, "model.dim",
               f"{m.dim} must be divisible by 4 for sin-cos positions")
    else:
        _check(config.loss.cls_weight == 0, "loss.cls_weight", "the CLS loss is a 2.0 feature")
    if k.kind == "block":
        num = k.num_masked if k.num_masked is not None else int(k.ratio * n)
        _check(0 < num < n, "masking.num_masked", f"{num} is not in (0, {n}) patches")


def _validate_text(config: ml_collections.ConfigDict) -> None:
    """Text, SMILES and proteins (d2v_jax/models/text.py, d2v_jax/data/text.py)."""
    from d2v_jax import text_masking
    from d2v_jax.data import text as text_data
    from d2v_jax.data import tokenizer
    m, k, d = config.model, config.masking, config.data
    _check(config.tokenizer.kind in tokenizer.TOKENIZERS, "tokenizer.kind",
           f"{config.tokenizer.kind!r} not in {sorted(tokenizer.TOKENIZERS)}")
    _check(d.source in text_data.SOURCES, "data.source", f"{d.source!r} not in {text_data.SOURCES}")
    _check(d.packing in text_data.PACKINGS, "data.packing", f"{d.packing!r} not in {text_data.PACKINGS}")
    _check(d.too_long in text_data.TOO_LONG, "data.too_long", f"{d.too_long!r} not in {text_data.TOO_LONG}")
    _check(d.on_invalid in ("skip", "error"), "data.on_invalid", f"{d.on_invalid!r} is not 'skip' or 'error'")
    _check(3 <= d.max_len <= m.max_positions, "data.max_len",
           f"{d.max_len} must be in [3, model.max_positions={m.max_positions}]: a sequence longer "
           "than the learned positions cannot be embedded")
    _check(k.kind in text_masking.KINDS, "masking.kind", f"{k.kind!r} not in {text_masking.KINDS}")
    if config.version == "v2":
        _check(k.kind == "random", "masking.kind",
               "2.0 encodes only the visible tokens, which needs the exact per-row count of "
               f"'random' masking, not {k.kind!r}")
        _check(k.leave_unmasked_prob == 0 and k.random_token_prob == 0, "masking.random_token_prob",
               "2.0 removes masked tokens from the student; leave_unmasked_prob and "
               "random_token_prob must be 0")
        _check(config.decoder.dim % config.decoder.groups == 0 and m.dim % config.decoder.groups == 0,
               "decoder.groups", f"decoder.dim={config.decoder.dim} and model.dim={m.dim} must be "
               f"divisible by decoder.groups={config.decoder.groups}")
    else:
        _check(k.kind != "random", "masking.kind", "1.0 text masking is 'bert' or 'span'")
        _check(k.loss_on in ("mask_token", "all"), "masking.loss_on",
               f"{k.loss_on!r} is not 'mask_token' or 'all'")
    _check(config.loss.cls_weight == 0, "loss.cls_weight", "the text model has no CLS loss")


def _validate_audio(config: ml_collections.ConfigDict) -> None:
    m, k, d = config.model, config.masking, config.data
    n = len(m.conv_dims)
    _check(n >= 1 and len(m.conv_kernels) == n and len(m.conv_strides) == n, "model.conv_dims",
           f"conv_dims/conv_kernels/conv_strides have {n}/{len(m.conv_kernels)}/"
           f"{len(m.conv_strides)} entries; they must be equally long and non-empty")
    _check(m.pos_conv in ("stack", "single"), "model.pos_conv", f"{m.pos_conv!r} is not 'stack' or 'single'")
    _check(m.get("pos_conv_zero_pad", "layer") in ("layer", "input"), "model.pos_conv_zero_pad",
           f"{m.get('pos_conv_zero_pad')!r} is not 'layer' or 'input'")
    _check(m.dim % m.pos_conv_groups == 0, "model.pos_conv_groups",
           f"model.dim={m.dim} is not divisible by pos_conv_groups={m.pos_conv_groups}")
    _check(0.0 <= m.feature_grad_mult <= 1.0, "model.feature_grad_mult",
           f"{m.feature_grad_mult} is not in [0, 1]")
    buckets = tuple(d.buckets)
    _check(len(buckets) >= 1 and list(buckets) == sorted(set(buckets))
           and buckets[-1] == d.max_sample_size, "data.buckets",
           f"{buckets} must be strictly increasing and end with data.max_sample_size="
           f"{d.max_sample_size}")
    _check(d.on_error in ("raise", "skip"), "data.on_error", f"{d.on_error!r} is not 'raise' or 'skip'")
    _check(k.span >= 1, "masking.span", f"{k.span} < 1")
    if config.version == "v2":
        _check(k.kind == "block_1d", "masking.kind",
               "2.0 runs the student on unmasked frames only, which needs the same masked "
               f"count in every row: use 'block_1d', not {k.kind!r}")
        _check(config.decoder.dim % config.decoder.groups == 0, "decoder.groups",
               f"decoder.dim={config.decoder.dim} is not divisible by groups={config.decoder.groups}")
        _check(m.dim % config.decoder.groups == 0, "decoder.groups",
               f"model.dim={m.dim} is not divisible by decoder.groups={config.decoder.groups}")
    else:
        _check(k.kind in ("span", "block_1d"), "masking.kind", f"{k.kind!r} is not 'span' or 'block_1d'")
    _check(config.loss.cls_weight == 0, "loss.cls_weight", "the audio model has no CLS token")
