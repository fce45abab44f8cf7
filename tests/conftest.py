"""Shared fixtures. The plain functions and constants behind them are in
tests/helpers.py (importable from any test module); the torch-based conversion
helpers are in tests/convert_helpers.py.

Tests marked `slow` (subprocess runs of the CLI, the 8-device runs, the
notebook, and the longest in-process runs) are left out by
`python -m pytest -m "not slow" -q -n 2 tests`; the full suite runs them all.
"""

import pytest

import helpers


@pytest.fixture
def tiny_config():
    """helpers.tiny_config: `tiny_config("audio", "tiny_v1", **{"data.batch_size": 2})` is
    experiments/audio.py:tiny_v1 with helpers.TINY_AUDIO and the overrides on top
    (modalities: image, audio, text, molecules)."""
    return helpers.tiny_config


@pytest.fixture
def image_folder(tmp_path):
    """<tmp_path>/images: one class folder 'a' of 8 random 12x12 grayscale PNGs (a str)."""
    return helpers.make_image_folder(tmp_path / "images", n=8)


@pytest.fixture
def wav_class_folders(tmp_path):
    """(<tmp_path>/clips, {"<class>/<j>.wav": samples}): class folders go (5), stop (4)
    and yes (3) of 16 kHz noise clips of 1,500-6,000 samples."""
    root = tmp_path / "clips"
    return root, helpers.write_wav_class_folders(root)


@pytest.fixture
def text_corpus(tmp_path):
    """<tmp_path>/corpus.txt: helpers.WORDS's three sentences, one document per line (a str)."""
    return helpers.write_text_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def cli():
    """helpers.run_cli: `returncode, output = cli("train", "--config=...", env=None)` runs
    `python -m d2v_jax.train ...` from the repository root (output: stdout + stderr)."""
    return helpers.run_cli
