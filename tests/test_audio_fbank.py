"""model.frontend='fbank': the log-mel layer against a numpy computation written
from the textbook definitions, its frame arithmetic, and a train step through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax.config import load_config, validate
from d2v_jax.errors import ConfigError
from d2v_jax.modalities.audio import model as AM
from d2v_jax.modalities.audio.frames import config_frame_count

FBANK = {"model.frontend": "fbank", "model.conv_dims": (16, 32), "model.conv_kernels": (400, 2),
         "model.conv_strides": (160, 2), "model.dim": 32, "model.depth": 2, "model.num_heads": 4,
         "model.pos_conv_groups": 4, "decoder.dim": 16, "decoder.groups": 4,
         "target.top_k": 2}


def reference_log_mel(wav, num_mels, window, hop, rate):
    """Per frame: Hann window (periodic-free, N+2 points trimmed), |FFT|^2 on the
    next power of two, HTK-mel triangles from 0 Hz to Nyquist, log."""
    n_fft = 512 if window == 400 else int(2 ** np.ceil(np.log2(window)))
    hann = np.array([0.5 - 0.5 * np.cos(2 * np.pi * (i + 1) / (window + 1)) for i in range(window)])
    to_mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    to_hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    edges = [to_hz(m) for m in np.linspace(0, to_mel(rate / 2), num_mels + 2)]
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    out = []
    for start in range(0, len(wav) - window + 1, hop):
        spec = np.abs(np.fft.rfft(wav[start:start + window] * hann, n_fft)) ** 2
        bands = []
        for j in range(num_mels):
            lo, mid, hi = edges[j], edges[j + 1], edges[j + 2]
            w = [max(0.0, min((f - lo) / (mid - lo), (hi - f) / (hi - mid))) for f in freqs]
            bands.append(np.log(np.dot(w, spec) + 1e-6))
        out.append(bands)
    return np.array(out)


def test_log_mel_matches_the_definition_and_finds_a_tone():
    rate, n = 16000, 2000
    t = np.arange(n) / rate
    wav = (np.sin(2 * np.pi * 1000 * t) + 0.01 * np.random.default_rng(0).normal(size=n))
    got = np.asarray(AM.log_mel(jnp.asarray(wav[None], jnp.float32), 16, 400, 160, rate))[0]
    want = reference_log_mel(wav, 16, 400, 160, rate)
    assert got.shape == want.shape == ((n - 400) // 160 + 1, 16)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)
    # The loudest band is the one whose triangle peaks nearest 1 kHz.
    centres = [700 * (10 ** (m / 2595) - 1)
               for m in np.linspace(0, 2595 * np.log10(1 + 8000 / 700), 18)[1:-1]]
    assert (got.argmax(1) == np.argmin(np.abs(np.array(centres) - 1000))).all()


def test_fbank_frames_follow_the_conv_arithmetic_and_train():
    config = load_config("experiments/audio.py:tiny_v2", FBANK)
    for n in (400, 559, 560, 16000):
        want = ((n - 400) // 160 + 1 - 2) // 2 + 1
        assert config_frame_count(config, n) == max(want, 0)
    fe = AM.feature_extractor(config.model)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16000)), jnp.float32)
    variables = fe.init(jax.random.PRNGKey(0), x)
    y = fe.apply(variables, x)
    assert y.shape == (2, config_frame_count(config, 16000), 32)
    # Only the learned layers have parameters: no conv_0, a fbank_norm.
    names = set(variables["params"])
    assert "conv_0" not in names and {"fbank_norm", "conv_1", "proj"} <= names
    validate(config)
    with pytest.raises(ConfigError, match="model.frontend"):
        validate(load_config("experiments/audio.py:tiny_v2", {**FBANK, "model.frontend": "mel"}))


def test_logmel_recipe_is_64_mels_every_10_ms_and_20_ms_frames():
    config = load_config("experiments/audio.py:tiny_v2_logmel")
    validate(config)
    m = config.model
    assert m.frontend == "fbank" and m.conv_dims[0] == 64 and config.target.position_center
    # 25-ms windows every 10 ms at 16 kHz, then 2x: one frame per 20 ms, as the convs give.
    assert (m.conv_kernels[0], m.conv_strides[0]) == (400, 160)
    raw = load_config("experiments/audio.py:tiny_v2")
    for n in (16000, 32000):
        assert config_frame_count(config, n) == config_frame_count(raw, n) == n // 320 - 1
    # Everything but the front-end and the centring is tiny_v2's.
    assert config.model.dim == raw.model.dim and config.train.num_steps == raw.train.num_steps
    with pytest.raises(ValueError, match=r"<size>_<version>\[_logmel\]"):
        load_config("experiments/audio.py:tiny_v2_mel")
