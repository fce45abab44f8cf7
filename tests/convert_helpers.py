"""Helpers of the conversion tests (tests/test_convert_*.py): tiny Hugging Face
models and a fairseq data2vec 2.0 image checkpoint built from random tensors.

Needs the `convert` extra (torch, transformers): import it after the test
module's `pytest.importorskip` calls.
"""

import jax
import numpy as np
import torch

# ----------------------------------------------------------------------------- Hugging Face


def perturbed(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hidden(model, **inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state.numpy()


def assert_same_params(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert [k for k, _ in flat_a] == list(flat_b)
    for k, v in flat_a:
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_b[k]), err_msg=str(k))


VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              image_size=16, patch_size=4, num_channels=3, use_mask_token=True,
              use_shared_relative_position_bias=True, use_relative_position_bias=False,
              use_absolute_position_embeddings=False, use_mean_pooling=False,
              layer_scale_init_value=0.1, layer_norm_eps=1e-6)

# ----------------------------------------------------------------------------- fairseq
# A state dict with fairseq's key layout and random tensors.

DIM, DEPTH, HEADS, PATCH, SIDE, CH = 32, 2, 4, 4, 4, 3  # 16x16 images, 4x4 patches
DEC_DIM, DEC_K, DEC_LAYERS, DEC_G = 16, 3, 2, 4
I = "modality_encoders.IMAGE."


def mae_sincos(dim, side):
    """MAE's get_2d_sincos_pos_embed (cls_token=False), written out."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def rand(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def alt_block_tensors(p, dim=None, hidden=None):
    """A data2vec 2.0 AltBlock (fused qkv, post-LN) under prefix `p`."""
    dim = dim or DIM
    hidden = hidden or 4 * dim
    return {p + "attn.qkv.weight": rand(3 * dim, dim), p + "attn.qkv.bias": rand(3 * dim),
            p + "attn.proj.weight": rand(dim, dim), p + "attn.proj.bias": rand(dim),
            p + "norm1.weight": 1 + rand(dim), p + "norm1.bias": rand(dim),
            p + "norm2.weight": 1 + rand(dim), p + "norm2.bias": rand(dim),
            p + "mlp.fc1.weight": rand(hidden, dim), p + "mlp.fc1.bias": rand(hidden),
            p + "mlp.fc2.weight": rand(dim, hidden), p + "mlp.fc2.bias": rand(dim)}


def encoder_tensors(prefix, blocks_prefix, local=True, prenet=0, depth=DEPTH):
    sd = {}
    if local:
        sd[prefix + "local_encoder.proj.weight"] = rand(DIM, CH, PATCH, PATCH)
        sd[prefix + "local_encoder.proj.bias"] = rand(DIM)
    sd[prefix + "fixed_positional_encoder.positions"] = torch.tensor(
        mae_sincos(DIM, SIDE), dtype=torch.float32)[None]
    sd[prefix + "extra_tokens"] = rand(1, 1, DIM)
    sd[prefix + "context_encoder.norm.weight"] = 1 + rand(DIM)
    sd[prefix + "context_encoder.norm.bias"] = rand(DIM)
    for i in range(prenet):
        sd.update(alt_block_tensors(f"{prefix}context_encoder.blocks.{i}."))
    for i in range(depth):
        sd.update(alt_block_tensors(f"{blocks_prefix}{i}."))
    return sd


def fairseq_checkpoint(ema_layout="full", prenet=0, depth=DEPTH, cfg=None):
    """A data2vec_multi IMAGE checkpoint (released base: prenet 2 + depth 10)."""
    torch.manual_seed(0)
    sd = encoder_tensors(I, "blocks.", prenet=prenet, depth=depth)
    for i in range(DEC_LAYERS):
        cin = DIM if i == 0 else DEC_DIM
        sd[f"{I}decoder.blocks.{i}.0.weight"] = rand(DEC_DIM, cin // DEC_G, DEC_K, DEC_K)
        sd[f"{I}decoder.blocks.{i}.0.bias"] = rand(DEC_DIM)
    sd[f"{I}decoder.proj.weight"] = rand(DIM, DEC_DIM)
    sd[f"{I}decoder.proj.bias"] = rand(DIM)
    if ema_layout == "full":  # ema_local_encoder=True: teacher has its own patch embedding
        sd["_ema"] = encoder_tensors(I, "blocks.", prenet=prenet, depth=depth)
    else:  # ema_encoder_only: blocks as "{i}.*"
        sd["_ema"] = {k: v for k, v in encoder_tensors("x.", "", depth=depth).items()
                      if k[0].isdigit()}
    model_cfg = {"num_heads": HEADS, "norm_eps": 1e-6, **(cfg or {})}
    return {"model": sd, "cfg": {"model": model_cfg}}
