"""The online probe (d2v_jax/probe.py): its kNN and ridge probes against
scikit-learn, its schedule, its config errors and its place in the train loop."""

import os

import numpy as np
import pytest
from sklearn.linear_model import Ridge, RidgeClassifier
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

from d2v_jax import probe
from d2v_jax.config import load_config, validate
from d2v_jax.errors import ConfigError

from helpers import IMAGE, TEXT


def _blobs(rng, n, d, classes):
    centres = rng.normal(size=(classes, d)) * 2
    y = rng.integers(0, classes, n)
    return centres[y] + rng.normal(size=(n, d)), y


def test_knn_classification_matches_sklearn_majority_vote():
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 300, 8, 2)
    # Two classes and an odd k: no ties, so the vote is the plain majority.
    ours = probe.knn_predict(x[:200], y[:200], x[200:], 7, classify=True, num_classes=2)
    ref = KNeighborsClassifier(7, metric="cosine", algorithm="brute").fit(x[:200], y[:200])
    np.testing.assert_array_equal(ours, ref.predict(x[200:]))


def test_knn_tie_goes_to_the_nearer_neighbour():
    train_x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    train_y = np.array([2, 0, 0, 2])
    # Query along (1, 0.1): nearest (1,0) label 2, then (1,1) label 0, then (0,1)
    # label 0, then (-1,0) label 2: k=4 ties 2 votes to 2; the nearest wins.
    pred = probe.knn_predict(train_x, train_y, np.array([[1.0, 0.1]]), 4, classify=True,
                             num_classes=3)
    assert pred.tolist() == [2]
    pred = probe.knn_predict(train_x, train_y, np.array([[1.0, 0.1]]), 3, classify=True,
                             num_classes=3)
    assert pred.tolist() == [0]  # 2 votes for 0 of 3


def test_knn_regression_matches_sklearn():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 5))
    y = x @ rng.normal(size=5)
    ours = probe.knn_predict(x[:100], y[:100], x[100:], 10, classify=False)
    ref = KNeighborsRegressor(10, metric="cosine", algorithm="brute").fit(x[:100], y[:100])
    np.testing.assert_allclose(ours, ref.predict(x[100:]), rtol=1e-10)


@pytest.mark.parametrize("n", [80, 6])  # primal (d <= n) and dual (d > n) solves
def test_ridge_matches_sklearn_on_standardized_features(n):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n + 30, 10)) * rng.uniform(0.1, 5, size=10) + 3
    y = x @ rng.normal(size=10) + rng.normal(size=n + 30)
    lam = 0.05
    ours = probe.ridge_predict(x[:n], y[:n], x[n:], lam, classify=False)
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
    ref = Ridge(alpha=lam * n).fit((x[:n] - mu) / sd, y[:n]).predict((x[n:] - mu) / sd)
    np.testing.assert_allclose(ours, ref, rtol=1e-7, atol=1e-8)


def test_ridge_classification_matches_sklearn_ridge_classifier():
    rng = np.random.default_rng(3)
    x, y = _blobs(rng, 260, 6, 4)
    ours = probe.ridge_predict(x[:200], y[:200], x[200:], 0.01, classify=True, num_classes=4)
    mu, sd = x[:200].mean(0), x[:200].std(0) + 1e-6
    # RidgeClassifier fits {-1, 1} codes: an affine map of one-hot targets, same argmax.
    ref = RidgeClassifier(alpha=0.01 * 200).fit((x[:200] - mu) / sd, y[:200])
    np.testing.assert_array_equal(ours, ref.predict((x[200:] - mu) / sd))


def test_score_is_accuracy_or_rmse():
    assert probe.score(np.array([1, 2, 3]), np.array([1, 0, 3]), True) == pytest.approx(2 / 3)
    assert probe.score(np.array([1.0, 3.0]), np.array([0.0, 0.0]), False) == pytest.approx(5 ** 0.5)


def _config(spec, **overrides):
    return load_config(spec, overrides)


def test_schedule_every_n_and_at_the_end_of_long_runs():
    config = _config(f"{IMAGE}:tiny_v2", **{"probe.every": 3})
    assert [d for d in range(1, 11) if probe.due(config, d, 10)] == [3, 6, 9, 10]
    # A run shorter than one period (a smoke run) is not probed at its end.
    assert not probe.due(config, 2, 2)
    off = _config(f"{IMAGE}:tiny_v2", **{"probe.every": 0})
    assert not any(probe.due(off, d, 10) for d in range(1, 11))


def test_probe_config_errors_name_the_field():
    config = _config(f"{IMAGE}:tiny_v2", **{"probe.kinds": ("knn", "svm")})
    with pytest.raises(ConfigError, match=r"probe\.kinds"):
        validate(config)
    # A text task on an image run: refused when the probe is built, naming probe.task.
    config = _config(f"{IMAGE}:tiny_v2", **{"probe.task": "experiments/finetune.py:stdlib_docs"})
    with pytest.raises(ConfigError, match=r"probe\.task=.*'text' task; this run pretrains an? 'image'"):
        probe.OnlineProbe(config)


def test_tiny_experiments_probe_their_packaged_task():
    for spec, task in ((f"{IMAGE}:tiny_v2", "mnist_5k"), (f"{TEXT}:tiny_v2", "stdlib_docs"),
                       ("experiments/molecules.py:tiny_v2", "solubility"),
                       ("experiments/molecules.py:tiny_v2_protein", "amp"),
                       ("experiments/audio.py:tiny_v2", "espeak_words")):
        config = _config(spec)
        assert config.probe.task.endswith(f"finetune.py:{task}") and config.probe.every > 0
        assert os.path.isfile(config.probe.task.split(":")[0])  # absolute: any working dir


# The probe inside the train loop (logged steps, equal to the offline probe of the
# checkpoint): tests/test_train_e2e.py::test_train_writes_metrics_plot_checkpoints_and_resumes.
