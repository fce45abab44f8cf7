"""FLOPs of one text train step (see `d2v_jax/models/flops.py` for how they are counted)."""

from __future__ import annotations

import ml_collections

from d2v_jax.modalities.text import masking as text_masking
from d2v_jax.models.flops import (FWD_BWD, StepFlops, decoder, encoder,
                                  linear, mlp_hidden, pack)


def step_flops(config: ml_collections.ConfigDict, b: int, clones: int) -> StepFlops:
    m, d = config.model, config.decoder
    t = int(config.data.max_len)
    hidden = mlp_hidden(m)
    rows = b * clones
    parts = {"teacher/encoder": encoder(b, t, m.dim, m.depth, hidden)}  # embeddings: gathers
    if config.version == "v1":
        parts["student/encoder"] = FWD_BWD * encoder(rows, t, m.dim, m.depth, hidden)
        parts["head/mlp"] = FWD_BWD * (linear(rows * t, m.dim, 2 * m.dim)
                                       + linear(rows * t, 2 * m.dim, m.dim))
        tokens = {"teacher": t, "student": t}
    else:
        keep = text_masking.num_keep(config)
        parts["student/encoder"] = FWD_BWD * encoder(rows, keep, m.dim, m.depth, hidden)
        dm, de = decoder(rows, t, d.kernel, m.dim, d, m.dim)
        parts["decoder/conv"] = (FWD_BWD * dm, FWD_BWD * de)
        tokens = {"teacher": t, "student": keep, "decoder": t}
    return pack(parts, b, clones, tokens)
