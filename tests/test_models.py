"""Model pieces against independent numpy computations (SPEC 2, 6)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from d2v_jax import modalities
from d2v_jax.config import load_config
from d2v_jax.models.decoder import ConvDecoder
from d2v_jax.models.layers import Block, Encoder, relative_position_index, sincos_2d
from d2v_jax.train_state import init_params

D, H, T = 16, 4, 5


def np_ln(x, scale=None, bias=None, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    return y if scale is None else y * scale + bias


def np_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_attention(x, p, bias=None):
    b, t, d = x.shape
    hd = d // H
    qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, t, H, hd).transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    if bias is not None:
        logits = logits + bias
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return out @ p["proj"]["kernel"] + p["proj"]["bias"]


def np_mlp(x, p):
    h = np_gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def np_block(x, p, layer_norm_first):
    """Reference blocks, written from SPEC 2's table."""
    n1 = lambda z: np_ln(z, p["norm1"]["scale"], p["norm1"]["bias"])
    n2 = lambda z: np_ln(z, p["norm2"]["scale"], p["norm2"]["bias"])
    if layer_norm_first:  # BEiT: x + g1*attn(LN x); x + g2*mlp(LN x); target = output
        x = x + p["gamma_1"] * np_attention(n1(x), p["attn"])
        x = x + p["gamma_2"] * np_mlp(n2(x), p["mlp"])
        return x, x
    x = n1(x + np_attention(x, p["attn"]))  # post-LN: target = FFN output
    h = np_mlp(x, p["mlp"])
    return n2(x + h), h


def randomize(params, seed=0):
    """Non-trivial values everywhere (LN scales, biases, layer scale)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape) + (l if l.ndim == 1 else 0)
                                     for k, l in zip(keys, leaves)])


@pytest.mark.parametrize("layer_norm_first", [True, False])
def test_block_matches_numpy_and_returns_spec_target(layer_norm_first):
    block = Block(D, H, layer_norm_first=layer_norm_first,
                  layer_scale_init=0.1 if layer_norm_first else 0.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, T, D))
    params = randomize(nn.unbox(block.init(jax.random.PRNGKey(0), x, 0.0)["params"]))
    out, target = block.apply({"params": params}, x, 0.0)
    ref_out, ref_target = np_block(np.asarray(x, np.float64),
                                   jax.tree.map(lambda a: np.asarray(a, np.float64), params),
                                   layer_norm_first)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(target, ref_target, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("layer_norm_first", [True, False])
def test_scanned_encoder_equals_blocks_in_sequence(layer_norm_first):
    depth = 3
    enc = Encoder(depth, D, H, layer_norm_first=layer_norm_first, layer_scale_init=0.1)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, T, D))
    params = randomize(nn.unbox(enc.init(jax.random.PRNGKey(0), x, deterministic=True)["params"]))
    out, targets = enc.apply({"params": params}, x, deterministic=True)
    assert targets.shape == (depth, 2, T, D)
    block = Block(D, H, layer_norm_first=layer_norm_first, layer_scale_init=0.1)
    h = x
    for i in range(depth):
        p_i = jax.tree.map(lambda a: a[i], params["blocks"])
        h, t_i = block.apply({"params": p_i}, h, 0.0)
        np.testing.assert_allclose(targets[i], t_i, atol=1e-5)
    np.testing.assert_allclose(out, h, atol=1e-5)


def test_relative_position_index_matches_beit_definition():
    h, w = 2, 3
    idx = relative_position_index((h, w))
    num_rel = (2 * h - 1) * (2 * w - 1)
    cells = [(i, j) for i in range(h) for j in range(w)]
    for a, (ya, xa) in enumerate(cells):
        for b, (yb, xb) in enumerate(cells):
            assert idx[1 + a, 1 + b] == (ya - yb + h - 1) * (2 * w - 1) + (xa - xb + w - 1)
    assert idx[0, 0] == num_rel + 2
    assert (idx[0, 1:] == num_rel).all() and (idx[1:, 0] == num_rel + 1).all()
    assert idx.max() == num_rel + 2


def test_sincos_2d_encodes_column_then_row():
    grid, dim = (3, 4), 16
    table = sincos_2d(grid, dim).reshape(3, 4, dim)
    # first half depends on the column only, second half on the row only
    np.testing.assert_allclose(table[0, :, :8], table[2, :, :8])
    np.testing.assert_allclose(table[:, 0, 8:], table[:, 3, 8:])
    omega = 1 / 10000 ** (np.arange(4) / 4)
    np.testing.assert_allclose(table[1, 2, :4], np.sin(2 * omega), atol=1e-6)
    np.testing.assert_allclose(table[1, 2, 12:], np.cos(1 * omega), atol=1e-6)


@pytest.mark.slow
def test_conv_decoder_layer_matches_numpy():
    grid, cin, dim, groups, k = (3, 4), 4, 6, 2, 3
    dec = ConvDecoder(grid, dim, out_dim=5, kernel_size=k, layers=1, groups=groups)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, cin))
    params = randomize(nn.unbox(dec.init(jax.random.PRNGKey(1), x)["params"]))
    out = np.asarray(dec.apply({"params": params}, x))
    w = np.asarray(params["conv_0"]["kernel"], np.float64)  # [k, k, cin/groups, dim]
    bias = np.asarray(params["conv_0"]["bias"], np.float64)
    img = np.pad(np.asarray(x, np.float64).reshape(2, 3, 4, cin), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros((2, 3, 4, dim))
    gi, go = cin // groups, dim // groups
    for o in range(dim):
        g = o // go
        for i in range(3):
            for j in range(4):
                patch = img[:, i:i + k, j:j + k, g * gi:(g + 1) * gi]
                conv[:, i, j, o] = (patch * w[:, :, :, o]).sum((1, 2, 3)) + bias[o]
    h = np_gelu(np_ln(conv, eps=1e-5)).reshape(2, 12, dim)  # widths differ: no residual
    ref = h @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])
    np.testing.assert_allclose(out, ref, atol=1e-4)


def _init_params(config):
    """The unboxed params of init_params(config, PRNGKey(0)), made by one jitted call
    (the same values; op-by-op init compiles every op on its own)."""
    return nn.unbox(jax.jit(lambda r: init_params(config, r))(jax.random.PRNGKey(0)))


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["tiny_v1", "tiny_v2"])
def test_student_never_sees_masked_pixels(arg):
    """The student's predictions do not depend on the content of masked
    patches (1.0: mask token; 2.0: visible tokens only), but do on visible ones."""
    config = load_config(f"experiments/image.py:{arg}")
    model = modalities.build_model(config)
    params = _init_params(config)
    batch = modalities.dummy_batch(config, 2)
    rng = np.random.default_rng(0)
    batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
    for b in range(2):  # different masks per clone and per image
        for j in range(config.masking.num_clones):
            batch["mask"][b, j] = rng.permutation(batch["mask"][b, j])
    p = config.model.patch_size
    g = config.model.image_size // p
    # pixels of patches masked in every clone of image 0
    masked_all = batch["mask"][0].all(0).reshape(g, g)
    assert masked_all.any()

    def run(image):
        out = model.apply({"params": params}, {"image": image, "mask": batch["mask"]},
                          method="student", deterministic=True, rngs={"noise": jax.random.PRNGKey(3)})
        return np.asarray(out["pred"])

    base = run(batch["image"])
    changed = batch["image"].copy()
    pix = np.kron(masked_all, np.ones((p, p), bool))
    changed[0][pix] += 5.0
    np.testing.assert_allclose(run(changed), base, atol=1e-5)
    visible = batch["image"].copy()
    visible[0][~pix] += 5.0
    assert np.abs(run(visible) - base).max() > 1e-2


@pytest.mark.slow
def test_teacher_returns_top_block_tensors_without_cls():
    config = load_config("experiments/image.py:tiny_v2")
    model = modalities.build_model(config)
    params = _init_params(config)
    batch = modalities.dummy_batch(config, 3)
    out = model.apply({"params": {k: params[k] for k in ("frontend", "encoder")}}, batch,
                      method="teacher")
    n = (config.model.image_size // config.model.patch_size) ** 2
    assert out["layers"].shape == (config.model.depth, 3, n, config.model.dim)
    assert out["padding_mask"] is None


@pytest.mark.parametrize("impl", ["einsum", "dense"])
@pytest.mark.parametrize("grid, kernel_size, groups", [((5, 6), 3, 4), ((7,), 4, 2), ((4, 4), 2, 1)])
def test_grouped_conv_impls_match_xla(impl, grid, kernel_size, groups):
    from d2v_jax.models.decoder import grouped_conv
    rng = np.random.default_rng(0)
    cin, cout = 8, 12
    x = rng.standard_normal((2,) + grid + (cin,)).astype(np.float32)
    w = rng.standard_normal((kernel_size,) * len(grid) + (cin // groups, cout)).astype(np.float32)
    ref = grouped_conv(x, w, groups, "xla")
    np.testing.assert_allclose(grouped_conv(x, w, groups, impl), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="split into 5 groups"):
        grouped_conv(x, w, 5, impl)


@pytest.mark.parametrize("name, bound", [
    # torch.nn.init.xavier_uniform_(w.view(D, -1)): fans p*p*C and D.
    ("xavier", np.sqrt(6.0 / (4 * 4 * 3 + 40))),
    # torch Conv2d default: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(p*p*C)).
    ("torch_conv", 1.0 / np.sqrt(4 * 4 * 3)),
])
def test_patch_embed_init_matches_the_pytorch_recipes(name, bound):
    from d2v_jax.modalities.image.model import PATCH_EMBED_INITS

    w = np.asarray(PATCH_EMBED_INITS[name](jax.random.PRNGKey(0), (4, 4, 3, 40)))
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.97 * bound
    # uniform on [-bound, bound]: std = bound / sqrt(3)
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.05)
    config = load_config("experiments/image.py:tiny_v2", {"model.patch_embed_init": "nope"})
    with pytest.raises(ValueError, match="model.patch_embed_init.*'nope' not in"):
        from d2v_jax.config import validate
        validate(config)
