"""cuDNN flash attention (docs/performance.md "cuDNN attention"):
`model.attention_impl` resolution, the padded/length-masked path cuDNN gets
(equal to the plain masked attention), and a CPU check that every experiment
family's attention calls pass jax's own cuDNN shape/dtype/layout checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import AUDIO, IMAGE, MOLECULES, TEXT
from jax._src.cudnn import fused_attention_stablehlo as fused

from d2v_jax import modalities
from d2v_jax.config import load_config, validate
from d2v_jax.models.attention import padded_attention, resolve_attention_impl
from d2v_jax.train_state import create_train_state
from d2v_jax.train_step import make_train_step_fn

# ----------------------------------------------------------------------------- resolution


def test_auto_picks_cudnn_only_where_it_can_run():
    bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
    assert resolve_attention_impl("auto", bf16, 64, "cuda") == "cudnn"
    assert resolve_attention_impl(None, f16, 128, "cuda") == "cudnn"  # configs saved before "auto"
    assert resolve_attention_impl("auto", f32, 64, "cuda") == "xla"  # cuDNN: bf16/fp16 only
    assert resolve_attention_impl("auto", bf16, 36, "cuda") == "xla"  # head dim % 8
    assert resolve_attention_impl("auto", bf16, 256, "cuda") == "xla"  # > 128 (pre-Hopper bound)
    for backend in ("cpu", "tpu", "rocm"):
        assert resolve_attention_impl("auto", bf16, 64, backend) == "xla", backend
    assert resolve_attention_impl("auto", bf16, 64) == "xla"  # this test runs on CPU
    for name in ("xla", "cudnn"):  # explicit choices are taken as given
        assert resolve_attention_impl(name, f32, 36, "cpu") == name
    with pytest.raises(ValueError, match="model.attention_impl='flash'"):
        resolve_attention_impl("flash", bf16, 64)
    config = load_config(f"{IMAGE}:tiny_v2", {"model.attention_impl": "flash"})
    with pytest.raises(ValueError, match="model.attention_impl"):
        validate(config)


@pytest.mark.parametrize("path,arg", [(IMAGE, "base_v1"), (IMAGE, "base_v2"), (AUDIO, "base_v1"),
                                      (AUDIO, "base_v2"), (TEXT, "base_v2"), (MOLECULES, "tiny_v2"),
                                      (IMAGE, "tiny_v2")])
def test_every_experiment_defaults_to_auto(path, arg):
    assert load_config(f"{path}:{arg}").model.attention_impl == "auto"


# ----------------------------------------------------------------------------- padded path numerics


def _numpy_attention(q, k, v, bias, key_padding_mask):
    """softmax(q k^T / sqrt(hd) + bias, padded keys excluded) v, in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if key_padding_mask is not None:
        logits = np.where(key_padding_mask[:, None, None, :], -np.inf, logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


CASES = {
    # image 1.0: 197 tokens (odd), one relative-position bias for the batch
    "rel_pos_odd": {"t": 197, "bias": (1, 2), "lengths": None},
    # audio 2.0: an odd bucket, a per-row ALiBi bias and right padding
    "alibi_odd_padded": {"t": 187, "bias": (3, 2), "lengths": (187, 150, 9)},
    # text: right padding only, even length (no sequence padding needed)
    "padding_only": {"t": 24, "bias": None, "lengths": (24, 17, 1)},
    # odd length, neither (a 2.0 student's visible tokens): padded, length-masked
    "plain_odd": {"t": 9, "bias": None, "lengths": None},
}


def _inputs(t, bias, lengths, b=3, h=2, hd=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32) for _ in range(3))
    bias = None if bias is None else jnp.asarray(rng.normal(size=bias + (t, t)), jnp.float32)
    kpm = None if lengths is None else jnp.asarray(np.arange(t)[None] >= np.array(lengths)[:, None])
    return q, k, v, bias, kpm


@pytest.mark.parametrize("case", sorted(CASES))
def test_padded_path_equals_plain_attention(case):
    """The cuDNN-shaped path (sequence padded to even, right padding as
    key_value_seq_lengths), run on XLA: the same output as the plain masked
    attention and a numpy reference, and the same gradients w.r.t. q, k, v and
    the bias (the padded rows and columns carry none back)."""
    q, k, v, bias, kpm = _inputs(**CASES[case])
    mask = None if kpm is None else ~kpm[:, None, None, :]

    def plain(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla")

    def padded(q, k, v, bias):
        return padded_attention(q, k, v, bias, kpm, "xla")

    out = jax.jit(padded)(q, k, v, bias)  # jitted: one compilation, not one per op
    assert out.shape == q.shape
    ref = _numpy_attention(q, k, v, bias, None if kpm is None else np.asarray(kpm))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out, jax.jit(plain)(q, k, v, bias), rtol=0, atol=1e-5)

    cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=argnums))(
        q, k, v, bias) for f in (padded, plain)]
    for name, a, b in zip("qkvb", *grads):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)


def test_padded_path_shapes_cudnn_gets():
    """What reaches jax.nn.dot_product_attention: even lengths, a full
    [*, *, T, S] bias, key lengths instead of a mask."""
    seen = []

    def spy(q, k, v, bias=None, mask=None, *, key_value_seq_lengths=None, implementation=None):
        seen.append((q.shape, None if bias is None else bias.shape, mask,
                     None if key_value_seq_lengths is None else np.asarray(key_value_seq_lengths)))
        return q

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax.nn, "dot_product_attention", spy)
        for case in ("rel_pos_odd", "alibi_odd_padded", "padding_only", "plain_odd"):
            out = padded_attention(*_inputs(**CASES[case]), "cudnn")
            assert out.shape[1] == CASES[case]["t"]
    assert seen[0][:3] == ((3, 198, 2, 8), (1, 2, 198, 198), None)
    np.testing.assert_array_equal(seen[0][3], [197] * 3)  # the padded key excluded
    assert seen[1][:3] == ((3, 188, 2, 8), (3, 2, 188, 188), None)
    np.testing.assert_array_equal(seen[1][3], [187, 150, 9])
    assert seen[2][:3] == ((3, 24, 2, 8), None, None)
    np.testing.assert_array_equal(seen[2][3], [24, 17, 1])
    assert seen[3][:3] == ((3, 10, 2, 8), None, None)  # odd: padded even without a bias
    np.testing.assert_array_equal(seen[3][3], [9] * 3)


def test_students_visible_padding_stays_right_padding():
    """cuDNN gets key padding as lengths, which is right only for right padding.
    The data pads at the end (text: tokens then PAD; audio: frames >= n), and
    the 2.0 students gather their visible tokens in increasing position order,
    so the gathered padding is right padding again. Text's and audio's sort
    keys, random rows (numpy), the model's own selection functions."""
    from d2v_jax.models import visible

    rng = np.random.default_rng(0)
    r, t, k = 64, 20, 8
    n = rng.integers(k, t + 1, size=r)  # real tokens / frames per row
    padding = np.arange(t)[None] >= n[:, None]
    masked = (rng.random((r, t)) < 0.5) & ~padding
    # text: visible 0, padding 1, masked 2 (TextModel._student_v2)
    text_keys = np.where(masked, 2, np.where(padding, 1, 0))
    # audio: masked or enough padded frames to make every row drop t - k (AudioModel._student_v2)
    extra = (t - k) - masked.sum(1, keepdims=True)
    audio_keys = masked | (padding & (np.cumsum(padding, 1) - 1 < extra))
    for keys in (text_keys, audio_keys):
        keep, _ = visible.split_indices(jnp.asarray(keys), k)
        kpm = np.asarray(visible.gather(jnp.asarray(padding), keep))
        lengths = (~kpm).sum(1)
        np.testing.assert_array_equal(kpm, np.arange(k)[None] >= lengths[:, None])
        assert kpm.any() and (lengths > 0).all()  # some kept rows do carry padding


# ----------------------------------------------------------------------------- every experiment vs jax's cuDNN checks

# Base-config sequence lengths and head dim (64), one narrow block, batch 2. The
# attention dropout is set to 0 so that the students' training forward takes the
# fused kernel too (with dropout > 0 it spells the softmax out, and only the
# teacher / encode would reach cuDNN): the strictest case of each config.
SMALL = {"model.dim": 128, "model.num_heads": 2, "model.depth": 1, "model.attn_dropout": 0.0,
         "model.dtype": "bfloat16", "model.attention_impl": "cudnn", "target.top_k": 1}
DECODER = {"decoder.dim": 32, "decoder.layers": 1}
# 59,920 samples -> 187 conv frames: an odd bucket (the base 320,000 -> 999 is odd too).
AUDIO_SMALL = {"model.conv_dims": (32,) * 7, "model.pos_conv_width": 16, "model.pos_conv_groups": 2,
               "model.pos_conv_depth": 1,
               "data.max_sample_size": 59_920, "data.min_sample_size": 16_000,
               "data.buckets": (59_920,)}
FAMILIES = {
    "image_v1": (IMAGE, "base_v1", {}),
    "image_v2": (IMAGE, "base_v2", DECODER),
    "audio_v1": (AUDIO, "base_v1", AUDIO_SMALL),
    "audio_v2": (AUDIO, "base_v2", {**AUDIO_SMALL, **DECODER, "decoder.groups": 2}),
    "text_v1": (TEXT, "base_v1", {"data.max_len": 128, "model.max_positions": 128}),
    "text_v2": (TEXT, "base_v2", {**DECODER, "data.max_len": 128, "model.max_positions": 128}),
    "molecules_v2": (MOLECULES, "base_v2", {**DECODER, "data.max_len": 96,
                                            "model.max_positions": 96}),
}


def _cudnn_calls(path, arg, overrides, monkeypatch):
    """Traces (jax.eval_shape, never compiles) the train step with
    attention_impl=cudnn through jax's real cuDNN entry point. jax refuses cuDNN
    on CPU only in `check_cudnn_version`; with that answering a version, its
    `check_layout` (every call) and `check_is_flash_attention` (in the custom
    VJP's forward rules, is_training=True under the step's grad) run on the
    exact shapes our models produce. Returns the flash checks' arguments."""
    config = load_config(f"{path}:{arg}", {**SMALL, **overrides})
    if "vocab_size" in config.model and config.model.vocab_size is None:
        config.model.vocab_size = 300  # the tokenizer sets it in a real run
    checks = []
    real_check = fused.check_is_flash_attention

    def check(query, key, value, layout, cudnn_version, has_bias, is_training, *a, **kw):
        checks.append((query.shape, has_bias, is_training))
        return real_check(query, key, value, layout, cudnn_version, has_bias, is_training,
                          *a, **kw)

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_is_flash_attention", check)
    state = jax.eval_shape(lambda r: create_train_state(config, r), jax.random.key(0))
    batch = modalities.dummy_batch(config, 2)
    jax.eval_shape(make_train_step_fn(config), state, batch, jax.random.key(1))
    return checks


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_experiment_passes_jax_cudnn_checks(family, monkeypatch):
    """Would fail (jax's NotImplementedError / ValueError) for a config cuDNN
    rejects: odd lengths with a bias in training, a [B, 1, 1, S] mask-as-bias,
    an unsupported head dim or dtype."""
    checks = _cudnn_calls(*FAMILIES[family], monkeypatch)
    # The student's grad reaches the fused kernel's training rule.
    assert any(training for _, _, training in checks), checks
    for shape, _, _ in checks:
        assert shape[-1] == 64 and shape[1] % 2 == 0, shape


@pytest.mark.parametrize("remat,fwd_calls", [("none", 1), ("save_dots", 2), ("full", 2),
                                             ("save_bf16_dots", 1)])
def test_remat_with_cudnn_attention_recomputes_the_flash_forward_or_not(remat, fwd_calls,
                                                                      monkeypatch):
    """A remat policy saves by primitive: jax's checkpoint_dots does not know the
    fused attention, so the backward runs the flash forward again;
    save_bf16_dots keeps its output and statistics (one forward per block)."""
    import jax.extend

    from d2v_jax.models.attention import CUDNN_ATTENTION_FWD
    from d2v_jax.models.layers import Encoder

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    enc = Encoder(depth=2, dim=128, num_heads=2, remat=remat, dtype=jnp.bfloat16,
                  attention_impl="cudnn")
    x, bias = jnp.zeros((2, 17, 128), jnp.bfloat16), jnp.zeros((1, 2, 17, 17))
    params = jax.eval_shape(lambda: enc.init({"params": jax.random.key(0)}, x, bias,
                                             deterministic=True))["params"]

    def loss(p):
        return jnp.sum(enc.apply({"params": p}, x, bias, deterministic=True)[0]
                       .astype(jnp.float32))

    def count(jaxpr, name):
        return sum((e.primitive.name == name)
                   + sum(count(j, name) for j in jax.extend.core.jaxprs_in_params(e.params))
                   for e in jaxpr.eqns)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    assert count(jaxpr, CUDNN_ATTENTION_FWD) == fwd_calls
    assert count(jaxpr, "dot_product_attention_bwd_wrapper") == 1
