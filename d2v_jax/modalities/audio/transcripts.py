"""Transcribed speech for CTC fine-tuning: fairseq's fine-tuning manifests
(`<split>.tsv` with `<split>.ltr` / `<split>.wrd` beside it), folders of audio
files with a `.txt` transcript each, and the length-bucketed, padded batches
the CTC steps take.

A batch: audio f32 [B, S] (zero-padded to its length bucket S), padding_mask
bool [B, S] (True = padding), labels int32 [B, L] (letter ids, blank-padded to
the data set's longest transcript L), label_paddings f32 [B, L] (1 = padding),
valid f32 [B] (0 = a filler row of a last, partial evaluation batch) and index
int32 [B] (the utterance).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np

from d2v_jax.data import bad_samples
from d2v_jax.data import letters
from d2v_jax.errors import BadSampleError, DataError, DataNotFoundError
from d2v_jax.modalities.audio import data as audio


@dataclasses.dataclass
class Transcribed:
    """Audio files (a Manifest, lengths in samples at the target rate) with
    their transcripts (normalized words), letter ids and speakers."""

    manifest: audio.Manifest
    words: list[str]
    units: list[np.ndarray]
    speakers: list[str]

    def __len__(self) -> int:
        return len(self.manifest)

    def minutes(self, indices: Sequence[int] | None = None, sample_rate: int = 16_000) -> float:
        lengths = self.manifest.lengths if indices is None else self.manifest.lengths[indices]
        return float(np.sum(lengths)) / sample_rate / 60


def _speaker(rel: str) -> str:
    """The first folder of a relative path (LibriSpeech `<speaker>/<chapter>/...`,
    the espeak set's `<voice>/...`), '' for a file at the top."""
    parts = rel.replace("\\", "/").split("/")
    return parts[0] if len(parts) > 1 else ""


def _read_lines(path: str, expected: int, manifest: str) -> list[str]:
    with open(path) as f:
        lines = f.read().splitlines()
    if len(lines) != expected:
        raise DataError(f"{path} has {len(lines)} transcript lines but its manifest {manifest} "
                        f"lists {expected} audio files; line i must transcribe file i")
    return lines


def read_manifest_transcripts(tsv: str, vocab: letters.Vocab) -> Transcribed:
    """fairseq fine-tuning data: `x.tsv` (root line, then path<TAB>samples),
    `x.ltr` (letters, `|` after each word: "H I | T H E R E |") and/or `x.wrd`
    (words) beside it, one line per audio file. The `.ltr` gives the targets
    when present (else the words are spelled out); the `.wrd` gives the
    references (else the `.ltr` joined at its `|`)."""
    manifest = audio.read_manifest(tsv)
    stem = os.path.splitext(tsv)[0]
    ltr, wrd = stem + ".ltr", stem + ".wrd"
    if not os.path.isfile(ltr) and not os.path.isfile(wrd):
        raise DataNotFoundError(f"no transcripts for manifest {tsv}: expected {ltr} (letters) "
                                f"or {wrd} (words) beside it")
    n = len(manifest)
    units = words = None
    if os.path.isfile(ltr):
        lines = _read_lines(ltr, n, tsv)
        units = [vocab.encode_units(line.split(), f"{ltr} line {i + 1}")
                 for i, line in enumerate(lines)]
        words = [letters.normalize_words(line.replace(" ", "").replace(letters.BOUNDARY, " "))
                 for line in lines]
    if os.path.isfile(wrd):
        words = [letters.normalize_words(w) for w in _read_lines(wrd, n, tsv)]
        if units is None:
            units = [vocab.encode(w, f"{wrd} line {i + 1}") for i, w in enumerate(words)]
    _check_nonempty(units, lambda i: f"{ltr if os.path.isfile(ltr) else wrd} line {i + 1}")
    return Transcribed(manifest, words, units, [_speaker(p) for p in manifest.paths])


def read_folder_transcripts(root: str, sample_rate: int, vocab: letters.Vocab) -> Transcribed:
    """Every audio file under `root` with a transcript `<same name>.txt` beside
    it (words, any case; punctuation is dropped). The speaker is the file's
    first folder under `root`."""
    manifest = audio.scan_folder(root, sample_rate)
    words, units = [], []
    for rel in manifest.paths:
        txt = os.path.join(root, os.path.splitext(rel)[0] + ".txt")
        if not os.path.isfile(txt):
            raise DataNotFoundError(f"audio file {os.path.join(root, rel)!r} has no transcript: "
                                    f"expected {txt!r}")
        with open(txt) as f:
            text = letters.normalize_words(f.read())
        words.append(text)
        units.append(vocab.encode(text, txt))
    _check_nonempty(units, lambda i: os.path.join(root, manifest.paths[i]))
    return Transcribed(manifest, words, units, [_speaker(p) for p in manifest.paths])


def _check_nonempty(units, where) -> None:
    for i, u in enumerate(units):
        if len(u) == 0:
            raise DataError(f"{where(i)}: the transcript is empty")


def read_transcripts(path: str, sample_rate: int, vocab: letters.Vocab) -> Transcribed:
    """A `.tsv` manifest or a folder of audio + `.txt` files."""
    if path.endswith(".tsv"):
        return read_manifest_transcripts(path, vocab)
    if os.path.isdir(path):
        return read_folder_transcripts(path, sample_rate, vocab)
    raise DataNotFoundError(f"{path!r} is neither a fairseq manifest (.tsv) nor a folder of "
                            "audio files with .txt transcripts")


def subset_by_minutes(lengths: np.ndarray, minutes: float | None, fraction: float, seed: int,
                      sample_rate: int) -> np.ndarray:
    """Sorted indices of a random subset (seeded): the first utterances of a
    permutation until their audio reaches `minutes` (at least one), or, with
    `minutes=None`, round(fraction * N) of them."""
    n = len(lengths)
    order = np.random.default_rng(seed).permutation(n)
    if minutes is None:
        if not 0 < fraction <= 1:
            raise DataError(f"config.data.label_fraction={fraction} is not in (0, 1]")
        keep = max(1, round(fraction * n))
    else:
        if minutes <= 0:
            raise DataError(f"config.data.train_minutes={minutes} must be > 0")
        total = np.cumsum(lengths[order]) / sample_rate / 60
        keep = int(np.searchsorted(total, minutes, side="left")) + 1
    return np.sort(order[:min(keep, n)])


def auto_buckets(lengths: np.ndarray, count: int, multiple: int) -> tuple[int, ...]:
    """`count` bucket lengths at equal-count quantiles of `lengths`, rounded up
    to a multiple of `multiple`; the last holds the longest."""
    qs = np.quantile(lengths, np.arange(1, count + 1) / count)
    return tuple(sorted({int(-(-q // multiple) * multiple) for q in qs}))


class ASRData:
    """Train utterances, the evaluation sets ({name: utterances}, the first is
    `test_set`, the headline), the used training subset, the vocabulary and the
    batch makers. Audio is read once and kept in memory (normalized per
    utterance when the backbone was pretrained so).

    `max_tokens` (samples per update, 0 = off): fairseq's token budget, a
    batch of bucket length S has max(batch_size, (max_tokens // S) //
    batch_size * batch_size) rows (`batch_size` as the row multiple), one
    static shape per bucket; otherwise every batch has `batch_size` rows."""

    def __init__(self, train_set: Transcribed, test_set: Transcribed | dict[str, Transcribed],
                 vocab: letters.Vocab, train: np.ndarray, *, sample_rate: int, normalize: bool,
                 buckets: tuple[int, ...], max_tokens: int = 0) -> None:
        self.eval_sets = dict(test_set) if isinstance(test_set, dict) else {"test": test_set}
        self.train_set, self.vocab = train_set, vocab
        self.test_set = next(iter(self.eval_sets.values()))
        self._sets = (train_set, *self.eval_sets.values())
        self._index = {name: 1 + k for k, name in enumerate(self.eval_sets)}
        self.train_pool = np.arange(len(train_set))
        self.train = np.asarray(train)
        self.test = np.arange(len(self.test_set))
        self.sample_rate, self.normalize = int(sample_rate), normalize
        self.max_tokens = int(max_tokens or 0)
        self.buckets = tuple(int(b) for b in buckets)
        longest = int(max(s.manifest.lengths.max() for s in self._sets))
        if self.buckets[-1] < longest:
            raise DataError(f"config.data.buckets={self.buckets}: the longest utterance has "
                            f"{longest} samples; the last bucket must hold it")
        self.max_label_len = max(max(len(u) for u in s.units) for s in self._sets)
        self.class_names = list(vocab.tokens)  # output i of the head is unit i
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        # An unreadable training utterance: replaced by the next readable row of
        # its batch ("skip"), or stops the run ("error"); data/bad_samples.py.
        self.on_bad_sample = "error"

    @property
    def num_classes(self) -> int:
        return len(self.vocab)

    def references(self, name: str | None = None) -> list[str]:
        """The words of each utterance of evaluation set `name` (None: the first)."""
        return self._sets[self._which(name)].words

    def _which(self, name: str | None) -> int:
        if name is None:
            return 1
        if name not in self._index:
            raise KeyError(f"no evaluation set {name!r}; have {list(self.eval_sets)}")
        return self._index[name]

    def rows_for(self, size: int, batch_size: int) -> int:
        """Rows of a training batch of bucket length `size` (see the class doc)."""
        if not self.max_tokens:
            return batch_size
        return max(batch_size, (self.max_tokens // size) // batch_size * batch_size)

    def _audio(self, which: int, i: int) -> np.ndarray:
        key = (which, int(i))
        if key not in self._cache:
            s = self._sets[which]
            wav = audio.load_audio(s.manifest, int(i), self.sample_rate)
            self._cache[key] = audio.normalize(wav) if self.normalize else wav.astype(np.float32)
        return self._cache[key]

    def _bucket(self, length: int) -> int:
        return self.buckets[int(np.searchsorted(self.buckets, length, side="left"))]

    def _batch(self, which: int, rows: Sequence[int], size: int, valid: Sequence[float]
               ) -> dict[str, np.ndarray]:
        s = self._sets[which]
        b = len(rows)
        wav = np.zeros((b, size), np.float32)
        pad = np.ones((b, size), bool)
        labels = np.full((b, self.max_label_len), self.vocab.blank, np.int32)
        label_pad = np.ones((b, self.max_label_len), np.float32)
        failed = {}  # row -> (path, error): training rows only (evaluation reads strictly)
        for r, i in enumerate(rows):
            try:
                x = self._audio(which, i)[:size]
            except BadSampleError as e:
                if which != 0 or self.on_bad_sample == "error":
                    raise
                failed[r] = (e.path, str(e))
                continue
            wav[r, :len(x)], pad[r, :len(x)] = x, False
            u = s.units[int(i)]
            labels[r, :len(u)], label_pad[r, :len(u)] = u, 0.0
        out = {"audio": wav, "padding_mask": pad, "labels": labels, "label_paddings": label_pad,
               "valid": np.asarray(valid, np.float32), "index": np.asarray(rows, np.int32)}
        if which == 0:
            bad_samples.replace_rows(out, failed, ("audio", "padding_mask", "labels",
                                                   "label_paddings", "index"))
        return out

    def train_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        """Endless training batches: each epoch (seeded by seed and epoch) groups
        the used utterances by length bucket, shuffles each bucket, cuts it into
        batches of `rows_for(bucket)` rows (a bucket's last, short batch is
        filled with other utterances of the same bucket) and shuffles the batch
        order."""
        lengths = self.train_set.manifest.lengths[self.train]
        sizes = np.array([self._bucket(n) for n in lengths])
        epoch = 0
        while True:
            rng = np.random.default_rng((seed, epoch))
            plan = []
            for size in sorted(set(sizes.tolist())):
                members = self.train[sizes == size]
                members = members[rng.permutation(len(members))]
                rows_per = self.rows_for(size, batch_size)
                for start in range(0, len(members), rows_per):
                    rows = members[start:start + rows_per]
                    if len(rows) < rows_per:
                        rows = np.concatenate([rows, rng.choice(members, rows_per - len(rows))])
                    plan.append((size, rows))
            for k in rng.permutation(len(plan)):
                size, rows = plan[k]
                yield self._batch(0, rows, size, np.ones(len(rows)))
            epoch += 1

    def eval_batches(self, batch_size: int, name: str | None = None
                     ) -> list[dict[str, np.ndarray]]:
        """Every utterance of evaluation set `name` (None: the first) once, in
        length order, by bucket; a bucket's last batch is padded with filler
        rows (valid = 0)."""
        which = self._which(name)
        lengths = self._sets[which].manifest.lengths
        sizes = np.array([self._bucket(n) for n in lengths])
        out = []
        for size in sorted(set(sizes.tolist())):
            members = np.flatnonzero(sizes == size)
            for start in range(0, len(members), batch_size):
                rows = members[start:start + batch_size]
                valid = np.r_[np.ones(len(rows)), np.zeros(batch_size - len(rows))]
                rows = np.r_[rows, np.repeat(rows[:1], batch_size - len(rows))]
                out.append(self._batch(which, rows, size, valid))
        return out
