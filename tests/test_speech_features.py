"""benchmarks/speech_features.py: the frame statistics it reports, on frames
whose variance and rank are known by construction."""

import importlib.util
import os
import sys

import numpy as np
import pytest
from helpers import ROOT


@pytest.fixture(scope="module")
def speech_features():
    spec = importlib.util.spec_from_file_location(
        "speech_features_under_test", os.path.join(ROOT, "benchmarks", "speech_features.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_frame_stats_of_known_frames(speech_features):
    stats = speech_features.frame_stats
    const = np.tile(np.array([0.5, -2.0, 1.0]), (50, 1))  # the same frame 50 times
    s = stats(const)
    assert s["within_var"] == 0.0 and s["mean_abs"] == pytest.approx(3.5 / 3)
    t = np.linspace(-1, 1, 40)
    s = stats(np.outer(t, [1.0, 2.0, -1.0]) + 3.0)  # rank 1 after centring
    assert s["eff_rank"] == pytest.approx(1.0, abs=1e-6)
    assert s["within_var"] == pytest.approx(t.var() * (1 + 4 + 1) / 3)
    # k orthogonal directions of equal energy: effective rank k.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 64)))
    frames = np.repeat(np.eye(64)[:5], 2, axis=0) * np.array([[1.0], [-1.0]] * 5)  # [10, 64]
    assert stats(frames @ q)["eff_rank"] == pytest.approx(5.0, rel=1e-6)


def test_oracle_ridge_r2_on_known_relations():
    spec = importlib.util.spec_from_file_location(
        "speech_target_oracle_under_test",
        os.path.join(ROOT, "benchmarks", "speech_target_oracle.py"))
    oracle = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = oracle
    spec.loader.exec_module(oracle)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 6))
    w = rng.normal(size=(6, 3))
    assert oracle.ridge_r2(x, x @ w + 5.0, 1e-6) == pytest.approx(1.0, abs=1e-6)
    # Half the variance explained: y = signal + noise of equal variance.
    signal = x @ np.array([[1.0], [0.0], [0.0], [0.0], [0.0], [0.0]])
    y = signal + rng.normal(size=(2000, 1))
    assert oracle.ridge_r2(x, y, 1.0) == pytest.approx(0.5, abs=0.06)
    assert abs(oracle.ridge_r2(x, rng.normal(size=(2000, 2)), 1.0)) < 0.02
