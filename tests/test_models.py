"""Model pieces against independent numpy computations (SPEC 2, 6)."""

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from d2v_jax import modalities
from d2v_jax.config import load_config
from d2v_jax.models.decoder import ConvDecoder
from d2v_jax.models.layers import Block, Encoder
from d2v_jax.models.positions import relative_position_index, sincos_2d
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


# --- regularization placement (SPEC 7, fairseq TransformerSentenceEncoderLayer /
# AltBlock, BEiT Block), tested by its effect --------------------------------------

def _run_block(block, params, x, seed):
    """(out, target, intermediates) of a block with dropout rng `seed`."""
    (out, target), state = jax.jit(lambda p, x, key: block.apply(
        {"params": p}, x, 0.0, rngs={"dropout": key}, capture_intermediates=True,
        mutable=["intermediates"]))(params, x, jax.random.PRNGKey(seed))
    inter = {"/".join(k[:-1]): np.asarray(v[0], np.float64)
             for k, v in traverse_util.flatten_dict(state["intermediates"]).items()
             if k[-1] == "__call__" and len(k) > 1}
    return np.asarray(out, np.float64), np.asarray(target, np.float64), inter


def _block_and_params(**kw):
    block = Block(D, H, layer_norm_first=False, deterministic=False, **kw)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, T, D))
    params = randomize(nn.unbox(jax.jit(lambda k: block.init(
        {"params": k, "dropout": k}, x, 0.0))(jax.random.PRNGKey(0))["params"]))
    return block, params, x


@pytest.mark.slow  # compiles blocks with dropout (~10 s of CPU)
def test_post_ln_block_dropouts_sit_where_fairseq_puts_them():
    """fairseq (post-LN): x1 = LN1(x + drop(attn(x))); h = fc2(act_drop(gelu(fc1 x1)));
    target = h; out = LN2(x1 + drop(h)). The reference below is that formula with
    the dropped positions (zeros of the dropout outputs) as its only input from
    the run; a dropout elsewhere (e.g. after fc2 before the target) fails it."""
    p, q = 0.3, 0.4
    block, params, x = _block_and_params(dropout=p, activation_dropout=q)
    out, target, inter = _run_block(block, params, x, seed=3)
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    keep_attn = inter["attn/Dropout_0"] != 0  # residual dropout of the attention output
    keep_act = inter["mlp/Dropout_0"] != 0  # activation dropout after GELU
    keep_res = inter["Dropout_0"] != 0  # residual dropout of the FFN output
    for keep, rate in ((keep_attn, p), (keep_act, q), (keep_res, p)):
        assert abs((1 - keep.mean()) - rate) < 0.15  # each dropout drops at its own rate
    xn = np.asarray(x, np.float64)
    a = np_attention(xn, P["attn"]) * keep_attn / (1 - p)
    x1 = np_ln(xn + a, P["norm1"]["scale"], P["norm1"]["bias"])
    g = np_gelu(x1 @ P["mlp"]["fc1"]["kernel"] + P["mlp"]["fc1"]["bias"]) * keep_act / (1 - q)
    h = g @ P["mlp"]["fc2"]["kernel"] + P["mlp"]["fc2"]["bias"]
    ref = np_ln(x1 + h * keep_res / (1 - p), P["norm2"]["scale"], P["norm2"]["bias"])
    np.testing.assert_allclose(target, h, atol=2e-5, rtol=1e-4)  # the target: before dropout
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.slow  # compiles blocks with dropout (~10 s of CPU)
@pytest.mark.parametrize("field, same, changed", [
    # activation dropout: nothing before the GELU moves, fc2 (the target) does
    ("activation_dropout", ("attn", "mlp/fc1"), ("mlp/fc2", "norm2")),
    # attention dropout: acts on the probabilities, so qkv stays and proj moves
    ("attn_dropout", ("attn/qkv",), ("attn/proj", "norm1")),
    # residual dropout: the projection itself is the same, the block input to
    # norm1 is not
    ("dropout", ("attn/proj", "attn/qkv"), ("attn", "norm1")),
])
def test_each_dropout_changes_only_the_activations_after_it(field, same, changed):
    block, params, x = _block_and_params(**{field: 0.5})
    _, _, a = _run_block(block, params, x, seed=1)
    _, _, b = _run_block(block, params, x, seed=2)
    for name in same:
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"{field}: {name} moved")
    for name in changed:
        assert np.abs(a[name] - b[name]).max() > 1e-3, f"{field}: {name} did not move"
    det = Block(D, H, layer_norm_first=False, deterministic=True, **{field: 0.5})
    ref = Block(D, H, layer_norm_first=False, deterministic=True)
    run = lambda blk: jax.jit(lambda p: blk.apply({"params": p}, x, 0.0)[0])(params)
    np.testing.assert_array_equal(run(det), run(ref))


@pytest.mark.slow  # compiles blocks with dropout (~10 s of CPU)
def test_beit_block_drop_path_drops_whole_branches_per_sample():
    """BEiT: x + drop_path(g1 * attn(LN x)), x + drop_path(g2 * mlp(LN x)), one
    draw per sample and branch: with both dropped a sample passes unchanged."""
    block = Block(D, H, layer_norm_first=True, layer_scale_init=0.5, deterministic=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (64, T, D))
    params = randomize(nn.unbox(jax.jit(lambda k: block.init(k, x, 0.0))(
        jax.random.PRNGKey(0))["params"]))
    out, _ = jax.jit(lambda p: block.apply({"params": p}, x, 0.5,
                                           rngs={"dropout": jax.random.PRNGKey(4)}))(params)
    same = np.all(np.isclose(out, x, atol=0), axis=(1, 2))
    assert 0.1 < same.mean() < 0.45  # P(both branches dropped) = 0.25
    # every other sample differs at every position (a branch adds to all of them)
    assert np.all(np.abs(np.asarray(out - x))[~same].max(-1) > 0)
    det = Block(D, H, layer_norm_first=True, layer_scale_init=0.5, deterministic=True)
    run = jax.jit(lambda p, rate: det.apply({"params": p}, x, rate))
    out_det, _ = run(params, 0.5)
    out_none, _ = run(params, 0.0)
    np.testing.assert_array_equal(out_det, out_none)


def _blocks_in_sequence(params, x, keep):
    block = jax.jit(lambda p, h: Block(D, H).apply({"params": p}, h, 0.0)[0])
    h = x
    for i, k in enumerate(keep):
        if k:
            h = block(jax.tree.map(lambda a: a[i], params["blocks"]), h)
    return np.asarray(h)


@pytest.mark.slow  # compiles blocks with dropout (~10 s of CPU)
def test_layerdrop_skips_whole_blocks_only_in_training():
    """fairseq: a block runs unless np.random.random() < layerdrop (one draw per
    block and forward pass); eval never drops. p = 1: the encoder is the identity."""
    import itertools
    depth = 3
    x = jax.random.normal(jax.random.PRNGKey(2), (2, T, D))
    enc = Encoder(depth, D, H, layerdrop=0.5)
    params = randomize(nn.unbox(jax.jit(lambda k: enc.init(k, x, deterministic=True))(
        jax.random.PRNGKey(0))["params"]))
    outs = {keep: _blocks_in_sequence(params, x, keep)
            for keep in itertools.product((False, True), repeat=depth)}
    seen = set()
    train = jax.jit(lambda p, key: enc.apply({"params": p}, x, deterministic=False,
                                             rngs={"dropout": key})[0])
    for seed in range(12):
        out = train(params, jax.random.PRNGKey(seed))
        hits = [k for k, ref in outs.items() if np.allclose(out, ref, atol=1e-5)]
        assert len(hits) == 1, "the output is not some subset of the blocks"
        seen.add(hits[0])
    assert len(seen) >= 3  # different blocks dropped on different draws
    out, _ = jax.jit(lambda p: enc.apply({"params": p}, x, deterministic=True))(params)
    np.testing.assert_allclose(out, outs[(True,) * depth], atol=1e-5)
    always = Encoder(depth, D, H, layerdrop=1.0)
    out, _ = jax.jit(lambda p: always.apply({"params": p}, x, deterministic=False,
                                            rngs={"dropout": jax.random.PRNGKey(0)}))(params)
    np.testing.assert_array_equal(out, x)


# --- init (SPEC 7) -------------------------------------------------------------------

def _encoder_params(**kw):
    enc = Encoder(4, 64, 4, **kw)
    x = jnp.zeros((1, 2, 64))
    return nn.unbox(jax.jit(lambda k: enc.init(k, x, deterministic=True))(
        jax.random.PRNGKey(0))["params"])["blocks"]


def test_beit_init_truncates_at_one_std_and_rescales_block_l_by_sqrt_2l():
    """BEiT (data2vec_vision beit/modeling_cyclical.py): trunc_normal_(std=0.02,
    a=-std, b=std) for every Linear; attn.proj and mlp.fc2 of block l (1-based)
    divided by sqrt(2 l) (fix_init_weight)."""
    from scipy.stats import truncnorm
    std = 0.02
    blocks = _encoder_params(init_std=std, init_truncation=1.0, init_depth_rescale=True)
    trunc_std = std * truncnorm(-1, 1).std()  # 0.5396 * std
    for l in range(1, 5):
        qkv = np.asarray(blocks["attn"]["qkv"]["kernel"][l - 1])
        fc1 = np.asarray(blocks["mlp"]["fc1"]["kernel"][l - 1])
        for w in (qkv, fc1):  # not rescaled
            assert np.abs(w).max() <= std and np.abs(w).max() > 0.99 * std
            np.testing.assert_allclose(w.std(), trunc_std, rtol=0.04)
        for w in (blocks["attn"]["proj"]["kernel"][l - 1], blocks["mlp"]["fc2"]["kernel"][l - 1]):
            w = np.asarray(w)
            bound = std / np.sqrt(2 * l)
            assert np.abs(w).max() <= bound * (1 + 1e-6) and np.abs(w).max() > 0.98 * bound
            np.testing.assert_allclose(w.std(), trunc_std / np.sqrt(2 * l), rtol=0.06)
        np.testing.assert_array_equal(blocks["attn"]["proj"]["bias"][l - 1], 0)


def test_data2vec2_init_is_untruncated_normal_without_rescale():
    """fairseq init_bert_params: N(0, 0.02), no truncation, no depth rescale."""
    blocks = _encoder_params(init_std=0.02)
    for l in range(4):
        for w in (blocks["attn"]["qkv"]["kernel"][l], blocks["mlp"]["fc2"]["kernel"][l]):
            w = np.asarray(w)
            np.testing.assert_allclose(w.std(), 0.02, rtol=0.04)
            assert np.abs(w).max() > 3 * 0.02  # 12k+ draws: a 3-sigma value is certain


@pytest.mark.slow  # two tiny image model inits
def test_image_inits_follow_beit_and_data2vec2():
    """Model level: 1.0 patch embedding, CLS / mask token and head as BEiT's
    _init_weights (|w| <= 0.02); 2.0 CLS token ~ N(0, 1), patch embedding xavier,
    decoder convs and projection at PyTorch's default U(+-1/sqrt(fan_in))."""
    v1 = _init_params(load_config("experiments/image.py:tiny_v1",
                                  {"model.patch_embed_init": "linear"}))
    for w in (v1["frontend"]["patch_embed"]["kernel"], v1["frontend"]["cls_token"],
              v1["frontend"]["mask_token"], v1["head"]["kernel"]):
        assert 0.015 < np.abs(np.asarray(w)).max() <= 0.02
    proj = np.asarray(v1["encoder"]["blocks"]["attn"]["proj"]["kernel"])
    depth = proj.shape[0]
    for l in range(1, depth + 1):
        assert np.abs(proj[l - 1]).max() <= 0.02 / np.sqrt(2 * l) * (1 + 1e-6)
    config = load_config("experiments/image.py:tiny_v2", {"model.dim": 256, "model.num_heads": 4})
    v2 = _init_params(config)
    cls = np.asarray(v2["frontend"]["cls_token"])
    np.testing.assert_allclose(cls.std(), 1.0, rtol=0.15)
    d = config.decoder
    conv = np.asarray(v2["decoder"]["conv_0"]["kernel"])
    bound = 1 / np.sqrt(d.kernel ** 2 * config.model.dim // d.groups)
    assert 0.95 * bound < np.abs(conv).max() <= bound
    np.testing.assert_allclose(conv.std(), bound / np.sqrt(3), rtol=0.05)
    b = np.asarray(v2["decoder"]["conv_0"]["bias"])
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0
    pw = np.asarray(v2["decoder"]["proj"]["kernel"])
    assert 0.95 / np.sqrt(d.dim) < np.abs(pw).max() <= 1 / np.sqrt(d.dim)
    qkv = np.asarray(v2["encoder"]["blocks"]["attn"]["qkv"]["kernel"])
    np.testing.assert_allclose(qkv.std(), 0.02, rtol=0.03)


@pytest.mark.parametrize("arg", ["image.py:tiny_v2", "audio.py:tiny_v2", "text.py:tiny_v2"])
def test_decoder_conv_init_is_a_config_field(arg):
    """`decoder.conv_init=normal` (the pre-fairseq init, kept for ablations)
    reaches every modality's decoder: N(0, 0.02) conv weights and zero bias;
    the default is PyTorch's Conv default; a typo is refused by name."""
    from d2v_jax.errors import ConfigError
    from d2v_jax.models.decoder import decoder_from_config
    for init in ("torch", "normal"):
        config = load_config(f"experiments/{arg}", {"decoder.conv_init": init,
                                                    "decoder.dim": 64, "decoder.groups": 1})
        d = config.decoder
        dec = decoder_from_config(d, (64,), 8, jnp.float32)
        params = nn.unbox(jax.jit(dec.init)(jax.random.key(0), jnp.zeros((1, 64, config.model.dim))))
        conv = np.asarray(params["params"]["conv_0"]["kernel"])
        bias = np.asarray(params["params"]["conv_0"]["bias"])
        bound = 1 / np.sqrt(d.kernel * config.model.dim)
        if init == "normal":
            np.testing.assert_allclose(conv.std(), 0.02, rtol=0.05)
            assert not bias.any()
        else:
            assert 0.95 * bound < np.abs(conv).max() <= bound and np.abs(bias).max() > 0
    from d2v_jax.config import validate
    with pytest.raises(ConfigError, match="decoder.conv_init"):
        validate(load_config(f"experiments/{arg}", {"decoder.conv_init": "xavier"}))


def test_recipe_configs_select_the_official_inits():
    for arg in ("base_v1", "large_v1"):
        m = load_config(f"experiments/image.py:{arg}").model
        assert (m.patch_embed_init, m.init_std, m.init_truncation, m.init_depth_rescale,
                m.token_init_std) == ("linear", 0.02, 1.0, True, 0.02)
    m = load_config("experiments/image.py:base_v2").model
    assert (m.patch_embed_init, m.init_truncation, m.init_depth_rescale,
            m.token_init_std) == ("xavier", None, False, 1.0)
    base = load_config("experiments/image.py:base_v1").model
    large = load_config("experiments/image.py:large_v1").model
    # BEiT README pretraining commands
    assert (base.layer_scale_init, base.drop_path, base.attn_dropout) == (1e-4, 0.25, 0.05)
    assert (large.layer_scale_init, large.drop_path, large.attn_dropout) == (1e-5, 0.2, 0.15)


# --- the 2.0 decoder (fairseq Decoder1d, text: base_text_only_task.yaml) ----------------

@pytest.mark.slow  # compiles blocks with dropout (~10 s of CPU)
def test_text_decoder_has_no_residual_and_a_two_layer_projection():
    t, cin, dim, k = 7, 6, 6, 3
    dec = ConvDecoder((t,), dim, out_dim=5, kernel_size=k, layers=2, groups=1, residual=False,
                      projection_layers=2, projection_ratio=2.0, conv_impl="xla")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, t, cin))
    params = randomize(nn.unbox(jax.jit(dec.init)(jax.random.PRNGKey(1), x)["params"]))
    assert params["proj_0"]["kernel"].shape == (dim, 2 * dim)
    assert params["proj"]["kernel"].shape == (2 * dim, 5)
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def conv1d(h, w, b):  # torch Conv1d(padding=k//2), odd k: output length t
        hp = np.pad(h, ((0, 0), (k // 2, k // 2), (0, 0)))
        return np.stack([np.einsum("bkc,kco->bo", hp[:, i:i + k], w) for i in range(t)], 1) + b

    h = np.asarray(x, np.float64)
    for i in range(2):  # no residual, although the widths match
        h = np_gelu(np_ln(conv1d(h, P[f"conv_{i}"]["kernel"], P[f"conv_{i}"]["bias"]), eps=1e-5))
    h = np_gelu(h @ P["proj_0"]["kernel"] + P["proj_0"]["bias"])
    ref = h @ P["proj"]["kernel"] + P["proj"]["bias"]
    np.testing.assert_allclose(jax.jit(dec.apply)({"params": params}, x), ref, atol=1e-4)
