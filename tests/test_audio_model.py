"""Speech model: conv frame arithmetic, padding invariance, loss mask, ALiBi, pos conv."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from d2v_jax import modalities
from d2v_jax.modalities.audio import masking
from d2v_jax.losses import regression_loss
from d2v_jax.models import layers
from d2v_jax.config import load_config
from d2v_jax.modalities.audio import model as AM
from d2v_jax.models.attention import alibi_bias, alibi_slopes
from d2v_jax.targets import make_targets
from d2v_jax.train_state import teacher_params

from helpers import init_state

SMALL = {"model.conv_dims": (8,) * 7, "model.dim": 32, "model.depth": 2, "model.num_heads": 4,
         "model.pos_conv_groups": 2, "decoder.dim": 16, "decoder.groups": 2, "decoder.layers": 1,
         "target.top_k": 2, "data.max_sample_size": 4000, "data.buckets": (4000,),
         "data.min_sample_size": 1000, "data.batch_size": 2, "masking.num_clones": 2}


def _config(arg="tiny_v2", **over):
    return load_config(f"experiments/audio.py:{arg}", dict(SMALL, **over))


def _reference_frames(n, kernels, strides):
    for k, s in zip(kernels, strides):
        n = 0 if n < k else (n - k) // s + 1
    return n


@pytest.mark.parametrize("n", [400, 401, 719, 720, 1000, 16000, 16319, 16320])
def test_frame_count_matches_conv_output(n):
    config = _config()
    m = config.model
    want = _reference_frames(n, m.conv_kernels, m.conv_strides)
    assert AM.frame_count(n, m.conv_kernels, m.conv_strides) == want
    fe = AM.feature_extractor(m)
    shape = jax.eval_shape(lambda x: fe.init_with_output(jax.random.PRNGKey(0), x)[0],
                           jnp.zeros((1, n)))
    assert shape.shape == (1, want, m.dim)
    assert AM.frame_count(16000, m.conv_kernels, m.conv_strides) == 49  # 20 ms frames


def _batch(config, rng, lengths, size, noise_in_padding=0.0):
    b = len(lengths)
    audio = rng.standard_normal((b, size)).astype(np.float32)
    pad = np.arange(size)[None] >= np.asarray(lengths)[:, None]
    audio = np.where(pad, noise_in_padding * rng.standard_normal((b, size)), audio).astype(np.float32)
    t = AM.config_frame_count(config, size)
    masks = np.stack([masking.sequence_masks(np.random.default_rng(i), t,
                                             AM.config_frame_count(config, n), config.masking)
                      for i, n in enumerate(lengths)])
    return {"audio": audio, "padding_mask": pad, "mask": masks}


@pytest.mark.slow  # three encoders compiled for two shapes
def test_pos_conv_zero_pad_modes():
    """`model.pos_conv_zero_pad`, on a clip cut to 2,600 of 4,000 samples:
    'layer' (pretraining's default) encodes it exactly as the clip alone and
    ignores what the padding holds; 'input' (wav2vec 2.0 / data2vec 1.0)
    ignores the padding's content, but its convs carry values into the padded
    frames after their first layer, so the frames near the end differ from
    the clip alone; 'none' (fairseq data2vec 2.0) lets the padded frames'
    features into the convs: the padding's content reaches the real frames."""
    rng = np.random.default_rng(5)
    config = _config()
    n = AM.config_frame_count(config, 2600)
    zeros = _batch(config, rng, [2600, 4000], 4000)
    noisy = dict(zeros, audio=np.where(zeros["padding_mask"], 3 * rng.standard_normal(
        zeros["audio"].shape), zeros["audio"]).astype(np.float32))
    alone = {"audio": zeros["audio"][:1, :2600], "padding_mask": zeros["padding_mask"][:1, :2600]}
    params = init_state(config, jax.random.PRNGKey(0)).params
    used = {k: params[k] for k in ("frontend", "context", "encoder")}
    diffs = {}
    for mode in ("layer", "input", "none"):
        c = _config(**{"model.pos_conv_zero_pad": mode})
        model = modalities.build_model(c)
        enc = jax.jit(lambda p, b: model.apply({"params": p}, b, method="encode"))
        a, z, o = (np.asarray(enc(used, b))[0, :n] for b in (alone, zeros, noisy))
        diffs[mode] = (np.abs(z - a).max(), np.abs(o - z).max())
    assert diffs["layer"][0] < 1e-5 and diffs["layer"][1] < 1e-5, diffs
    assert diffs["input"][0] > 1e-3 and diffs["input"][1] < 1e-5, diffs
    assert diffs["none"][0] > 1e-3 and diffs["none"][1] > 1e-3, diffs
    with pytest.raises(Exception, match="pos_conv_zero_pad"):
        from d2v_jax.config import validate
        validate(_config(**{"model.pos_conv_zero_pad": "zero"}))


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["tiny_v2", "tiny_v1"])
def test_padding_changes_nothing(arg):
    """Padded samples never reach targets, instance-norm statistics or the loss;
    a padded example's teacher output equals the unpadded example's."""
    config = _config(arg, **({"masking.num_clones": 1} if arg == "tiny_v1" else {}))
    model = modalities.build_model(config)
    state = init_state(config, jax.random.PRNGKey(0))
    tparams = teacher_params(state.params, state.ema_params, config)
    rng = np.random.default_rng(0)
    lengths = [2600, 4000]
    clean = _batch(config, rng, lengths, 4000)
    noisy = dict(clean, audio=np.where(clean["padding_mask"],
                                       rng.standard_normal(clean["audio"].shape) * 3,
                                       clean["audio"]).astype(np.float32))
    # One compiled teacher and one compiled student; the targets and the loss
    # are the train step's own functions on their outputs.
    teacher = jax.jit(lambda p, b: model.apply({"params": p}, b, method="teacher"))
    t = config.target

    def targets(out, top_k=t.top_k):
        return np.asarray(make_targets(out["layers"], top_k=top_k, layer_norm=t.layer_norm,
                                       final_norm=t.final_norm, padding_mask=out["padding_mask"]))

    out1, out2 = teacher(tparams, clean), teacher(tparams, noisy)
    y1, y2, pad = targets(out1), targets(out2), np.asarray(out1["padding_mask"])
    n0 = AM.config_frame_count(config, 2600)
    assert pad.shape == y1.shape[:2] and pad[0].sum() == y1.shape[1] - n0 and not pad[1].any()
    np.testing.assert_allclose(y1, y2, atol=1e-5)
    assert (y1[0, n0:] == 0).all()
    # instance norm per layer over the n0 real frames only: with top_k=1 and no
    # final norm, the target is the last block's FFN output normalized per
    # channel over those frames (numpy reference).
    last = np.asarray(out1["layers"][-1][0, :n0], np.float64)
    ref = (last - last.mean(0)) / np.sqrt(last.var(0) + 1e-5)
    np.testing.assert_allclose(targets(out1, top_k=1)[0, :n0], ref, atol=1e-4)
    # the unpadded example alone gives the same targets on its real frames
    alone = {"audio": clean["audio"][:1, :2600], "padding_mask": clean["padding_mask"][:1, :2600],
             "mask": clean["mask"][:1, :, :n0]}
    np.testing.assert_allclose(targets(teacher(tparams, alone))[0], y1[0, :n0], atol=1e-4)
    # student: the same predictions wherever the loss looks, the same loss, and
    # the loss looks only at masked real frames
    key = jax.random.PRNGKey(3)
    student = jax.jit(lambda p, b: model.apply({"params": p}, b, method="student",
                                               rngs={"dropout": key, "noise": key}))
    s1, s2 = student(state.params, clean), student(state.params, noisy)
    m = config.masking.num_clones
    frame_pad = np.repeat(pad, m, axis=0)
    want = clean["mask"].reshape(-1, clean["mask"].shape[-1]) & ~frame_pad
    np.testing.assert_array_equal(s1["loss_mask"], want)
    np.testing.assert_array_equal(s2["loss_mask"], want)
    assert s1["pred"].shape == (2 * m, y1.shape[1], config.model.dim)
    np.testing.assert_allclose(np.asarray(s1["pred"])[want], np.asarray(s2["pred"])[want],
                               atol=1e-5)
    y_rep = np.repeat(y1, m, axis=0)
    l1 = regression_loss(s1["pred"], y_rep, s1["loss_mask"])
    l2 = regression_loss(s2["pred"], np.repeat(y2, m, axis=0), s2["loss_mask"])
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    terms = ((np.asarray(s1["pred"]) - y_rep) ** 2).sum(-1) / np.sqrt(config.model.dim)
    np.testing.assert_allclose(l1, terms[want].mean(), rtol=1e-5)


@pytest.mark.slow
def test_v2_student_keeps_static_visible_count():
    config = _config()
    model = modalities.build_model(config)
    params = init_state(config, jax.random.PRNGKey(0)).params
    batch = _batch(config, np.random.default_rng(1), [1500, 4000], 4000)
    t = batch["mask"].shape[-1]
    # the encoder sees exactly t - int(0.5 t) frames per row, even in the padded row
    seen = []
    orig = layers.Encoder.__call__

    def spy(self, x, *a, **k):
        seen.append(x.shape)
        return orig(self, x, *a, **k)

    layers.Encoder.__call__ = spy
    try:
        # tracing is enough: the shapes are static
        jax.eval_shape(lambda p, b: model.apply({"params": p}, b, method="student",
                                                deterministic=True,
                                                rngs={"noise": jax.random.PRNGKey(0)}),
                       params, batch)
    finally:
        layers.Encoder.__call__ = orig
    assert seen == [(4, t - int(0.5 * t), config.model.dim)]


def test_alibi_slopes_and_masked_bias():
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-6)
    np.testing.assert_allclose(alibi_slopes(4), 2.0 ** (-2.0 * np.arange(1, 5)), rtol=1e-6)
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads
    np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rtol=1e-6)
    slopes = alibi_slopes(4)
    full = np.asarray(alibi_bias(jnp.arange(10)[None], jnp.asarray(slopes)))[0]
    want = -slopes[:, None, None] * np.abs(np.arange(10)[:, None] - np.arange(10)[None])
    np.testing.assert_allclose(full, want)
    keep = np.array([[0, 3, 4, 8]])
    sub = np.asarray(alibi_bias(jnp.asarray(keep), jnp.asarray(slopes)))[0]
    np.testing.assert_allclose(sub, full[:, keep[0]][:, :, keep[0]])  # fairseq masked_alibi


def test_single_pos_conv_torch_padding():
    """wav2vec 2.0's even-kernel positional conv: torch pads k/2 both sides and
    SamePad drops the last frame; checked against a numpy convolution."""
    k, dim, t = 4, 6, 9
    conv = AM.WeightNormConv(dim, k, groups=1)
    x = np.random.default_rng(0).standard_normal((1, t, dim)).astype(np.float32)
    params = flax.linen.unbox(conv.init(jax.random.PRNGKey(0), jnp.asarray(x)))
    got = np.asarray(conv.apply(params, jnp.asarray(x)))
    p = params["params"]
    v = np.asarray(p["v"])
    w = v * (np.asarray(p["g"]) / np.sqrt((v ** 2).sum(axis=(1, 2))))[:, None, None]
    xp = np.pad(x[0], ((k // 2, k // 2), (0, 0)))
    ref = np.stack([sum(xp[i + j] @ w[j] for j in range(k)) for i in range(t + 1)])[:-1]
    np.testing.assert_allclose(got[0], ref + np.asarray(p["bias"]), atol=1e-5)
    # weight norm: g starts at |v| per tap, so the effective kernel starts as v
    np.testing.assert_allclose(w, v, rtol=1e-5)


@pytest.mark.slow  # a short train run
def test_train_e2e_on_audio_folder(tmp_path):
    """A few real train steps on a folder of FLAC/WAV files (22.05 kHz ones are
    resampled), through the CLI's train_and_evaluate."""
    from d2v_jax import train

    rng = np.random.default_rng(0)
    for i in range(6):
        rate = 22050 if i % 2 else 16000
        n = int(rng.integers(2000, 5000)) * rate // 16000
        t = np.arange(n) / rate
        x = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(n)
        sf.write(str(tmp_path / f"u{i}.{'flac' if i % 3 == 0 else 'wav'}"), x, rate)
    config = _config(**{"data.source": "audio_folder", "data.path": str(tmp_path),
                        "train.num_steps": 3, "train.log_every": 1, "collapse.after_step": 100})
    train.train_and_evaluate(config, str(tmp_path / "run"))
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["target_var"] > 0 for r in rows)
    assert 0.3 < rows[-1]["masked_frac"] <= 0.5  # half of the real frames, none of the padding


def _param_tree(config, fill):
    """Parameter-shaped numpy arrays filled with `fill` (no init compile)."""
    import flax.linen as nn
    from d2v_jax.train_state import init_params
    shapes = jax.eval_shape(lambda r: nn.unbox(init_params(config, r)), jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: np.full(s.shape, fill, np.float32), shapes)


@pytest.mark.parametrize("arg", ["tiny_v1", "tiny_v2"])
def test_ema_scope_follows_fairseq(arg):
    """SPEC 4. 1.0 (ema_layers_only): the conv features, projection and conv
    positional encoder are the student's; only the blocks and the encoder
    LayerNorm are EMA. 2.0 (ema_local_encoder false): the local encoder is the
    student's, positional convs, LayerNorm, ALiBi scale and blocks are EMA."""
    from flax import traverse_util
    from d2v_jax.train_state import ema_subtree
    config = _config(arg)
    student = _param_tree(config, 1.0)
    ema = ema_subtree(_param_tree(config, 2.0), config)
    paths = {"/".join(p) for p in traverse_util.flatten_dict(ema)}
    assert not any(p.startswith("frontend") for p in paths)
    assert any(p.startswith("encoder/blocks/") for p in paths)
    assert "context/emb_norm/scale" in paths
    pos = {p for p in paths if p.startswith("context/pos_conv_")}
    assert (len(pos) == 0) if arg == "tiny_v1" else (len(pos) == 2 * config.model.pos_conv_depth)
    if arg == "tiny_v2":
        assert "context/alibi_scale" in paths
    teacher = traverse_util.flatten_dict(teacher_params(student, ema, config))
    for path, leaf in teacher.items():  # EMA values where EMA, the student's elsewhere
        want = 2.0 if "/".join(path) in paths else 1.0
        assert float(np.asarray(leaf).flat[0]) == want, path
    assert {p[0] for p in teacher} == set(AM.TEACHER_MODULES)


def test_ema_scope_typo_is_an_error():
    from d2v_jax.train_state import ema_subtree
    config = _config("tiny_v1", **{"ema.shared": ("frontend", "context/pos_cnv*")})
    with pytest.raises(ValueError, match=r"ema.shared=.*\['context/pos_cnv\*'\] match no parameter"):
        ema_subtree(_param_tree(config, 0.0), config)


def test_features_entry_point_is_the_frontend_with_padding_zeroed():
    """`method="features"` (what the speech diagnostics read) is the conv
    front-end's output of the whole clip, with the frames that the sample
    padding mask makes padded set to 0 and the others untouched."""
    config = _config()
    model = modalities.build_model(config)
    batch = _batch(config, np.random.default_rng(1), [2600, 4000], 4000)
    # The front-end's own parameters are all that `features` reads.
    # Jitted: op by op, every conv layer would compile on its own (seconds).
    frontend = AM.feature_extractor(config.model)
    audio = jnp.asarray(batch["audio"])
    params = jax.jit(frontend.init)(jax.random.PRNGKey(0), audio)["params"]
    got = np.asarray(jax.jit(lambda p, b: model.apply({"params": {"frontend": p}}, b,
                                                      method="features"))(params, batch))
    raw = np.asarray(jax.jit(frontend.apply)({"params": params}, audio))
    n0 = _reference_frames(2600, config.model.conv_kernels, config.model.conv_strides)
    assert got.shape == raw.shape == (2, AM.config_frame_count(config, 4000), config.model.dim)
    assert (got[0, n0:] == 0).all() and np.abs(raw[0, n0:]).sum() > 0
    np.testing.assert_allclose(got[0, :n0], raw[0, :n0], rtol=1e-6)
    np.testing.assert_allclose(got[1], raw[1], rtol=1e-6)
