"""FLOP terms of the shared modules, from which each modality's
`modalities/<m>/flops.py` adds up one train step (a pure function of the config).

Counted as the MFU literature does (PaLM appendix B, MaxText): multiply-adds of
the matmuls and convolutions, 2 FLOPs each, attention scores and the attention
-weighted sum included; element-wise work (norms, GELU, softmax, the loss, the
optimizer and the EMA) is left out. A backward pass costs twice its forward
(gradients w.r.t. the input and the weights), except for a layer whose input
needs no gradient (the patch embedding, the first audio conv, a frozen conv
extractor), which computes only the weight gradient.

What runs, per SPEC section 6 and the models (`modalities/*/model.py`):
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

import dataclasses
from typing import Any


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
    `positions` (SPEC 6): `dec.layers` grouped convs, then the projection:
    Linear(dec.dim, out_dim), or with `dec.projection_layers` = n > 1 (text 2.0)
    n Linear layers, the first widening by `dec.projection_ratio`."""
    model = executed = 0.0
    c_in = in_dim
    inflate = dec.groups if dec.conv_impl == "dense" else 1
    for _ in range(dec.layers):
        f = conv(rows * positions, kernel_elems, c_in, dec.dim, dec.groups)
        model, executed = model + f, executed + f * inflate
        c_in = dec.dim
    proj, width = 0.0, dec.dim
    for i in range(dec.get("projection_layers", 1) - 1):
        nxt = int(width * dec.get("projection_ratio", 2.0)) if i == 0 else width
        proj, width = proj + linear(rows * positions, width, nxt), nxt
    proj += linear(rows * positions, width, out_dim)
    return model + proj, executed + proj


# Forward + backward multipliers: input and weight gradients (3x), or weight
# gradients only (2x) when nothing upstream needs a gradient.
FWD_BWD = 3.0


FWD_BWD_NO_INPUT_GRAD = 2.0


def mlp_hidden(m: Any) -> int:
    return int(m.dim * m.mlp_ratio)


def pack(parts: dict[str, Any], b: int, clones: int, tokens: dict[str, int]) -> StepFlops:
    pairs = {k: (float(v), float(v)) if not isinstance(v, tuple) else (float(v[0]), float(v[1]))
             for k, v in parts.items()}
    return StepFlops(parts=pairs, batch_size=b, clones=clones, tokens=tokens)
