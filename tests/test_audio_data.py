"""Speech data: manifests, bad files, resampling, length buckets, batch masks."""

import logging
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from d2v_jax.config import load_config
from d2v_jax.modalities.audio import data as A
from d2v_jax.modalities.audio.model import config_frame_count


def _config(**over):
    base = {"data.max_sample_size": 4000, "data.buckets": (2400, 4000),
            "data.min_sample_size": 1200, "data.batch_size": 4}
    base.update(over)
    return load_config("experiments/audio.py:tiny_v2", base)


def _write(path, n, rate=16000, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype(np.float32)
    sf.write(path, x, rate, subtype="PCM_16")
    return x


@pytest.fixture
def corpus(tmp_path):
    """12 WAV/FLAC files of 1000-5000 samples and their fairseq manifest."""
    root = tmp_path / "corpus"
    lengths = [1000, 1500, 2000, 2300, 2400, 2600, 3000, 3500, 4000, 4500, 5000, 3900]
    lines = [str(root)]
    for i, n in enumerate(lengths):
        rel = f"spk{i % 3}/utt{i}.{'flac' if i % 4 == 0 else 'wav'}"
        _write(str(root / rel), n, seed=i)
        lines.append(f"{rel}\t{n}")
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path, np.asarray(lengths)


def test_manifest_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("/root\na.wav\t100\nb.wav\t200\textra\n")
    with pytest.raises(ValueError, match=r"bad\.tsv line 3: expected 2 tab-separated columns"):
        A.read_manifest(str(bad))
    bad.write_text("/root\na.wav\tmany\n")
    with pytest.raises(ValueError, match=r"bad\.tsv line 2: num_samples 'many' is not an integer"):
        A.read_manifest(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        A.read_manifest(str(tmp_path / "nope.tsv"))


def test_bad_audio_files_raise_or_are_skipped(corpus, caplog):
    tmp, _ = corpus
    root = tmp / "corpus"
    (root / "garbage.wav").write_bytes(b"this is not a wav file at all")
    sf.write(str(root / "empty.wav"), np.zeros(0, np.float32), 16000)
    lines = (tmp / "train.tsv").read_text().splitlines()
    lines += ["missing.wav\t100", "garbage.wav\t100", "empty.wav\t0"]
    (tmp / "train.tsv").write_text("\n".join(lines) + "\n")
    manifest = A.read_manifest(str(tmp / "train.tsv"))
    with pytest.raises(ValueError, match=r"missing\.wav.*train\.tsv line 14\).*does not exist"):
        A.check_files(manifest, 16000)
    ok = manifest.subset(np.array([p != "missing.wav" for p in manifest.paths]))
    with pytest.raises(ValueError, match=r"cannot read audio file .*garbage\.wav.*line 15"):
        A.check_files(ok, 16000)
    ok = ok.subset(np.array([p != "garbage.wav" for p in ok.paths]))
    with pytest.raises(ValueError, match=r"empty\.wav.*line 16\) is empty"):
        A.check_files(ok, 16000)
    with caplog.at_level(logging.WARNING):
        kept = A.check_files(manifest, 16000, on_error="skip")
    assert len(kept) == 12 and kept.skipped == 3
    assert "skipped 3 of 15 audio files" in caplog.text


def test_resampling_keeps_pitch_and_length(tmp_path):
    rate, n = 22050, 22050
    t = np.arange(n) / rate
    sf.write(str(tmp_path / "a.wav"), 0.5 * np.sin(2 * np.pi * 440 * t), rate, subtype="FLOAT")
    m = A.scan_folder(str(tmp_path), 16000)
    assert m.lengths.tolist() == [-(-n * 320 // 441)]  # ceil(n * 16000 / 22050)
    x = A.load_audio(m, 0, 16000)
    assert len(x) == m.lengths[0]
    freq = np.fft.rfftfreq(len(x), 1 / 16000)[np.argmax(np.abs(np.fft.rfft(x)))]
    assert abs(freq - 440) < 2


def test_scan_folder_roundtrip(corpus, tmp_path):
    tmp, lengths = corpus
    m = A.scan_folder(str(tmp / "corpus"), 16000)
    assert sorted(m.lengths.tolist()) == sorted(lengths.tolist())
    A.write_manifest(m, str(tmp_path / "built.tsv"))
    again = A.read_manifest(str(tmp_path / "built.tsv"))
    assert again.paths == m.paths and (again.lengths == m.lengths).all()


def test_batches_pad_to_smallest_bucket_with_masks(corpus):
    tmp, lengths = corpus
    config = _config(**{"data.source": "manifest", "data.path": str(tmp)})
    src = A.AudioSource.from_config(config)
    plan = A.BatchPlan(config, src.lengths)
    # 1000 < min_sample_size is left out; 11 usable -> 4 in bucket 2400, 7 in 4000.
    assert (plan.bucket >= 0).sum() == 11 and plan.num_batches == 2
    batcher = A.AudioBatcher(config, src, 0, 4)
    seen = set()
    for k in range(6):
        b = batcher(k)
        size = b["audio"].shape[1]
        assert size in (2400, 4000)
        t = config_frame_count(config, size)
        assert b["mask"].shape == (4, config.masking.num_clones, t)
        for r, i in enumerate(b["index"]):
            crop = min(lengths[i], 4000)
            assert size == (2400 if crop <= 2400 else 4000)  # smallest bucket that holds it
            assert (~b["padding_mask"][r]).sum() == crop and not b["padding_mask"][r, :crop].any()
            assert (b["audio"][r, crop:] == 0).all()
            np.testing.assert_allclose(b["audio"][r, :crop].mean(), 0, atol=1e-4)  # normalized
            n = config_frame_count(config, crop)
            assert (b["mask"][r].sum(-1) == int(0.5 * n)).all()  # exact count (2.0)
            assert not b["mask"][r][:, n:].any()
            seen.add(int(i))
        # batch k is a pure function of k (resumable)
        np.testing.assert_array_equal(batcher(k)["audio"], b["audio"])
    assert len(seen) >= 8
    # two processes together see exactly the one-process batch
    halves = [A.AudioBatcher(config, src, p, 2)(3) for p in (0, 1)]
    whole = batcher(3)
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


def test_crop_mode_and_v1_same_count(corpus):
    tmp, lengths = corpus
    config = load_config("experiments/audio.py:tiny_v1", {
        "data.source": "manifest", "data.path": str(tmp / "train.tsv"),
        "data.max_sample_size": 4000, "data.buckets": (2400, 4000), "data.min_sample_size": 800,
        "data.batch_size": 4, "data.pad": False})
    src = A.AudioSource.from_config(config)
    batcher = A.AudioBatcher(config, src, 0, 4)
    for k in range(4):
        b = batcher(k)
        size = b["audio"].shape[1]
        assert not b["padding_mask"].any()  # cropped down to the bucket, never padded
        assert all(lengths[i] >= size for i in b["index"])
        counts = b["mask"].sum(-1)
        assert (counts == counts.min()).all() and counts.min() > 0  # require_same_masks


def test_bad_buckets_error():
    config = _config(**{"data.buckets": (4000, 2400)})
    with pytest.raises(ValueError, match=r"data.buckets=\(4000, 2400\) must be strictly increasing"):
        A.check_buckets(config)


def test_espeak_builder_small(tmp_path):
    from d2v_jax.modalities.audio import speech_set

    assert shutil.which("espeak-ng"), "espeak-ng is required (.ci/run installs it)"
    out = speech_set.build_espeak_set(str(tmp_path / "set"), words=("one", "two"),
                                      voices=("en-us", "en-gb"), speeds=(160,), pitches=(50,),
                                      num_phrases=2, valid_voice="en-gb")
    train = A.read_manifest(os.path.join(out, "train.tsv"))
    valid = A.read_manifest(os.path.join(out, "valid.tsv"))
    assert len(train) + len(valid) == 2 * 2 + 2  # words x voices + phrases
    assert sum(p.startswith("words/") for p in train.paths) == 2  # en-us only
    assert sorted(os.listdir(os.path.join(out, "words"))) == ["one", "two"]
    assert all("en-gb" in p for p in valid.paths if p.startswith("words"))
    for m in (train, valid):
        for i, rel in enumerate(m.paths):
            info = sf.info(os.path.join(out, rel))
            assert info.samplerate == 16000 and info.frames == m.lengths[i] > 1000


def test_files_longer_than_max_sample_size_are_cropped_at_a_random_start(corpus):
    # fairseq crops a too-long file at a uniformly random start (RawAudioDataset.crop_to_max_size);
    # the window must range over the whole file, in both bucketing modes.
    tmp, lengths = corpus
    for pad, rows in ((True, 4), (False, 2)):  # without padding bucket 4000 holds 3 files
        config = _config(**{"data.source": "manifest", "data.path": str(tmp), "data.pad": pad,
                            "data.batch_size": rows})
        src = A.AudioSource.from_config(config)
        batcher = A.AudioBatcher(config, src, 0, rows)
        starts = {}
        for k in range(40):
            b = batcher.plan.batch(k)
            for i, start, crop in zip(b["index"], b["start"], b["crop"]):
                if lengths[i] > 4000:  # 4500 and 5000
                    assert crop == 4000 and 0 <= start <= lengths[i] - crop
                    starts.setdefault(int(i), set()).add(start)
        assert set(starts) == {9, 10}
        for i, seen in starts.items():
            assert len(seen) > 5 and max(seen) > (lengths[i] - 4000) // 2, (pad, i, seen)
        # the row holds exactly that window of the file (normalized)
        b, p = batcher(0), batcher.plan.batch(0)
        for r, (i, start, crop) in enumerate(zip(p["index"], p["start"], p["crop"])):
            want = src.read(int(i))[start:start + crop]
            want = (want - want.mean()) / np.sqrt(want.var() + 1e-5)
            np.testing.assert_allclose(b["audio"][r, :crop], want, atol=1e-4)


def test_token_budget_rows_per_bucket_match_fairseq_max_tokens():
    # audio base_v2: max_tokens 1M samples per GPU x 8 GPUs. Per bucket of S
    # samples fairseq fits 1M // S rows on each of 8 GPUs; ours (global budget 8M,
    # rows a multiple of batch_size 8) must give exactly 8 x that.
    config = load_config("experiments/audio.py:base_v2", {})
    assert config.data.max_tokens == 8_000_000 and config.data.batch_size == 8
    rng = np.random.default_rng(0)
    lengths = rng.integers(40_000, 400_000, 3000)
    plan = A.BatchPlan(config, lengths)
    want = {s: 8 * (1_000_000 // s) for s in config.data.buckets}
    assert dict(zip(plan.buckets, plan.rows)) == want  # {120k: 64, 200k: 40, 260k: 24, 320k: 24}
    seen = {}
    for k in range(plan.num_batches):
        idx = plan.epoch(0)[k]
        size = plan.buckets[int(plan.bucket[idx[0]])]
        assert len(idx) == want[size] and (plan.bucket[idx] == plan.bucket[idx[0]]).all()
        seen[size] = len(idx)
        assert len(idx) * size <= config.data.max_tokens
    assert seen == want  # every bucket forms batches, each of its one static shape
    b = plan.batch(0)  # masks of the bucket's frame count, M = 8 clones
    assert b["mask"].shape == (len(b["index"]), 8, config_frame_count(config, b["size"]))
    with pytest.raises(ValueError, match="data.max_tokens=1000000 holds fewer than"):
        A.BatchPlan(load_config("experiments/audio.py:base_v2", {"data.max_tokens": 1_000_000}),
                    lengths)


def test_v1_same_count_trims_per_official_gpu_batch():
    # audio base_v1: fairseq trims span masks to the smallest count of each GPU's
    # batch (require_same_masks), not of the global one: 16 groups of rows / 16.
    config = load_config("experiments/audio.py:base_v1", {"data.buckets": (320_000,)})
    lengths = np.random.default_rng(1).integers(320_000, 400_000, 400)
    plan = A.BatchPlan(config, lengths)
    b = plan.batch(0)
    rows = len(b["index"])
    assert rows == 16 * (3_800_000 // 320_000) == 176
    counts = b["mask"][:, 0].sum(-1).reshape(16, rows // 16)
    assert (counts == counts[:, :1]).all()  # one count per GPU's rows
    assert len(np.unique(counts[:, 0])) > 1  # ... not one for the whole batch


def test_batch_rows_equal_an_independent_read_crop_normalize(tmp_path):
    """Every row is soundfile's whole-file read, cropped at the start drawn from
    SeedSequence([seed, epoch, index, 0]) and normalized as fairseq
    ((x - mean) / sqrt(var + 1e-5)), bit for bit: mono WAV / FLAC files are
    decoded straight into the batch (a seek to the crop), stereo, 8 kHz and
    Ogg files go through the whole-file read."""
    rng = np.random.default_rng(3)
    specs = [("wav", "PCM_16", 1, 16000), ("flac", "PCM_16", 1, 16000), ("wav", "FLOAT", 1, 16000),
             ("ogg", "VORBIS", 1, 16000), ("wav", "PCM_16", 2, 16000), ("wav", "PCM_16", 1, 8000)]
    for i in range(18):
        ext, sub, ch, rate = specs[i % len(specs)]
        n = int(rng.integers(1500, 4001)) * rate // 16000  # <= max_sample_size
        sf.write(str(tmp_path / f"u{i:02d}.{ext}"), rng.uniform(-0.5, 0.5, (n, ch)), rate, subtype=sub)
    for pad in (True, False):
        config = _config(**{"data.source": "audio_folder", "data.path": str(tmp_path),
                            "data.min_sample_size": 800, "data.pad": pad})
        src = A.AudioSource.from_config(config)
        batcher = A.AudioBatcher(config, src, 0, 4)
        fast = 0
        for k in range(2 * batcher.plan.num_batches):  # two epochs
            b = batcher(k)
            size = b["audio"].shape[1]
            for r, i in enumerate(b["index"]):
                x, rate = sf.read(str(tmp_path / src.manifest.paths[i]), dtype="float32")
                if x.ndim == 2:
                    x = x.mean(axis=1)
                if rate != 16000:  # resampled: compare with the whole-file loader
                    x = A.load_audio(src.manifest, int(i), 16000)
                else:
                    fast += x.ndim == 1 and not src.manifest.paths[i].endswith(".ogg")
                crop = min(len(x), size)
                seq = np.random.SeedSequence([config.seed, k // batcher.plan.num_batches, int(i), 0])
                start = int(np.random.default_rng(seq).integers(0, len(x) - crop + 1))
                x = x[start:start + crop]
                ref = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
                np.testing.assert_array_equal(b["audio"][r, :crop], ref)
                assert not b["audio"][r, crop:].any() and b["padding_mask"][r].sum() == size - crop
        assert fast > 8  # the decode-into-the-batch path was exercised


def test_normalize_inplace_is_bit_identical():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 8, 9, 127, 128, 129, 1000, 8191, 8193, 50_001, 320_000):
        x = rng.normal(rng.uniform(-1, 1), rng.uniform(1e-3, 3), n).astype(np.float32)
        y = x.copy()
        A.normalize_inplace(y)
        np.testing.assert_array_equal(y, (x - x.mean()) / np.sqrt(x.var() + 1e-5))


def test_read_into_names_a_file_shorter_than_its_manifest_line(tmp_path):
    _write(str(tmp_path / "a.wav"), 3000)
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\na.wav\t3500\n")
    src = A.AudioSource(A.read_manifest(str(tmp_path / "train.tsv")))
    with pytest.raises(ValueError, match=r"a\.wav.*train\.tsv line 2\) has 3000 samples .* says 3500"):
        src.read_into(0, 0, np.zeros(3000, np.float32))
