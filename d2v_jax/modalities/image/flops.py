"""FLOPs of one image train step (see `d2v_jax/models/flops.py` for how they are counted)."""

from __future__ import annotations

import ml_collections

from d2v_jax.modalities.image import masking
from d2v_jax.models.flops import (FWD_BWD, FWD_BWD_NO_INPUT_GRAD, StepFlops, conv, decoder, encoder,
                                  linear, mlp_hidden, pack)


def step_flops(config: ml_collections.ConfigDict, b: int, clones: int) -> StepFlops:
    m, d = config.model, config.decoder
    grid = masking.grid_of(config)
    n = grid[0] * grid[1]
    hidden = mlp_hidden(m)
    patch = conv(n, m.patch_size * m.patch_size, m.channels, m.dim)  # per image
    parts = {"teacher/patch_embed": b * patch,
             "teacher/encoder": encoder(b, 1 + n, m.dim, m.depth, hidden)}
    rows = b * clones
    if config.version == "v1":
        # The image is embedded once per student row (models/image.py repeats
        # the patches only when M > 1, after the embedding).
        parts["student/patch_embed"] = FWD_BWD_NO_INPUT_GRAD * b * patch
        parts["student/encoder"] = FWD_BWD * encoder(rows, 1 + n, m.dim, m.depth, hidden)
        parts["head/linear"] = FWD_BWD * linear(rows * n, m.dim, m.dim)
        tokens = {"teacher": 1 + n, "student": 1 + n}
    else:
        keep = masking.num_keep(config)
        parts["student/patch_embed"] = FWD_BWD_NO_INPUT_GRAD * b * patch
        parts["student/encoder"] = FWD_BWD * encoder(rows, 1 + keep, m.dim, m.depth, hidden)
        dm, de = decoder(rows, n, d.kernel ** 2, m.dim, d, m.dim)
        parts["decoder/conv"] = (FWD_BWD * dm, FWD_BWD * de)
        tokens = {"teacher": 1 + n, "student": 1 + keep, "decoder": n}
    return pack(parts, b, clones, tokens)
