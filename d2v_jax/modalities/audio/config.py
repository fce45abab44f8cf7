"""The audio modality's config checks (called by `d2v_jax.config.validate`)."""

from __future__ import annotations

import ml_collections

from d2v_jax.errors import check_field
from d2v_jax.modalities.audio.model import FRONTENDS
from d2v_jax.models.decoder import validate_decoder
from d2v_jax.models.layers import validate_encoder


def validate(config: ml_collections.ConfigDict) -> None:
    """The audio checks of `d2v_jax.config.validate` (ConfigError naming the field)."""
    validate_encoder(config)
    m, k, d = config.model, config.masking, config.data
    n = len(m.conv_dims)
    check_field(n >= 1 and len(m.conv_kernels) == n and len(m.conv_strides) == n, "model.conv_dims",
                f"conv_dims/conv_kernels/conv_strides have {n}/{len(m.conv_kernels)}/"
                f"{len(m.conv_strides)} entries; they must be equally long and non-empty")
    frontend = m.get("frontend", "conv")
    check_field(frontend in FRONTENDS, "model.frontend",
                f"{frontend!r} is not one of {FRONTENDS}")
    check_field(frontend == "conv" or m.conv_kernels[0] >= 2, "model.conv_kernels",
                f"model.frontend='fbank' reads conv_kernels[0]={m.conv_kernels[0]} as its "
                "window in samples (e.g. 400 = 25 ms at 16 kHz)")
    check_field(m.pos_conv in ("stack", "single"), "model.pos_conv", f"{m.pos_conv!r} is not 'stack' or 'single'")
    check_field(m.get("pos_conv_zero_pad", "layer") in ("layer", "input", "none"),
                "model.pos_conv_zero_pad",
                f"{m.get('pos_conv_zero_pad')!r} is not 'layer', 'input' or 'none'")
    check_field(m.dim % m.pos_conv_groups == 0, "model.pos_conv_groups",
                f"model.dim={m.dim} is not divisible by pos_conv_groups={m.pos_conv_groups}")
    v = m.get("prenet_dropout", m.dropout)
    check_field(0.0 <= v < 1.0, "model.prenet_dropout", f"{v} is not in [0, 1)")
    check_field(0.0 <= m.feature_grad_mult <= 1.0, "model.feature_grad_mult",
                f"{m.feature_grad_mult} is not in [0, 1]")
    buckets = tuple(d.buckets)
    check_field(len(buckets) >= 1 and list(buckets) == sorted(set(buckets))
                and buckets[-1] == d.max_sample_size, "data.buckets",
                f"{buckets} must be strictly increasing and end with data.max_sample_size="
                f"{d.max_sample_size}")
    holdout = d.get("holdout_fraction", 0.0)
    check_field(0.0 <= holdout < 1.0, "data.holdout_fraction", f"{holdout} is not in [0, 1)")
    check_field(holdout == 0 or d.source in ("espeak_words", "audio_folder"), "data.holdout_fraction",
                f"{holdout} with data.source={d.source!r}: only a labeled set (espeak_words, or "
                "audio_folder on the fine-tune's class folders) has a test split to hold out")
    check_field(d.on_error in ("raise", "skip"), "data.on_error", f"{d.on_error!r} is not 'raise' or 'skip'")
    check_field(k.span >= 1, "masking.span", f"{k.span} < 1")
    if config.version == "v2":
        check_field(k.kind == "block_1d", "masking.kind",
                    "2.0 runs the student on unmasked frames only, which needs the same masked "
                    f"count in every row: use 'block_1d', not {k.kind!r}")
        validate_decoder(config)
    else:
        check_field(k.kind in ("span", "block_1d"), "masking.kind", f"{k.kind!r} is not 'span' or 'block_1d'")
    check_field(config.loss.cls_weight == 0, "loss.cls_weight", "the audio model has no CLS token")
