"""Transcribed speech for CTC fine-tuning: fairseq manifests with .ltr / .wrd,
folders with .txt transcripts, the espeak-ng sentence set, length-bucketed
batches with padding masks, and a fine-tune smoke run through the CLI."""

import json
import os

import jax
import numpy as np
import pytest
import soundfile as sf

import helpers
from d2v_jax.data import letters
from d2v_jax.errors import DataError, DataNotFoundError
from d2v_jax.finetune import ctc
from d2v_jax.finetune.__main__ import main as finetune_main
from d2v_jax.modalities.audio import sentence_set, transcripts

RATE = 16_000
TEXTS = {"spk1/a": "hello world", "spk1/b": "don't stop", "spk2/c": "a cat sat", "spk2/d": "go"}
LENGTHS = {"spk1/a": 4000, "spk1/b": 2500, "spk2/c": 6000, "spk2/d": 1200}


def _write_wavs(root, names=TEXTS, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        path = os.path.join(root, name + ".wav")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sf.write(path, 0.1 * rng.normal(size=LENGTHS[name]), RATE, subtype="PCM_16")


def _write_folder(root, texts=TEXTS):
    _write_wavs(root, texts)
    for name, text in texts.items():
        with open(os.path.join(root, name + ".txt"), "w") as f:
            f.write(text + "\n")
    return str(root)


def _write_manifest(tmp_path, ltr=True, wrd=True, names=tuple(TEXTS)):
    _write_wavs(tmp_path / "audio", names)
    tsv = tmp_path / "train.tsv"
    tsv.write_text("audio\n" + "".join(f"{n}.wav\t{LENGTHS[n]}\n" for n in names))
    if ltr:
        (tmp_path / "train.ltr").write_text(
            "".join(" ".join(letters.letter_units(TEXTS[n])) + "\n" for n in names))
    if wrd:
        (tmp_path / "train.wrd").write_text("".join(TEXTS[n].upper() + "\n" for n in names))
    return str(tsv)


@pytest.mark.parametrize("ltr,wrd", [(True, True), (True, False), (False, True)])
def test_manifest_with_ltr_and_or_wrd(tmp_path, ltr, wrd):
    vocab = letters.Vocab()
    t = transcripts.read_manifest_transcripts(_write_manifest(tmp_path, ltr, wrd), vocab)
    assert t.words == ["HELLO WORLD", "DON'T STOP", "A CAT SAT", "GO"]
    assert [vocab.decode(u) for u in t.units] == t.words
    assert "".join(vocab.tokens[i] for i in t.units[1]) == "DON'T|STOP|"
    assert t.speakers == ["spk1", "spk1", "spk2", "spk2"]
    assert t.manifest.lengths.tolist() == list(LENGTHS.values())


def test_manifest_errors_name_the_file(tmp_path):
    vocab = letters.Vocab()
    tsv = _write_manifest(tmp_path, ltr=False, wrd=False)
    with pytest.raises(DataNotFoundError, match=r"train\.tsv.*train\.ltr.*train\.wrd"):
        transcripts.read_manifest_transcripts(tsv, vocab)
    (tmp_path / "train.ltr").write_text("H I |\n")
    with pytest.raises(DataError, match=r"train\.ltr has 1 transcript lines .* lists 4"):
        transcripts.read_manifest_transcripts(tsv, vocab)
    (tmp_path / "train.ltr").write_text("H I |\nH I |\nH 1 |\nH I |\n")
    with pytest.raises(DataError, match=r"train\.ltr line 3: units \['1'\]"):
        transcripts.read_manifest_transcripts(tsv, vocab)
    with pytest.raises(DataNotFoundError, match="neither a fairseq manifest"):
        transcripts.read_transcripts(str(tmp_path / "nope.txt"), RATE, vocab)


def test_folder_transcripts_and_missing_txt(tmp_path):
    vocab = letters.Vocab()
    root = _write_folder(tmp_path / "clips")
    t = transcripts.read_transcripts(root, RATE, vocab)
    assert t.words == ["HELLO WORLD", "DON'T STOP", "A CAT SAT", "GO"]
    assert t.speakers == ["spk1", "spk1", "spk2", "spk2"]
    os.remove(os.path.join(root, "spk2", "c.txt"))
    with pytest.raises(DataNotFoundError, match=r"spk2/c\.wav.*no transcript.*spk2/c\.txt"):
        transcripts.read_transcripts(root, RATE, vocab)


def test_subset_by_minutes_is_the_shortest_prefix_reaching_the_amount():
    lengths = np.full(100, 30 * RATE)  # 30 s each
    sub = transcripts.subset_by_minutes(lengths, 2.0, 1.0, seed=3, sample_rate=RATE)
    assert len(sub) == 4 and len(set(sub.tolist())) == 4
    assert not np.array_equal(sub, transcripts.subset_by_minutes(lengths, 2.0, 1.0, 4, RATE))
    assert len(transcripts.subset_by_minutes(lengths, 2.1, 1.0, 3, RATE)) == 5
    assert len(transcripts.subset_by_minutes(lengths, None, 0.25, 3, RATE)) == 25
    assert len(transcripts.subset_by_minutes(lengths, 0.01, 1.0, 3, RATE)) == 1
    with pytest.raises(DataError, match="train_minutes"):
        transcripts.subset_by_minutes(lengths, 0.0, 1.0, 3, RATE)


def _asr_data(tmp_path, buckets=(3200, 6400)):
    vocab = letters.Vocab()
    t = transcripts.read_transcripts(_write_folder(tmp_path / "clips"), RATE, vocab)
    return transcripts.ASRData(t, t, vocab, np.array([0, 1, 2, 3]), sample_rate=RATE,
                               normalize=True, buckets=buckets)


def test_bucketed_batches_padding_and_labels(tmp_path):
    data = _asr_data(tmp_path)
    assert data.max_label_len == len("HELLO|WORLD|")
    seen = []
    it = data.train_batches(2, seed=0)
    for _ in range(2):  # one epoch: bucket 3200 = {b (2500), d (1200)}, 6400 = {a, c}
        b = next(it)
        size = b["audio"].shape[1]
        assert size in (3200, 6400) and b["labels"].shape == (2, 12)
        for r, i in enumerate(b["index"]):
            n = LENGTHS[list(TEXTS)[i]]
            assert (n <= 3200) == (size == 3200)
            np.testing.assert_array_equal(b["padding_mask"][r], np.arange(size) >= n)
            assert not b["audio"][r, n:].any()
            u = data.train_set.units[i]
            np.testing.assert_array_equal(b["labels"][r, :len(u)], u)
            np.testing.assert_array_equal(b["label_paddings"][r], np.arange(12) >= len(u))
            seen.append(int(i))
    assert sorted(seen) == [0, 1, 2, 3]
    ev = data.eval_batches(3)  # 2 + 2 utterances: each bucket's batch has one filler row
    assert [b["valid"].tolist() for b in ev] == [[1, 1, 0], [1, 1, 0]]
    assert sorted(i for b in ev for i, v in zip(b["index"], b["valid"]) if v) == [0, 1, 2, 3]
    with pytest.raises(DataError, match="the last bucket must hold it"):
        _asr_data(tmp_path / "x", buckets=(3200,))


def test_auto_buckets_cover_every_length():
    lengths = np.array([1000, 2000, 3000, 4000, 9001])
    b = transcripts.auto_buckets(lengths, 3, 1600)
    assert b[-1] >= 9001 and all(x % 1600 == 0 for x in b) and list(b) == sorted(set(b))


@pytest.mark.slow  # scans the standard library's docstrings (~2-5 s)
def test_packaged_sentences_are_plain_words():
    sents = sentence_set.packaged_sentences()
    assert len(sents) >= 660  # 600 are used
    vocab = letters.Vocab()
    for s in sents:
        assert 4 <= len(s.split()) <= 10 and vocab.decode(vocab.encode(s)) == s.upper()


def test_a_tiny_sentence_set_holds_test_voices_and_sentences_out(tmp_path):
    vocab = letters.Vocab()
    out = sentence_set.build_sentence_set(
        str(tmp_path / "set"), sentences=["one two three", "go left now", "stop"],
        train_voices=("en-us", "en-gb"), test_voices=("en-us+m3",), num_train=2, num_test=1)
    train = transcripts.read_transcripts(os.path.join(out, "train.tsv"), RATE, vocab)
    test = transcripts.read_transcripts(os.path.join(out, "test.tsv"), RATE, vocab)
    assert len(train) == 4 and len(test) == 1
    assert set(train.speakers) == {"en-us", "en-gb"} and test.speakers == ["en-us_m3"]
    assert not set(train.words) & set(test.words)  # test sentences are never trained on
    for t in (train, test):
        for i in range(len(t)):  # the manifest's lengths are the files'
            info = sf.info(os.path.join(t.manifest.root, t.manifest.paths[i]))
            assert info.frames == t.manifest.lengths[i] and info.samplerate == RATE


@pytest.mark.slow
def test_ctc_loss_of_a_padded_batch_equals_each_utterance_alone(tmp_path):
    """Padding masks all the way through: frames, encoder and CTC loss. Row 0
    (clip b, 2,500 samples) is padded to 6,000 next to clip c (6,000)."""
    from d2v_jax.finetune.model import CTCModel

    bconfig = helpers.tiny_config("audio", "tiny_v2")
    vocab = letters.Vocab()
    t = transcripts.read_transcripts(_write_folder(tmp_path / "clips"), RATE, vocab)
    data = transcripts.ASRData(t, t, vocab, np.arange(4), sample_rate=RATE, normalize=True,
                               buckets=(6000,))
    batch = data._batch(1, [1, 2], 6000, [1, 1])
    model = CTCModel(bconfig, len(vocab), mask_prob=0.0)
    inputs = {k: batch[k] for k in ("audio", "padding_mask")}
    params = model.init(jax.random.PRNGKey(0), inputs)

    @jax.jit
    def per_row(p, x, y, yp):
        logits, pad = model.apply(p, x)
        pad = jax.numpy.zeros(logits.shape[:2]) if pad is None else pad.astype(np.float32)
        return jax.vmap(lambda *a: ctc.ctc_loss(*(v[None] for v in a)))(logits, pad, y, yp)

    got = per_row(params, inputs, batch["labels"], batch["label_paddings"])
    alone = {"audio": batch["audio"][:1, :2500], "padding_mask": np.zeros((1, 2500), bool)}
    want = per_row(params, alone, batch["labels"][:1], batch["label_paddings"][:1])
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-4)
    assert float(got[0]) != pytest.approx(float(got[1]), rel=1e-2)  # rows differ


@pytest.mark.slow
def test_ctc_finetune_smoke_run_through_the_cli(tmp_path, capsys):
    train = _write_folder(tmp_path / "train")
    test = _write_folder(tmp_path / "test", {k: TEXTS[k] for k in ("spk2/c", "spk2/d")})
    work = tmp_path / "run"
    # A scratch backbone from an experiment file: tests/helpers.py's tiny speech model.
    backbone = tmp_path / "tiny_audio.py"
    backbone.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(helpers.__file__)!r})\n"
                        "import helpers\n\ndef get_config(arg=None):\n"
                        "    return helpers.tiny_config('audio', 'tiny_v2')\n")
    overrides = {"data.path": train, "data.test_path": test, "train.num_steps": 4,
                 "train.eval_every": 2, "data.batch_size": 2, "data.eval_batch_size": 2,
                 "data.buckets": "(6400,)", "optim.freeze_finetune_updates": 2,
                 "backbone": f"{backbone}:tiny", "encoder.layerdrop": 0.5,
                 # 4,800 samples: 1-3 of the 4 utterances (13,700 samples) are drawn.
                 "data.train_minutes": 4800 / RATE / 60}
    argv = ["finetune", "--config=experiments/finetune.py:asr_folder", f"--workdir={work}"]
    argv += [f"--config.{k}={v}" for k, v in overrides.items()]
    assert finetune_main(argv) == 0
    with open(work / "results.json") as f:
        r = json.load(f)
    assert r["kind"] == "ctc" and r["headline"] == "cer" and r["num_steps"] == 4
    assert [h["step"] for h in r["history"]] == [2, 4]
    for h in r["history"]:
        assert h["wer"] >= 0 and h["cer"] >= 0 and np.isfinite(h["loss"])
    refs = [e["reference"] for e in r["examples"]]
    assert refs == ["A CAT SAT", "GO"] and all(isinstance(e["hypothesis"], str)
                                                for e in r["examples"])
    # The metrics are the error rates of the decoded examples (the whole test set here).
    hyps = [e["hypothesis"] for e in r["examples"]]
    assert r["metrics"]["cer"] == pytest.approx(ctc.cer(refs, hyps))
    assert r["metrics"]["wer"] == pytest.approx(ctc.wer(refs, hyps))
    assert r["test_speakers"] == ["spk2"]
    assert 4800 / RATE / 60 <= r["train_minutes"] < sum(LENGTHS.values()) / RATE / 60
    assert r["train_pool_minutes"] == pytest.approx(sum(LENGTHS.values()) / RATE / 60)
    # The start-up line reports the share drawn, not data.label_fraction (1.0 here).
    assert r["num_train_pool"] == 4 and 1 <= r["num_labels"] <= 3
    share = 100 * r["num_labels"] / 4
    assert f"{r['num_labels']} labels ({share:.1f}% of 4)" in capsys.readouterr().out
    assert r["vocab"][:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"]
