"""Shared fixtures. The plain functions and constants behind them are in
tests/helpers.py (importable from any test module); the torch-based conversion
helpers are in tests/convert_helpers.py.

Tests marked `slow` (subprocess runs of the CLI, the 8-device runs, the
notebook, and the longest in-process runs) are left out by
`python -m pytest -m "not slow" -q -n 2 tests`; the full suite runs them all.
"""

import os
import tempfile

# A persistent XLA compilation cache shared by the tests of one pytest worker and
# the CLI subprocesses they start: many tests compile the same tiny train step,
# and a cache hit skips XLA's compile (tracing still runs, so a test still checks
# its own program). Keys hold the whole HLO, the compile options and the jax
# version, so an entry never stands for other code. One folder per xdist worker
# (no two processes write one folder at once); it is kept between runs, which
# makes the developer loop faster. D2V_TEST_XLA_CACHE=off turns it off (it must
# be set before jax is imported, hence here, above `import helpers`).
if os.environ.get("D2V_TEST_XLA_CACHE", "on") != "off":
    _worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"d2v_jax-test-xla-cache-{os.getuid()}", _worker))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# LLVM at -O0 for the tests: it halves XLA's CPU compile time of a tiny train step
# (measured 17-20 s -> 8-10 s), and the tiny models run no slower. Every comparison
# in the suite is between programs compiled with the same flags, or against numpy
# with a tolerance. Subprocesses get it through helpers.xla_env.
_O0 = "--xla_backend_optimization_level=0"
if _O0 not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_O0}".strip()

import pytest  # noqa: E402

import helpers  # noqa: E402


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
