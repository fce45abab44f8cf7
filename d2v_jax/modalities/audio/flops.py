"""FLOPs of one audio train step (see `d2v_jax/models/flops.py` for how they are counted)."""

from __future__ import annotations

import ml_collections

from d2v_jax.modalities.audio import masking
from d2v_jax.models.flops import (FWD_BWD, FWD_BWD_NO_INPUT_GRAD, StepFlops, conv, decoder, encoder,
                                  linear, mlp_hidden, pack)


def step_flops(config: ml_collections.ConfigDict, b: int, clones: int) -> StepFlops:
    m, d = config.model, config.decoder
    hidden = mlp_hidden(m)
    # The wav2vec 2.0 conv extractor, layer by layer, then Linear(C, D).
    length, c_in, convs = int(config.data.max_sample_size), 1, []
    for c, k, s in zip(m.conv_dims, m.conv_kernels, m.conv_strides):
        length = max((length - k) // s + 1, 0)
        convs.append(conv(length, k, c_in, c))
        c_in = c
    t = length
    features = sum(convs) + linear(t, c_in, m.dim)  # per example, forward
    if m.feature_grad_mult > 0:  # conv 0 reads the waveform: weight gradients only
        features_train = FWD_BWD * features - (FWD_BWD - FWD_BWD_NO_INPUT_GRAD) * convs[0]
    else:  # frozen extractor: forward, then only the projection trains
        features_train = sum(convs) + FWD_BWD_NO_INPUT_GRAD * linear(t, c_in, m.dim)
    # The conv positional encoder over [rows, T, D] (SPEC 6 / wav2vec 2.0).
    if m.pos_conv == "stack":
        k = max(3, m.pos_conv_width // m.pos_conv_depth)
        pos_layers = m.pos_conv_depth
    else:
        k, pos_layers = m.pos_conv_width, 1
    pos = pos_layers * conv(t, k, m.dim, m.dim, m.pos_conv_groups)  # per row
    pos_inflate = m.pos_conv_groups if m.conv_impl == "dense" else 1
    rows = b * clones
    parts = {"teacher/features": b * features,
             "teacher/pos_conv": (b * pos, b * pos * pos_inflate),
             "teacher/encoder": encoder(b, t, m.dim, m.depth, hidden),
             # once per example, then cloned (models/audio.py)
             "student/features": b * features_train,
             "student/pos_conv": (FWD_BWD * rows * pos, FWD_BWD * rows * pos * pos_inflate)}
    if config.version == "v1":
        parts["student/encoder"] = FWD_BWD * encoder(rows, t, m.dim, m.depth, hidden)
        parts["head/linear"] = FWD_BWD * linear(rows * t, m.dim, m.dim)
        tokens = {"teacher": t, "student": t}
    else:
        keep = masking.num_keep(config, t)
        parts["student/encoder"] = FWD_BWD * encoder(rows, keep, m.dim, m.depth, hidden)
        dm, de = decoder(rows, t, d.kernel, m.dim, d, m.dim)
        parts["decoder/conv"] = (FWD_BWD * dm, FWD_BWD * de)
        tokens = {"teacher": t, "student": keep, "decoder": t}
    return pack(parts, b, clones, tokens)
