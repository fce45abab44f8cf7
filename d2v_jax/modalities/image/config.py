"""The image modality's config checks (called by `d2v_jax.config.validate`)."""

from __future__ import annotations

import ml_collections

from d2v_jax.errors import check_field
from d2v_jax.models.decoder import validate_decoder
from d2v_jax.models.layers import validate_encoder
from d2v_jax.modalities.image.model import PATCH_EMBED_INITS


def validate(config: ml_collections.ConfigDict) -> None:
    """The image checks of `d2v_jax.config.validate` (ConfigError naming the field)."""
    validate_encoder(config)
    m, k = config.model, config.masking
    check_field(m.image_size % m.patch_size == 0, "model.image_size",
                f"{m.image_size} is not divisible by model.patch_size={m.patch_size}")
    n = (m.image_size // m.patch_size) ** 2
    check_field(len(config.data.mean) == m.channels and len(config.data.std) == m.channels,
                "data.mean", f"data.mean/std have {len(config.data.mean)}/{len(config.data.std)} "
                f"entries but model.channels={m.channels}")
    check_field(m.rel_pos_bias in ("none", "shared", "per_block"), "model.rel_pos_bias",
                f"{m.rel_pos_bias!r} is not 'none', 'shared' or 'per_block'")
    check_field(m.patch_embed_init in PATCH_EMBED_INITS, "model.patch_embed_init",
                f"{m.patch_embed_init!r} not in {sorted(PATCH_EMBED_INITS)}")
    v = m.get("token_init_std", 0.02)
    check_field(v > 0, "model.token_init_std", f"{v} must be > 0")
    holdout = config.data.get("holdout_fraction", 0.0)
    check_field(0.0 <= holdout < 1.0, "data.holdout_fraction", f"{holdout} is not in [0, 1)")
    if config.version == "v2":
        check_field(k.kind == "inverse_block", "masking.kind",
                    "2.0 runs the student on visible patches only, which needs the same masked "
                    f"count in every row: use 'inverse_block', not {k.kind!r}")
        validate_decoder(config)
        check_field(m.abs_pos != "sincos" or m.dim % 4 == 0, "model.dim",
                    f"{m.dim} must be divisible by 4 for sin-cos positions")
        check_field(m.rel_pos_bias == "none", "model.rel_pos_bias",
                    f"{m.rel_pos_bias!r}: the 2.0 student encodes visible patches only, and a "
                    "relative position bias is indexed by the full grid; use 'none'")
    else:
        check_field(config.loss.cls_weight == 0, "loss.cls_weight", "the CLS loss is a 2.0 feature")
    if k.kind == "block":
        num = k.num_masked if k.num_masked is not None else int(k.ratio * n)
        check_field(0 < num < n, "masking.num_masked", f"{num} is not in (0, {n}) patches")
