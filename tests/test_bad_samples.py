"""Unreadable samples during training (`data.on_bad_sample`, d2v_jax/data/bad_samples.py).

A truncated PNG and a truncated WAV the first batch does not need to contain:
with 'skip' each is replaced by the next readable record (audio: the next
readable row of its batch), counted (`bad_samples` in metrics.jsonl), listed
once in <workdir>/bad_samples.jsonl, and a run stopped and resumed reads and
logs exactly what the uninterrupted run did; past `data.max_bad_fraction`
the run stops with one line (exit 3); 'error' stops at the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import soundfile as sf

from d2v_jax import errors, train
from d2v_jax.data import bad_samples
from d2v_jax.data.bad_samples import BadSampleLog, ForgivingSource, TooManyBadSamples
from d2v_jax.errors import BadSampleError, DataError

from helpers import (AUDIO, IMAGE, TINY_AUDIO, image_folder_run, make_image_folder,
                     pretrain_dataset, tiny_config, write_wav_class_folders)


class _Source:
    """Records 0..n-1; the indices in `bad` fail as a corrupt file would."""

    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise BadSampleError(f"cannot decode f{i}.png", path=f"f{i}.png")
        return {"x": i, "index": i}


def test_forgiving_source_replaces_with_the_next_readable_record():
    src = ForgivingSource(_Source(6, bad={2, 3, 5}), "skip")
    assert [src[i]["x"] for i in range(6)] == [0, 1, 4, 4, 4, 0]
    r = src[2]
    assert r[bad_samples.COUNT] == 2
    assert [p for p, _ in json.loads(r[bad_samples.LOG])] == ["f2.png", "f3.png"]
    assert src[0][bad_samples.COUNT] == 0 and src[0][bad_samples.LOG] == ""
    with pytest.raises(BadSampleError, match="f2.png"):
        ForgivingSource(_Source(6, bad={2}), "error")[2]
    with pytest.raises(DataError, match="3 records in a row are unreadable"):
        ForgivingSource(_Source(3, bad={0, 1, 2}), "skip")[1]
    # BadSampleError keeps its path across grain's worker processes (pickle).
    import pickle
    e = pickle.loads(pickle.dumps(BadSampleError("x", path="p.png")))
    assert isinstance(e, BadSampleError) and e.path == "p.png" and str(e) == "x"


def test_log_counts_lists_each_path_once_and_stops_past_the_fraction(tmp_path):
    config = tiny_config("image", **{"data.max_bad_fraction": 0.01})
    log = BadSampleLog(config, str(tmp_path), num_examples=500)
    batch = {bad_samples.COUNT: np.array([0, 1, 2]),
             bad_samples.LOG: np.array(["", json.dumps([["a.png", "e1"]]),
                                        json.dumps([["a.png", "e1"], ["b.png", "e2"]])])}
    log.add(batch, step=1)
    log.add(batch, step=2)  # the same files again (the next epoch)
    assert log.total == 6
    with open(tmp_path / bad_samples.LOG_FILE) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["path"], r["error"], r["step"]) for r in rows] == [("a.png", "e1", 1),
                                                                  ("b.png", "e2", 1)]
    # 6 of max(300 read, 500 in the set) = 1.2% > 1%
    with pytest.raises(TooManyBadSamples, match=r"6 unreadable samples .* data.max_bad_fraction=0.01 of 500"):
        log.check(300)
    assert BadSampleLog(config, str(tmp_path), 500, total=0).seen == {"a.png", "b.png"}
    assert BadSampleLog(config, None, 1000, total=6).check(300) == 6  # 0.6%
    with pytest.raises(errors.ConfigError, match="on_bad_sample"):
        bad_samples.settings(tiny_config("image", **{"data.on_bad_sample": "ignore"}))


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _truncated_flac(wav: str) -> str:
    """The clip as a FLAC cut in half: its header still says the full length
    (the folder scan lists it), its samples end early (reading fails)."""
    audio, rate = sf.read(wav, dtype="float32")
    os.remove(wav)
    flac = wav[:-4] + ".flac"
    sf.write(flac, audio, rate)
    _truncate(flac, os.path.getsize(flac) // 2)
    return flac


def test_audio_rows_of_a_bad_file_take_the_next_readable_row(tmp_path):
    root = tmp_path / "clips"
    write_wav_class_folders(root, sizes={"go": 6})
    _truncated_flac(os.path.join(root, "go", "2.wav"))
    overrides = {"data.source": "audio_folder", "data.path": str(root), "data.batch_size": 6,
                 "data.check_files": False, "data.min_sample_size": 1000, "masking.num_clones": 2}
    batch = next(iter(pretrain_dataset(tiny_config("audio", **overrides))))
    assert batch[bad_samples.COUNT].sum() == 1
    r = int(np.flatnonzero(batch[bad_samples.COUNT])[0])
    path, error = json.loads(batch[bad_samples.LOG][r])[0]
    assert path.endswith(os.path.join("go", "2.flac")) and "2.flac" in error
    # the row is a copy of another row: audio, padding and masks
    twins = [s for s in range(6) if s != r and (batch["audio"][s] == batch["audio"][r]).all()]
    assert len(twins) == 1 and (batch["mask"][twins[0]] == batch["mask"][r]).all()
    with pytest.raises(BadSampleError, match="2.flac"):
        next(iter(pretrain_dataset(tiny_config("audio", **overrides,
                                               **{"data.on_bad_sample": "error"}))))


def _run(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = train.main(["train", *argv])
    return code, out.getvalue()


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _argv(experiment, workdir, kw):
    return [f"--config={experiment}", f"--workdir={workdir}",
            *[f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
              for k, v in kw.items()]]


@pytest.mark.slow  # five in-process CLI runs (one compilation per modality, then cached)
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_bad_files_are_skipped_counted_listed_and_resume_bitwise(modality, tmp_path):
    if modality == "image":
        root = make_image_folder(tmp_path / "data", n=40, size=16)
        bad = [os.path.join(root, "a", f"{i:03d}.png") for i in (7, 23)]
        for path in bad:
            _truncate(path, 30)
        experiment = f"{IMAGE}:tiny_v2"
        kw = {**image_folder_run(root, num_steps=6, checkpoint_every=3), "probe.every": 0,
              "data.batch_size": 8}
    else:
        root = tmp_path / "data"
        write_wav_class_folders(root, sizes={"go": 20, "stop": 20})
        bad = [_truncated_flac(os.path.join(root, "go", "4.wav")),
               _truncated_flac(os.path.join(root, "stop", "11.wav"))]
        experiment = f"{AUDIO}:tiny_v2"
        kw = {**TINY_AUDIO, "data.source": "audio_folder", "data.path": str(root),
              "data.batch_size": 8, "data.check_files": False, "data.min_sample_size": 1000,
              "masking.num_clones": 2, "train.num_steps": 6, "train.log_every": 1,
              "train.checkpoint_every": 3, "probe.every": 0}
    kw["data.max_bad_fraction"] = 0.2  # 2 of 40 files: 5%

    whole = str(tmp_path / "whole")
    code, out = _run(_argv(experiment, whole, kw))
    assert code == 0, out[-3000:]
    rows = _metrics(whole)
    counts = [r["bad_samples"] for r in rows]
    # 6 steps x 8 = 48 reads > 40 files: both bad files are met (and one again).
    assert counts == sorted(counts) and counts[-1] >= 2, counts
    with open(os.path.join(whole, bad_samples.LOG_FILE)) as f:
        listed = [json.loads(line) for line in f]
    assert sorted(e["path"] for e in listed) == sorted(bad)  # each file once
    assert all(os.path.basename(e["path"]) in e["error"] for e in listed)

    split = str(tmp_path / "split")
    code, out = _run(_argv(experiment, split, {**kw, "train.num_steps": 3}))
    assert code == 0, out[-3000:]
    code, out = _run(_argv(experiment, split, kw))
    assert code == 0 and "resumed from" in out, out[-3000:]
    assert _metrics(split) == [dict(r, samples_per_sec=s["samples_per_sec"])
                               for r, s in zip(rows, _metrics(split))]
    with open(os.path.join(split, bad_samples.LOG_FILE)) as f:
        assert sorted(json.loads(line)["path"] for line in f) == sorted(bad)

    # Past the allowed fraction the run stops with one line naming the count.
    code, out = _run(_argv(experiment, str(tmp_path / "strict"),
                           {**kw, "data.max_bad_fraction": 0.001}))
    assert code == errors.EXIT_RUN_STOPPED, out[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "unreadable samples replaced" in line[0], out[-2000:]
    assert "bad_samples.jsonl" in line[0]


@pytest.mark.slow  # an in-process fine-tune
def test_finetune_skips_a_bad_training_image(tmp_path):
    """A truncated image in the training split is replaced, counted in
    results.json and listed; the test split is read whole and strictly."""
    from d2v_jax.data.splits import split_test
    from d2v_jax.finetune import loop
    from d2v_jax.modalities.image.sources import ImageFolderSource
    from helpers import finetune_config
    root = make_image_folder(tmp_path / "data", n=20, size=16, classes=("a", "b"))
    config = finetune_config("image_folder_small", **{
        "data.path": root, "backbone": f"{IMAGE}:tiny_v2", "train.num_steps": 8,
        "data.batch_size": 8, "data.max_bad_fraction": 0.5})
    files = ImageFolderSource(root).files
    pool, test = split_test(ImageFolderSource(root).labels, config.data.test_fraction,
                            config.data.split_seed)
    victim = files[int(pool[3])]
    _truncate(victim, 30)
    workdir = str(tmp_path / "ft")
    _, results = loop.train_and_evaluate(config, workdir)
    assert results["bad_samples"] >= 1 and results["num_test"] == len(test)
    with open(os.path.join(workdir, bad_samples.LOG_FILE)) as f:
        assert [json.loads(line)["path"] for line in f] == [victim]
    # The same file in the test split: the fine-tune refuses before it writes.
    _truncate(files[int(test[0])], 30)
    with pytest.raises(DataError, match="cannot decode"):
        loop.train_and_evaluate(config, str(tmp_path / "ft2"))
    assert not os.path.exists(tmp_path / "ft2")


def test_ctc_training_rows_of_a_bad_clip_are_replaced_evaluation_is_strict(tmp_path):
    """Speech recognition's own batches: an unreadable training utterance takes
    the next readable row of its length bucket, labels included; the same
    utterance in an evaluation set stops the run."""
    from d2v_jax.data import letters
    from d2v_jax.modalities.audio import transcripts
    root = tmp_path / "clips"
    texts = {"a": "hello world", "b": "don't stop", "c": "a cat sat", "d": "go"}
    rng = np.random.default_rng(0)
    root.mkdir()
    for name, n in zip(texts, (4000, 2500, 6000, 1200)):
        sf.write(root / f"{name}.wav", 0.1 * rng.normal(size=n), 16_000, subtype="PCM_16")
        (root / f"{name}.txt").write_text(texts[name] + "\n")
    victim = _truncated_flac(str(root / "c.wav"))
    vocab = letters.Vocab()
    t = transcripts.read_transcripts(str(root), 16_000, vocab)
    data = transcripts.ASRData(t, t, vocab, np.arange(4), sample_rate=16_000, normalize=True,
                               buckets=(3200, 6400))
    data.on_bad_sample = "skip"
    batches = data.train_batches(2, seed=0)
    got = [next(batches) for _ in range(2)]  # one epoch: {b, d} at 3200, {a, c} at 6400
    big = next(b for b in got if b["audio"].shape[1] == 6400)
    assert big[bad_samples.COUNT].tolist().count(1) == 1
    r = int(np.flatnonzero(big[bad_samples.COUNT])[0])
    assert json.loads(big[bad_samples.LOG][r])[0][0] == victim
    for key in ("audio", "labels", "label_paddings", "index"):
        np.testing.assert_array_equal(big[key][r], big[key][1 - r])
    with pytest.raises(BadSampleError, match="c.flac"):
        data.eval_batches(2)
    data.on_bad_sample = "error"
    batches = data.train_batches(2, seed=0)
    with pytest.raises(BadSampleError, match="c.flac"):
        [next(batches) for _ in range(2)]
