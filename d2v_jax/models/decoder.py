"""The data2vec 2.0 convolutional decoder (SPEC 6).

The student encoder runs on visible tokens only; the decoder receives the full
grid (visible outputs scattered back, masked positions filled with small noise)
and predicts the teacher's targets everywhere. Each layer is a grouped conv
(kernel k, same padding) -> LayerNorm without affine -> GELU, with a residual
where input and output widths match, then a final Linear to the model width.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2v_jax.models.layers import dense, kernel, zeros


class ConvDecoder(nn.Module):
    """Grouped conv decoder over a 1-D (audio, text) or 2-D (image) grid.

    `grid` is the spatial shape: (T,) for sequences, (h, w) for images.
    """

    grid: Sequence[int]
    dim: int
    out_dim: int
    kernel_size: int
    layers: int
    groups: int
    residual: bool = True
    norm_eps: float = 1e-5  # torch LayerNorm default, as fairseq's decoder
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        grid = tuple(self.grid)
        x = x.reshape((b,) + grid + (c,))
        residual = x
        # A short Python loop: the first layer changes width, so the layers are
        # not one scannable stack, and there are only a handful of them.
        for i in range(self.layers):
            x = nn.Conv(
                self.dim, (self.kernel_size,) * len(grid), padding="SAME",
                feature_group_count=self.groups, dtype=self.dtype, name=f"conv_{i}",
                kernel_init=kernel((None,) * len(grid) + ("embed", "mlp")),
                bias_init=zeros(("mlp",)))(x)
            x = nn.LayerNorm(epsilon=self.norm_eps, use_bias=False, use_scale=False,
                             dtype=self.dtype)(x)
            x = nn.gelu(x, approximate=False)
            if self.residual and residual.shape[-1] == x.shape[-1]:
                x = x + residual
            residual = x
        x = x.reshape(b, n, self.dim)
        return dense(self.out_dim, ("mlp", "embed"), self.dtype, name="proj")(x)
