"""Position encodings of the image model: MAE's fixed 2-D sin-cos table
(data2vec 2.0) and BEiT's relative position bias (data2vec 1.0)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax.models.layers import kernel


def sincos_2d(grid: tuple[int, int], dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table [h*w, dim] (MAE / data2vec 2.0 images).

    Half the channels encode the row, half the column; each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 1 / 10000^(k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need model.dim divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def encode(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    # MAE's convention: the first half encodes the column (w), the second the row.
    return np.concatenate([encode(gw), encode(gh)], axis=1).astype(np.float32)


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """BEiT's [1+N, 1+N] index into a relative-position table with 3 extra
    entries for cls->token, token->cls and cls->cls."""
    h, w = grid
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
    rel = rel.transpose(1, 2, 0)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    n = h * w
    num_rel = (2 * h - 1) * (2 * w - 1)
    index = np.zeros((n + 1, n + 1), dtype=np.int32)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_rel
    index[0:, 0] = num_rel + 1
    index[0, 0] = num_rel + 2
    return index


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias: one table shared by all blocks (1.0
    pretraining), or with `num_tables=L` one per block (BEiT fine-tuning,
    HF `use_relative_position_bias`), stacked as [L, size, H]."""

    grid: tuple[int, int]
    num_heads: int
    num_tables: int = 0  # 0: one shared table [size, H]; L: [L, size, H]

    @nn.compact
    def __call__(self) -> jax.Array:
        h, w = self.grid
        size = (2 * h - 1) * (2 * w - 1) + 3
        lead = (self.num_tables,) if self.num_tables else ()
        names = ((None,) if self.num_tables else ()) + ("rel_pos", "heads")
        table = self.param(
            "relative_position_bias_table", kernel(names, nn.initializers.zeros_init()),
            lead + (size, self.num_heads))
        index = relative_position_index(self.grid)
        bias = table[..., index.reshape(-1), :].reshape(lead + index.shape + (self.num_heads,))
        bias = jnp.moveaxis(bias, -1, -3)  # [..., H, 1+N, 1+N]
        return bias[..., None, :, :, :]  # [1, H, 1+N, 1+N] or [L, 1, H, 1+N, 1+N]
