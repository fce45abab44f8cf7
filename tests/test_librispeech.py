"""LibriSpeech fine-tuning as wav2vec 2.0's base_*.yaml run it: a folder of
fairseq manifests with named evaluation sets (WER and CER of each), the
letter dictionary beside them, token-budget batches, and a manifest whose
.ltr does not match its .tsv refused with one line, nothing written."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from d2v_jax.data import letters
from d2v_jax.finetune.__main__ import main as finetune_main
from d2v_jax.modalities.audio import asr

from helpers import finetune_config

RATE = 16_000
SETS = {"train": {"spk1/a": "hello world", "spk1/b": "don't stop", "spk2/c": "a cat sat"},
        "dev_other": {"spk3/d": "go home"}, "dev_clean": {"spk4/e": "a dog"},
        "test_clean": {"spk5/f": "sit"}, "test_other": {"spk6/g": "hello cat"}}
# LibriSpeech's dict.ltr.txt layout (fairseq Dictionary: <s> <pad> </s> <unk> first)
DICT = "| 10\nE 9\nT 8\nA 7\nO 6\nH 5\nL 4\nC 3\nS 3\nD 2\nW 2\nR 2\nN 2\nG 2\nM 1\nI 1\nP 1\n' 1\n"


def write_manifests(root, sets=SETS, seed=0):
    """fairseq's fine-tuning layout: <set>.tsv (root line, path<TAB>samples),
    <set>.ltr and <set>.wrd, dict.ltr.txt; audio under root/audio."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for name, texts in sets.items():
        tsv, ltr, wrd = [str(root / "audio")], [], []
        for rel, text in texts.items():
            n = int(rng.integers(2000, 6000))
            path = root / "audio" / f"{rel}.wav"
            os.makedirs(path.parent, exist_ok=True)
            sf.write(path, 0.1 * rng.normal(size=n), RATE, subtype="PCM_16")
            tsv.append(f"{rel}.wav\t{n}")
            ltr.append(" ".join(letters.letter_units(text)))
            wrd.append(text.upper())
        for ext, lines in (("tsv", tsv), ("ltr", ltr), ("wrd", wrd)):
            (root / f"{name}.{ext}").write_text("\n".join(lines) + "\n")
    (root / "dict.ltr.txt").write_text(DICT)
    return str(root)


def _config(path, **kw):
    return finetune_config("librispeech_10h", **{"data.path": path, **kw})


def test_manifest_folder_gives_every_named_evaluation_set(tmp_path):
    root = write_manifests(tmp_path / "ls")
    config = _config(root)
    assert tuple(config.data.eval_subsets) == ("dev_other", "dev_clean", "test_clean", "test_other")
    data = asr.asr_data(config, _audio_backbone())
    assert list(data.eval_sets) == ["dev_other", "dev_clean", "test_clean", "test_other"]
    assert data.references("dev_clean") == ["A DOG"] and data.references() == ["GO HOME"]
    # fairseq's letter dictionary: blank = <s> (index 0), as its CTC criterion
    assert data.vocab.tokens[:5] == ("<s>", "<pad>", "</s>", "<unk>", "|")
    assert data.vocab.blank == 0
    batch = data.eval_batches(4, "test_other")[0]
    units = batch["labels"][0][batch["label_paddings"][0] == 0]
    assert data.vocab.decode(units) == "HELLO CAT"


def test_missing_evaluation_set_names_the_folder_and_what_is_there(tmp_path):
    root = write_manifests(tmp_path / "ls", {k: SETS[k] for k in ("train", "dev_other")})
    with pytest.raises(FileNotFoundError, match=r"dev_clean\.tsv: no such manifest .*"
                                                r"\['dev_other', 'train'\]"):
        asr.asr_data(_config(root), _audio_backbone())


def _audio_backbone():
    from helpers import tiny_config
    return tiny_config("audio", "tiny_v2")


def test_token_budget_batches_have_the_rows_that_fit(tmp_path):
    """fairseq's max_tokens: a batch of bucket S has (max_tokens // S) rows, a
    multiple of data.batch_size, at least batch_size."""
    root = write_manifests(tmp_path / "ls")
    data = asr.asr_data(_config(root, **{"data.max_tokens": 20_000, "data.batch_size": 2,
                                          "data.buckets": (3200, 6400)}), _audio_backbone())
    assert data.rows_for(3200, 2) == 6 and data.rows_for(6400, 2) == 2
    assert data.rows_for(30_000, 2) == 2  # never fewer than batch_size
    for batch, _ in zip(data.train_batches(2, seed=0), range(6)):
        s = batch["audio"].shape[1]
        assert batch["audio"].shape[0] == data.rows_for(s, 2)
        assert batch["audio"].shape[0] * s <= 20_000 or batch["audio"].shape[0] == 2


def test_ltr_shorter_than_its_manifest_is_one_error_line_nothing_written(tmp_path, capsys):
    root = write_manifests(tmp_path / "ls")
    (tmp_path / "ls" / "train.ltr").write_text("H E L L O |\n")  # 1 line for 3 files
    work = tmp_path / "run"
    code = finetune_main(["finetune", "--config=experiments/finetune.py:librispeech_10m",
                          f"--workdir={work}", f"--config.data.path={root}",
                          "--config.backbone=experiments/audio.py:tiny_v2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not work.exists()
    assert err[0].startswith("error: ") and "train.ltr has 1 transcript lines" in err[0]
    assert "lists 3 audio files" in err[0]


@pytest.mark.slow  # a short CTC fine-tune of a tiny speech model
def test_librispeech_protocol_reports_wer_and_cer_of_each_set(tmp_path):
    root = write_manifests(tmp_path / "ls")
    backbone = tmp_path / "tiny_audio.py"
    backbone.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                        "import helpers\n\ndef get_config(arg=None):\n"
                        "    return helpers.tiny_config('audio', 'tiny_v2')\n")
    work = tmp_path / "run"
    argv = ["finetune", "--config=experiments/finetune.py:librispeech_1h", f"--workdir={work}",
            f"--config.data.path={root}", f"--config.backbone={backbone}:tiny",
            "--config.train.num_steps=2", "--config.optim.freeze_finetune_updates=1",
            "--config.data.max_tokens=12000", "--config.data.batch_size=2",
            "--config.data.buckets=(6400,)", "--config.masking.mask_channel_length=4"]
    assert finetune_main(argv) == 0
    r = json.load(open(work / "results.json"))
    m = r["metrics"]
    assert r["headline"] == "cer" and r["num_steps"] == 2
    for name in ("dev_other", "dev_clean", "test_clean", "test_other"):
        assert m[f"wer_{name}"] >= 0 and m[f"cer_{name}"] >= 0
    assert m["wer"] == m["wer_dev_other"] and m["cer"] == m["cer_dev_other"]
    assert [e["reference"] for e in r["examples"]] == ["GO HOME"]
