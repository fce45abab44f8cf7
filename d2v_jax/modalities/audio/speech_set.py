r"""A small real speech set synthesized with Debian's `espeak-ng`.

    python -m d2v_jax.data.speech_set --out ~/.cache/d2v_jax/espeak_words

Spoken digits and command words by several espeak-ng voices, speeds and pitches,
resampled from espeak's 22.05 kHz to 16 kHz, 16-bit WAV. Layout under `out`:

    words/<word>/<voice>_s<speed>_p<pitch>.wav   one word per clip: folder per class,
                                                 ready for fine-tuning / probes
    phrases/<n>.wav                              3-5 random words in a row (pretraining)
    train.tsv, valid.tsv                         fairseq manifests of all clips; the
                                                 voice `valid_voice` is held out
    labels.txt                                   the class names, one per line

Nothing is downloaded: the audio comes from the espeak-ng program. The set is
written to a temporary folder and renamed into place, so a half-built set is
never used. `ensure_espeak_set` builds it on first use (the tiny configs).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import tempfile
from math import gcd

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb+f2", "en-us+m3")
SPEEDS = (130, 165, 200)  # words per minute
PITCHES = (35, 65)  # 0-99, espeak default 50
VALID_VOICE = "en-us+m3"
SAMPLE_RATE = 16_000
NUM_PHRASES = 360
VERSION = 1  # bump when the recipe changes, so caches are rebuilt


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError(
            "espeak-ng is not installed, so the speech set cannot be built. Install it "
            "(`apt-get install -y espeak-ng`) or point --config.data.path at your own "
            "fairseq manifest (train.tsv) or folder of audio files.")
    return exe


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (scipy `resample_poly`, Kaiser-windowed FIR) of a 1-D
    float waveform from `rate` to `target` Hz; the length becomes ceil(n*up/down)."""
    if rate == target:
        return audio
    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(audio, target // g, rate // g).astype(np.float32)


def synthesize(text: str, path: str, voice: str, speed: int, pitch: int) -> int:
    """Speaks `text` into a 16 kHz 16-bit WAV at `path`; returns its length in samples."""
    import soundfile as sf

    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run([_espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch),
                        "-w", tmp.name, text], check=True, capture_output=True)
        audio, rate = sf.read(tmp.name, dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    audio = resample(audio, rate)
    sf.write(path, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    return len(audio)


def _jobs(words, voices, speeds, pitches, num_phrases, seed):
    """(relative path, text, voice, speed, pitch) for every clip, in a fixed order."""
    jobs = []
    for word in words:
        for voice in voices:
            for speed in speeds:
                for pitch in pitches:
                    name = f"{voice.replace('+', '_')}_s{speed}_p{pitch}.wav"
                    jobs.append((os.path.join("words", word, name), word, voice, speed, pitch))
    rng = np.random.default_rng(seed)
    for n in range(num_phrases):
        text = " ".join(rng.choice(words, size=int(rng.integers(3, 6))))
        voice = voices[int(rng.integers(len(voices)))]
        speed, pitch = int(rng.choice(speeds)), int(rng.choice(pitches))
        jobs.append((os.path.join("phrases", f"{n:04d}.wav"), text, voice, speed, pitch))
    return jobs


def build_espeak_set(out: str, *, words=WORDS, voices=VOICES, speeds=SPEEDS, pitches=PITCHES,
                     num_phrases: int = NUM_PHRASES, valid_voice: str | None = VALID_VOICE,
                     seed: int = 0, num_threads: int = 4) -> str:
    """Builds the set into `out` (which must not exist yet); returns `out`."""
    if os.path.exists(out):
        raise FileExistsError(f"build_espeak_set: {out!r} already exists")
    _espeak()
    with staged_folder(out, VERSION) as tmp:
        jobs = _jobs(tuple(words), tuple(voices), tuple(speeds), tuple(pitches), num_phrases, seed)
        for rel, *_ in jobs:
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            lengths = list(pool.map(lambda j: synthesize(j[1], os.path.join(tmp, j[0]), *j[2:]),
                                    jobs))
        held_out = valid_voice.replace("+", "_") + "_" if valid_voice else None
        with open(os.path.join(tmp, "train.tsv"), "w") as tr, \
                open(os.path.join(tmp, "valid.tsv"), "w") as va:
            # fairseq manifests: first line the root, then path<TAB>num_samples.
            # The root is written as "." (the manifest's own folder) so the set
            # can be moved; `read_manifest` resolves it.
            tr.write(".\n")
            va.write(".\n")
            for (rel, text, voice, *_), n in zip(jobs, lengths):
                is_valid = held_out is not None and voice == valid_voice
                (va if is_valid else tr).write(f"{rel}\t{n}\n")
        with open(os.path.join(tmp, "labels.txt"), "w") as f:
            f.write("\n".join(words) + "\n")
    return out


def default_cache_dir() -> str:
    return os.environ.get("D2V_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "d2v_jax"))


def ensure_espeak_set(cache_dir: str = "") -> str:
    """The set's folder under `cache_dir` (default `$D2V_JAX_CACHE` or
    ~/.cache/d2v_jax), built on first use. Safe against concurrent builders: the
    loser of the final rename uses the winner's set."""
    root = os.path.join(cache_dir or default_cache_dir(), f"espeak_words_v{VERSION}")
    return ensure_built(root, "train.tsv", build_espeak_set, "the espeak-ng speech set (~30 s)")


@contextlib.contextmanager
def staged_folder(out: str, version: int):
    """A temporary folder beside `out` to build a set in: on success it gets a
    VERSION file and is renamed to `out`; on failure it is removed. A half-built
    set never sits at `out`, and a concurrent builder's rename fails (OSError)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building_", dir=parent)
    try:
        yield tmp
        with open(os.path.join(tmp, "VERSION"), "w") as f:
            f.write(f"{version}\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_built(root: str, marker: str, build, what: str) -> str:
    """`root`, built by `build(root)` unless its `marker` file exists. A builder
    writes elsewhere and renames into place, so the loser of a concurrent build's
    final rename (an OSError) uses the winner's set."""
    if os.path.isfile(os.path.join(root, marker)):
        return root
    from absl import logging

    logging.info("building %s into %s (first use)", what, root)
    try:
        build(root)
    except OSError:
        if not os.path.isfile(os.path.join(root, marker)):
            raise
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (must not exist); default: "
                        "the cache folder the tiny configs use")
    parser.add_argument("--num_phrases", type=int, default=NUM_PHRASES)
    args = parser.parse_args()
    if args.out is None:
        print(ensure_espeak_set())
    else:
        print(build_espeak_set(args.out, num_phrases=args.num_phrases))


if __name__ == "__main__":
    main()
