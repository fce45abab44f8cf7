r"""A transcribed speech set synthesized with `espeak-ng`: English sentences
spoken by several voices at several speeds, for CTC fine-tuning.

    python -m d2v_jax.modalities.audio.sentence_set --out ~/.cache/d2v_jax/espeak_sentences

The sentences are the plain-word sentences of the Python standard library's
docstrings (the text modality's packaged corpus, `text/labeled.py`
`stdlib_docs`): 4-10 words of letters and apostrophes, e.g. "Return the path
to which the symbolic link points". Layout under `out`, in fairseq's
fine-tuning format:

    clips/<voice>/<split>_<n>.wav   16 kHz 16-bit mono (the manifests' root is
                                    clips/, so a path's first folder is the voice)
    train.tsv, train.ltr, train.wrd the training sentences, each spoken once by
                                    every training voice (random speed, pitch)
    test.tsv, test.ltr, test.wrd    other sentences, spoken by the test voices
                                    only: speakers never heard in fine-tuning
    sentences.txt                   the sentences, train then test

`en-us+m3`, the test voice, is also the voice the `espeak_words` pretraining set
holds out. The set depends on the Python version (its docstrings); it is built
on first use (`ensure_sentence_set`, ~1-2 min on 2 cores) into a temporary
folder renamed into place.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re

import numpy as np

from d2v_jax.data import letters
from d2v_jax.modalities.audio import speech_set
from d2v_jax.modalities.text.labeled import stdlib_docs

TEST_VOICES = ("en-us+m3",)
TRAIN_VOICES = tuple(v for v in speech_set.VOICES if v not in TEST_VOICES)
NUM_TRAIN_SENTENCES = 300
NUM_TEST_SENTENCES = 60
MIN_WORDS, MAX_WORDS = 4, 10
VERSION = 1  # bump when the recipe changes, so caches are rebuilt
_SENTENCE = re.compile(r"[A-Z][a-z' ,]+\.")


def packaged_sentences() -> list[str]:
    """Sorted distinct sentences of the stdlib docstrings made of 4-10 plain
    lower-case words (the first capitalized), commas dropped."""
    out = set()
    for text in stdlib_docs()[0]:
        for s in re.split(r"(?<=[.!?])\s+", text):
            if not _SENTENCE.fullmatch(s.strip()):
                continue
            words = s.strip()[:-1].replace(",", " ").split()
            if MIN_WORDS <= len(words) <= MAX_WORDS and all(
                    re.fullmatch(r"[A-Za-z]+('[a-z]+)?", w) for w in words):
                out.add(" ".join(words))
    return sorted(out)


def _jobs(sentences, train_voices, test_voices, num_train, num_test, seed):
    """(relative path, text, voice, speed, pitch, split) of every clip."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sentences))
    if len(order) < num_train + num_test:
        raise ValueError(f"only {len(order)} sentences for {num_train} + {num_test}")
    test = [sentences[i] for i in order[:num_test]]
    train = [sentences[i] for i in order[num_test:num_test + num_train]]
    jobs = []
    for split, texts, voices in (("train", train, train_voices), ("test", test, test_voices)):
        for voice in voices:
            for k, text in enumerate(texts):
                speed, pitch = int(rng.choice(speech_set.SPEEDS)), int(rng.choice(speech_set.PITCHES))
                rel = os.path.join(voice.replace("+", "_"), f"{split}_{k:04d}.wav")
                jobs.append((rel, text, voice, speed, pitch, split))
    return jobs, train + test


def build_sentence_set(out: str, *, sentences=None, train_voices=TRAIN_VOICES,
                       test_voices=TEST_VOICES, num_train: int = NUM_TRAIN_SENTENCES,
                       num_test: int = NUM_TEST_SENTENCES, seed: int = 0,
                       num_threads: int = 2) -> str:
    """Builds the set into `out` (which must not exist yet); returns `out`."""
    if os.path.exists(out):
        raise FileExistsError(f"build_sentence_set: {out!r} already exists")
    speech_set._espeak()
    sentences = packaged_sentences() if sentences is None else list(sentences)
    with speech_set.staged_folder(out, VERSION) as tmp:
        jobs, used = _jobs(sentences, tuple(train_voices), tuple(test_voices), num_train,
                           num_test, seed)
        clips = os.path.join(tmp, "clips")
        for rel, *_ in jobs:
            os.makedirs(os.path.join(clips, os.path.dirname(rel)), exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            lengths = list(pool.map(
                lambda j: speech_set.synthesize(j[1], os.path.join(clips, j[0]), *j[2:5]), jobs))
        for split in ("train", "test"):
            rows = [(j, n) for j, n in zip(jobs, lengths) if j[5] == split]
            with open(os.path.join(tmp, f"{split}.tsv"), "w") as tsv, \
                    open(os.path.join(tmp, f"{split}.ltr"), "w") as ltr, \
                    open(os.path.join(tmp, f"{split}.wrd"), "w") as wrd:
                tsv.write("clips\n")  # relative to the manifest's folder: the set can move
                for (rel, text, *_), n in rows:
                    tsv.write(f"{rel}\t{n}\n")
                    ltr.write(" ".join(letters.letter_units(text)) + "\n")
                    wrd.write(letters.normalize_words(text) + "\n")
        with open(os.path.join(tmp, "sentences.txt"), "w") as f:
            f.write("\n".join(used) + "\n")
    return out


def ensure_sentence_set(cache_dir: str = "") -> str:
    """The set's folder under `cache_dir` (default `$D2V_JAX_CACHE` or
    ~/.cache/d2v_jax), built on first use; a concurrent builder's set is used."""
    root = os.path.join(cache_dir or speech_set.default_cache_dir(),
                        f"espeak_sentences_v{VERSION}")
    return speech_set.ensure_built(root, "test.tsv", build_sentence_set,
                                   "the espeak-ng sentence set (~1-2 min)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (must not exist); default: "
                        "the cache folder the asr_espeak config uses")
    args = parser.parse_args()
    print(ensure_sentence_set() if args.out is None else build_sentence_set(args.out))


if __name__ == "__main__":
    main()
