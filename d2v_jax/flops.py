"""Analytic FLOPs of one data2vec train step, a pure function of the config.

Counted as the MFU literature does (PaLM appendix B, MaxText): multiply-adds of
the matmuls and convolutions, 2 FLOPs each, attention scores and the attention
-weighted sum included; element-wise work (norms, GELU, softmax, the loss, the
optimizer and the EMA) is left out. A backward pass costs twice its forward
(gradients w.r.t. the input and the weights), except for a layer whose input
needs no gradient (the patch embedding, the first audio conv, a frozen conv
extractor), which computes only the weight gradient.

What runs, per SPEC section 6 and the models in `d2v_jax/models`:
- teacher: forward on the full input of B examples (no backward);
- student: forward + backward on B*M rows (M clones). For 1.0 every row is the
  full sequence (mask tokens in place); for 2.0 the encoder sees only the
  visible tokens (+ CLS for images), and the conv decoder the full grid. The
  front-end (patch embedding, audio conv extractor) runs once per example and
  is then cloned, as the models do;
- heads: the 1.0 linear head (image, audio), the 1.0 two-layer text head, the
  2.0 decoder's output projection.

`model` FLOPs count a grouped conv as grouped (the useful work, the MFU
numerator). `executed` FLOPs count what the configured implementation
computes: `conv_impl="dense"` runs the grouped conv as a dense one with a
block-diagonal kernel, `groups` x the work (the tiny CPU configs use it);
`executed` is what XLA's cost analysis should approximately agree with.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import ml_collections

from d2v_jax import masking, text_masking


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one train step for the global batch, by part.

    `parts` maps e.g. "teacher/encoder", "student/decoder" to
    `(model_flops, executed_flops)`; forward and backward are summed for the
    student parts.
    """

    parts: dict[str, tuple[float, float]]
    batch_size: int
    clones: int
    tokens: dict[str, int]

    @property
    def model(self) -> float:
        return float(sum(m for m, _ in self.parts.values()))

    @property
    def executed(self) -> float:
        return float(sum(e for _, e in self.parts.values()))

    def by_group(self) -> dict[str, float]:
        """Model FLOPs per top-level part (teacher / student / decoder / head)."""
        out: dict[str, float] = {}
        for name, (m, _) in self.parts.items():
            key = name.split("/")[0]
            out[key] = out.get(key, 0.0) + m
        return out


# -- building blocks (forward FLOPs) -------------------------------------------------
def linear(rows: float, d_in: int, d_out: int) -> float:
    return 2.0 * rows * d_in * d_out


def conv(positions: float, kernel_elems: int, c_in: int, c_out: int, groups: int = 1) -> float:
    """A conv producing `positions` outputs of `c_out` channels: each output
    reads kernel_elems * c_in / groups inputs."""
    return 2.0 * positions * kernel_elems * (c_in // groups) * c_out


def encoder(rows: float, seq: int, dim: int, depth: int, mlp_hidden: int) -> float:
    """A stack of `depth` Transformer blocks over [rows, seq, dim]: fused qkv,
    output projection, the 2-layer MLP, and attention (QK^T and AV)."""
    per_token = linear(1, dim, 3 * dim) + linear(1, dim, dim) + 2 * linear(1, dim, mlp_hidden)
    attention = 2 * 2.0 * seq * seq * dim  # scores and weighted sum, all heads
    return depth * rows * (seq * per_token + attention)


def decoder(rows: float, positions: int, kernel_elems: int, in_dim: int, dec: Any,
            out_dim: int) -> tuple[float, float]:
    """(model, executed) forward FLOPs of the 2.0 conv decoder over a grid of
    `positions` (SPEC 6): `dec.layers` grouped convs, then Linear(dec.dim, out_dim)."""
    model = executed = 0.0
    c_in = in_dim
    inflate = dec.groups if dec.conv_impl == "dense" else 1
    for _ in range(dec.layers):
        f = conv(rows * positions, kernel_elems, c_in, dec.dim, dec.groups)
        model, executed = model + f, executed + f * inflate
        c_in = dec.dim
    proj = linear(rows * positions, dec.dim, out_dim)
    return model + proj, executed + proj


# Forward + backward multipliers: input and weight gradients (3x), or weight
# gradients only (2x) when nothing upstream needs a gradient.
FWD_BWD = 3.0
FWD_BWD_NO_INPUT_GRAD = 2.0


def _mlp_hidden(m: Any) -> int:
    return int(m.dim * m.mlp_ratio)


def _image(config: ml_collections.ConfigDict, b: int, clones: int) -> StepFlops:
    m, d = config.model, config.decoder
    grid = (m.image_size // m.patch_size,) * 2
    n = grid[0] * grid[1]
    hidden = _mlp_hidden(m)
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
        keep = n - masking.num_masked_inverse(grid, config.masking.ratio)
        parts["student/patch_embed"] = FWD_BWD_NO_INPUT_GRAD * b * patch
        parts["student/encoder"] = FWD_BWD * encoder(rows, 1 + keep, m.dim, m.depth, hidden)
        dm, de = decoder(rows, n, d.kernel ** 2, m.dim, d, m.dim)
        parts["decoder/conv"] = (FWD_BWD * dm, FWD_BWD * de)
        tokens = {"teacher": 1 + n, "student": 1 + keep, "decoder": n}
    return _pack(parts, b, clones, tokens)


def _text(config: ml_collections.ConfigDict, b: int, clones: int) -> StepFlops:
    m, d = config.model, config.decoder
    t = int(config.data.max_len)
    hidden = _mlp_hidden(m)
    rows = b * clones
    parts = {"teacher/encoder": encoder(b, t, m.dim, m.depth, hidden)}  # embeddings: gathers
    if config.version == "v1":
        parts["student/encoder"] = FWD_BWD * encoder(rows, t, m.dim, m.depth, hidden)
        parts["head/mlp"] = FWD_BWD * (linear(rows * t, m.dim, 2 * m.dim)
                                       + linear(rows * t, 2 * m.dim, m.dim))
        tokens = {"teacher": t, "student": t}
    else:
        keep = text_masking.num_keep_random(t, config.masking.ratio)
        parts["student/encoder"] = FWD_BWD * encoder(rows, keep, m.dim, m.depth, hidden)
        dm, de = decoder(rows, t, d.kernel, m.dim, d, m.dim)
        parts["decoder/conv"] = (FWD_BWD * dm, FWD_BWD * de)
        tokens = {"teacher": t, "student": keep, "decoder": t}
    return _pack(parts, b, clones, tokens)


def _audio(config: ml_collections.ConfigDict, b: int, clones: int) -> StepFlops:
    m, d = config.model, config.decoder
    hidden = _mlp_hidden(m)
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
        keep = t - masking.num_masked_1d(t, config.masking.ratio)
        parts["student/encoder"] = FWD_BWD * encoder(rows, keep, m.dim, m.depth, hidden)
        dm, de = decoder(rows, t, d.kernel, m.dim, d, m.dim)
        parts["decoder/conv"] = (FWD_BWD * dm, FWD_BWD * de)
        tokens = {"teacher": t, "student": keep, "decoder": t}
    return _pack(parts, b, clones, tokens)


def _pack(parts: dict[str, Any], b: int, clones: int, tokens: dict[str, int]) -> StepFlops:
    pairs = {k: (float(v), float(v)) if not isinstance(v, tuple) else (float(v[0]), float(v[1]))
             for k, v in parts.items()}
    return StepFlops(parts=pairs, batch_size=b, clones=clones, tokens=tokens)


_MODALITIES = {"image": _image, "text": _text, "audio": _audio}


def step_flops(config: ml_collections.ConfigDict, batch_size: int | None = None) -> StepFlops:
    """FLOPs of one train step on a global batch of `batch_size` examples
    (default `config.data.batch_size`), each with `config.masking.num_clones`
    student clones. Gradient accumulation does not change the count."""
    if config.modality not in _MODALITIES:
        raise ValueError(f"flops.step_flops: config.modality={config.modality!r}; expected one "
                         f"of {sorted(_MODALITIES)}")
    b = int(config.data.batch_size if batch_size is None else batch_size)
    if b < 1:
        raise ValueError(f"flops.step_flops: batch_size={b} must be >= 1")
    return _MODALITIES[config.modality](config, b, int(config.masking.num_clones))


# -- the cross-check against XLA -------------------------------------------------------
@contextlib.contextmanager
def unrolled_scans():
    """Traces `nn.scan` stacks fully unrolled while active.

    XLA's `cost_analysis()` counts a while loop's body once, whatever its trip
    count, so the scanned encoder would count as one block. Lowering the same
    step with the scans unrolled gives XLA a loop-free program to count; use it
    only for that count (the step that runs keeps its scan).
    """
    original = nn.scan

    def scan(target, *args, **kwargs):
        if kwargs.get("length"):
            kwargs["unroll"] = kwargs["length"]
        return original(target, *args, **kwargs)

    nn.scan = scan
    try:
        yield
    finally:
        nn.scan = original


def xla_flops(jitted: Any, *args: Any) -> float:
    """XLA's FLOP count of `jitted(*args)`, compiled (not run). Counts the
    element-wise work too, which the analytic count leaves out."""
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError(f"flops.xla_flops: the backend reported no cost analysis ({cost!r})")
    return float(cost["flops"])
