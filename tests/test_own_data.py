"""Your own data: class folders, TSV and CSV files a new user
brings. Pretraining on the fine-tune's own folder / file holds out exactly the
fine-tune's test rows; scratch runs build the architecture they are told (or
refuse); the small-data recipes; the image eval crop and the audio crop
placement."""

import os

import jax
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from d2v_jax import errors, finetune
from d2v_jax.api import save_checkpoint
from d2v_jax.config import load_config, validate
from d2v_jax.finetune import make_labeled_data
from d2v_jax.finetune.config import num_steps
from d2v_jax.modalities.audio import data as audio_data
from d2v_jax.modalities.audio import labeled as audio_labeled
from d2v_jax.modalities.image import labeled as image_labeled
from d2v_jax.modalities.text import data as text_data
from d2v_jax.modalities.text import labeled as text_labeled

from helpers import (AUDIO, FINETUNE, IMAGE, MOLECULES, TEXT, flat, init_state, tiny_config,
                     write_text, write_wav_class_folders)
from helpers import finetune_config as _ft

# --- the user's files -------------------------------------------------------------------
# A TSV with an extra column, labels in unsorted order, imbalanced classes (7 / 5 / 4).
REVIEWS = {
    "good": ["a lovely warm soup with fresh bread", "friendly staff and a quiet room",
             "the cake was light and sweet", "great coffee, great view",
             "we will come back next spring", "kind waiter, fair prices",
             "the garden terrace is a delight"],
    "bad": ["cold fries and a long wait", "the table was sticky", "rude answer at the desk",
            "far too loud to talk", "the fish tasted old"],
    "meh": ["it was fine i guess", "nothing special about the pasta",
            "average tea in an average cup", "ok for a quick stop"],
}
MOLS = ["CCO", "CCCO", "CCCCO", "c1ccccc1O", "CC(=O)OC", "CCN(CC)CC", "ClC(Cl)Cl", "C1CCOC1",
        "CC(C)(C)O", "OCC(O)CO", "N#CCC#N", "c1ccc2ccccc2c1", "CCOC(=O)C", "CS(C)=O", "OC(=O)CCC(=O)O",
        "Cc1ccccc1"]


def _reviews_tsv(tmp_path) -> str:
    rng = np.random.default_rng(7)
    rows = [(t, lab) for lab, texts in REVIEWS.items() for t in texts]
    lines = ["id\ttext\tlabel"] + [f"r{i}\t{t}\t{lab}" for i, (t, lab) in
                                   enumerate(rows[j] for j in rng.permutation(len(rows)))]
    lines.insert(5, "")  # a blank line: skipped by both readers
    return write_text(tmp_path / "reviews.tsv", "\n".join(lines) + "\n")


def _mols_csv(tmp_path) -> str:
    y = np.linspace(-2.0, 1.0, len(MOLS))
    return write_text(tmp_path / "mols.csv", "name,smiles,logp\n" + "".join(
        f"m{i},{s},{v:.3f}\n" for i, (s, v) in enumerate(zip(MOLS, y))))


# --- 1. holdout: the pretraining run drops exactly the fine-tune's test rows ----------------


def test_audio_folder_holdout_drops_exactly_the_finetune_test_files(tmp_path):
    root = str(tmp_path / "clips")
    files = write_wav_class_folders(root, sizes={"stop": 6, "go": 5, "yes": 4})
    pre = tiny_config("audio", **{"data.source": "audio_folder", "data.path": root,
                                  "data.holdout_fraction": 0.25, "data.holdout_seed": 3})
    validate(pre)
    kept = {os.path.realpath(os.path.join(root, p))
            for p in audio_data.AudioSource.from_config(pre).manifest.paths}
    ft = _ft("audio_folder", **{"data.path": root, "data.test_fraction": 0.25,
                                "data.split_seed": 3})
    data = make_labeled_data(ft, pre)
    test = {os.path.realpath(os.path.join(root, data.source.manifest.paths[i])) for i in data.test}
    every = {os.path.realpath(os.path.join(root, p)) for p in files}
    assert len(test) == round(0.25 * 15) and kept | test == every
    assert every - kept == test  # held out = the fine-tune's test files, no more, no fewer
    assert finetune.held_out_of_pretraining(ft, pre, data) is True
    spelt = _ft("audio_folder", **{"data.path": root + "/./", "data.test_fraction": 0.25,
                                   "data.split_seed": 3})
    assert finetune.held_out_of_pretraining(spelt, pre) is True  # the same folder
    other = _ft("audio_folder", **{"data.path": root, "data.test_fraction": 0.25,
                                   "data.split_seed": 4})
    assert finetune.held_out_of_pretraining(other, pre) is False


def test_text_tsv_holdout_drops_exactly_the_finetune_test_rows(tmp_path):
    tsv = _reviews_tsv(tmp_path)
    pre = tiny_config("text", **{"data.source": "text_tsv", "data.path": tsv,
                                 "data.holdout_fraction": 0.25, "data.holdout_seed": 2})
    validate(pre)
    pre = text_data.prepare(pre, str(tmp_path / "pre"))  # the tokenizer sees the kept rows only
    kept = text_data.read_corpus(pre).origins
    ft = _ft("text_tsv", **{"data.path": tsv, "data.test_fraction": 0.25, "data.split_seed": 2})
    data = make_labeled_data(ft, pre)
    origins = text_labeled.read_text_labels([tsv], "text", "label")[2]
    test = {origins[i] for i in data.test}
    assert len(origins) == 16 and len(test) == 4 and len(kept) == 12
    assert set(origins) - set(kept) == test
    assert finetune.held_out_of_pretraining(ft, pre, data) is True
    # A fine-tune that orders its classes otherwise splits otherwise: not held out.
    shuffled = _ft("text_tsv", **{"data.path": tsv, "data.test_fraction": 0.25,
                                  "data.split_seed": 2, "data.classes": ("meh", "good", "bad")})
    assert finetune.held_out_of_pretraining(shuffled, pre) is False


def test_smiles_csv_holdout_drops_exactly_the_finetune_test_rows(tmp_path):
    csv_path = _mols_csv(tmp_path)
    pre = tiny_config("molecules", **{"data.source": "smiles_csv", "data.path": csv_path,
                                      "data.holdout_fraction": 0.25, "data.holdout_seed": 1})
    validate(pre)
    pre = text_data.prepare(pre, str(tmp_path / "pre"))
    kept = text_data.read_corpus(pre).origins
    ft = _ft("smiles_csv", **{"data.path": csv_path, "data.target_column": "logp",
                              "data.test_fraction": 0.25, "data.split_seed": 1})
    data = make_labeled_data(ft, pre)
    origins = text_labeled.read_smiles_targets([csv_path], "smiles", "logp")[2]
    test = {origins[i] for i in data.test}
    assert len(test) == 4 and set(origins) - set(kept) == test
    assert finetune.held_out_of_pretraining(ft, pre, data) is True


def test_holdout_needs_the_labeled_set_and_is_reported_only_when_true():
    # Text tiny pretrains on pydoc topics, not on the docstrings it is probed on.
    ft = _ft("stdlib_docs")
    assert finetune.held_out_of_pretraining(ft, load_config(f"{TEXT}:tiny_v2")) is False
    held = load_config(f"{TEXT}:tiny_v2", {"data.source": "stdlib_docs",
                                           "data.holdout_fraction": 0.2})
    assert finetune.held_out_of_pretraining(ft, held) is True
    for path, overrides in ((TEXT, {}), (MOLECULES, {}), (AUDIO, {"data.source": "manifest"})):
        config = load_config(f"{path}:tiny_v2", {**overrides, "data.holdout_fraction": 0.2})
        with pytest.raises(errors.ConfigError, match=r"^config.data.holdout_fraction: 0.2 with "
                           r"data.source='(python_docs|chembl|manifest)'"):
            validate(config)


def test_extra_sources_hold_out_every_test_molecule_in_any_spelling(tmp_path):
    """Your molecules + a packaged set (`data.extra_sources`): each labeled part
    loses its own test rows, and no part keeps a molecule that is a test row of
    either (FreeSolv writes most of MOLS otherwise, e.g. phenol c1ccc(cc1)O)."""
    from rdkit import Chem

    csv_path = _mols_csv(tmp_path)
    pre = tiny_config("molecules", **{"data.source": "smiles_csv", "data.path": csv_path,
                                      "data.extra_sources": ("freesolv",),
                                      "data.holdout_fraction": 0.25, "data.holdout_seed": 1})
    validate(pre)
    pre = text_data.prepare(pre, str(tmp_path / "pre"))  # the tokenizer the fine-tunes read
    corpus = text_data.read_corpus(pre)
    ft_csv = _ft("smiles_csv", **{"data.path": csv_path, "data.target_column": "logp",
                                  "data.test_fraction": 0.25, "data.split_seed": 1})
    ft_fs = _ft("freesolv", **{"data.test_fraction": 0.25, "data.split_seed": 1,
                               "data.too_long": "truncate"})  # the tiny test rows are short

    def canon(smiles):
        return Chem.MolToSmiles(Chem.MolFromSmiles(smiles))

    expected, pools = [], []
    test_keys = set()
    for ft, (texts, _, origins) in ((ft_csv, text_labeled.read_smiles_targets([csv_path], "smiles",
                                                                                "logp")),
                                    (ft_fs, text_labeled.PACKAGED_SMILES["freesolv"]())):
        test = set(make_labeled_data(ft, pre).test.tolist())
        test_keys |= {canon(texts[i]) for i in test}
        pools.append(len(texts) - len(test))
        expected.append([(t, o) for i, (t, o) in enumerate(zip(texts, origins)) if i not in test])
        assert finetune.held_out_of_pretraining(ft, pre) is True
    expected = [(t, o) for part in expected for t, o in part if canon(t) not in test_keys]
    assert list(zip(corpus.texts, corpus.origins)) == expected
    # Both directions happen: csv pool rows that are FreeSolv test molecules, and
    # FreeSolv pool rows that are csv test molecules, are gone.
    assert pools[0] == len(MOLS) - 4
    assert sum(o.startswith(csv_path) for _, o in expected) < pools[0]
    assert sum(not o.startswith(csv_path) for _, o in expected) < pools[1]
    # A fine-tune on the other split of the extra set was not held out.
    other = _ft("freesolv", **{"data.test_fraction": 0.25, "data.split_seed": 2})
    assert finetune.held_out_of_pretraining(other, pre) is False


@pytest.mark.parametrize("extra, match", [
    (("smiles",), r"^config.data.extra_sources: \('smiles',\): each must be a packaged corpus"),
    (("chembl", "chembl"), r"^config.data.extra_sources: \('chembl', 'chembl'\) repeats"),
])
def test_extra_sources_are_checked(extra, match):
    config = load_config(f"{MOLECULES}:tiny_v2", {"data.extra_sources": extra})
    with pytest.raises(errors.ConfigError, match=match):
        validate(config)
    # ChEMBL with a labeled extra set can hold out that set's test rows.
    validate(load_config(f"{MOLECULES}:tiny_v2", {"data.extra_sources": ("freesolv",),
                                                  "data.holdout_fraction": 0.2}))


# --- 2. misspelt keys: one line naming the key and its nearest valid names -----------------


@pytest.mark.parametrize("config_arg, key, nearest", [
    (f"{IMAGE}:tiny_v2", "data.holdout_fractoin", "data.holdout_fraction"),
    (f"{AUDIO}:tiny_v2", "data.holdout_fractoin", "data.holdout_fraction"),
    (f"{TEXT}:tiny_v2", "data.holdot_seed", "data.holdout_seed"),
    (f"{MOLECULES}:tiny_v2", "data.smiles_colum", "data.smiles_column"),
    (f"{FINETUNE}:image_folder_small", "data.eval_crop_rato", "data.eval_crop_ratio"),
    (f"{FINETUNE}:audio_folder", "data.eval_corp", "data.eval_crop"),
    (f"{FINETUNE}:text_tsv", "data.text_colunm", "data.text_column"),
])
def test_misspelt_key_names_the_nearest_valid_ones(config_arg, key, nearest):
    with pytest.raises(errors.ConfigKeyError) as e:
        load_config(config_arg, {key: 1})
    assert str(e.value) == f"config has no field {key!r}" and "\n" not in str(e.value)
    assert repr(nearest) in e.value.hint


# --- 3. scratch arms: the architecture they are told, or a clear refusal -------------------


@pytest.mark.parametrize("task, example", [("image_folder", "experiments/image.py:tiny_v2"),
                                           ("audio_folder", "experiments/audio.py:tiny_v2"),
                                           ("text_tsv", "experiments/text.py:tiny_v2"),
                                           ("smiles_csv", "experiments/molecules.py:tiny_v2")])
def test_generic_scratch_without_backbone_refuses_naming_the_flag(task, example):
    for arg in (task, f"{task}_small"):
        with pytest.raises(errors.ConfigError, match=r"^config.backbone is empty: a scratch run of "
                           f"data.source='{task}'") as e:
            finetune.backbone_config_for(_ft(arg, **{"data.path": "/anything"}), None)
        assert "--config.backbone=<a pretraining work dir>" in e.value.hint
        assert example in e.value.hint


def test_text_scratch_from_an_experiment_trains_its_tokenizer_on_the_training_rows(tmp_path):
    tsv = _reviews_tsv(tmp_path)
    ft = _ft("text_tsv_small", **{"data.path": tsv, "backbone": f"{TEXT}:tiny_v2"})
    _, bconfig = finetune.backbone_config_for(ft, None)
    bconfig = finetune.prepare_backbone(bconfig, None, str(tmp_path / "ft"))
    assert bconfig.tokenizer.path == str(tmp_path / "ft" / "tokenizer")
    data = make_labeled_data(ft, bconfig)
    origins = text_labeled.read_text_labels([tsv], "text", "label")[2]
    seen = set(text_data.read_corpus(bconfig).origins)
    assert seen == {origins[i] for i in data.train_pool}  # the test rows stay unseen


def test_text_scratch_from_a_workdir_builds_that_runs_exact_shapes(tmp_path):
    tsv = _reviews_tsv(tmp_path)
    workdir = str(tmp_path / "pre")
    pre = tiny_config("text", **{"data.source": "text_tsv", "data.path": tsv,
                                 "data.holdout_fraction": 0.2, "model.dim": 48,
                                 "model.num_heads": 3})
    pre = text_data.prepare(pre, workdir)
    state = init_state(pre, jax.random.PRNGKey(0))
    save_checkpoint(workdir, state, pre)
    ft = _ft("text_tsv_small", **{"data.path": tsv, "backbone": workdir, "train.num_steps": 1,
                                  "data.batch_size": 4, "data.eval_batch_size": 4})
    run = finetune.prepare(ft, None, workdir=str(tmp_path / "ft"))
    assert run.backbone_config.tokenizer.path == os.path.join(workdir, "tokenizer")
    got = {k: v.shape for k, v in flat(run.state.params["backbone"]).items()}
    want = {k: v.shape for k, v in flat({k: state.params[k]
                                         for k in run.state.params["backbone"]}).items()}
    assert got == want and len(got) > 5
    assert got["['frontend']['token_embed']['embedding']"][1] == 48


# --- 4. small-data recipes -------------------------------------------------------------------


def test_small_recipes():
    image = _ft("image_folder_small")
    assert (image.optim.warmup_steps, image.optim.layer_decay, tuple(image.data.crop_scale),
            image.data.flip, image.data.eval_crop_ratio) == (20, 1.0, (0.6, 1.0), False, 1.0)
    big = _ft("image_folder")
    assert (big.optim.warmup_steps, big.optim.layer_decay, big.data.eval_crop_ratio) == \
        (2000, 0.65, 0.875)
    for task in ("audio_folder_small", "text_tsv_small", "smiles_csv_small"):
        c = _ft(task)
        assert (c.optim.warmup_steps, c.optim.layer_decay) == (20, 1.0), task
        # 30 epochs of 100 labels in batches of 32 = 94 steps, raised to the minimum 150;
        # 30 epochs of 1,000 = 938, cut to 400.
        assert (num_steps(c, 100), num_steps(c, 1000)) == (150, 400), task
    assert _ft("audio_folder_small").data.eval_crop == "energy"
    assert _ft("text_tsv_small_probe").mode == "linear_probe"
    with pytest.raises(ValueError, match="bad config arg 'mnist_5k_small'"):
        _ft("mnist_5k_small")


# --- 5. image eval: the whole image with eval_crop_ratio = 1.0 ------------------------------


def test_eval_crop_ratio_one_keeps_the_border(tmp_path):
    image = np.zeros((16, 16), np.uint8)
    image[0, :], image[-1, :], image[:, 0], image[:, -1] = 250, 200, 150, 100  # distinct sides
    for cls in ("a", "b"):
        os.makedirs(tmp_path / cls)
        Image.fromarray(image).save(tmp_path / cls / "x.png")
    backbone = tiny_config("image", **{"model.image_size": 16})
    want = image[..., None]  # uint8: the model normalizes on device
    for ratio in (1.0, 0.875):
        ft = _ft("image_folder_small", **{"data.path": str(tmp_path),
                                          "data.eval_crop_ratio": ratio})
        source, *_, eval_transform = image_labeled.labeled_parts(ft, backbone)
        got = eval_transform(source[0])["image"]
        if ratio == 1.0:  # the model gets every pixel, border included
            np.testing.assert_array_equal(got, want)
        else:  # resized to 18 and centre-cropped: the 1-pixel border is cut
            assert got[0, 5:11, 0].max() < 125 and got[5:11, 0, 0].max() < 75
    with pytest.raises(errors.ConfigError, match="eval_crop_ratio=1.5"):
        image_labeled.labeled_parts(_ft("image_folder", **{"data.path": str(tmp_path),
                                                           "data.eval_crop_ratio": 1.5}), backbone)


# --- 6. audio crop placement ------------------------------------------------------------------

RATE, TONE = 16_000, 4_800  # 0.3 s tone, then 1.5 s of silence


def _tone_then_silence():
    t = np.arange(TONE) / RATE
    return np.concatenate([0.5 * np.sin(2 * np.pi * 440 * t),
                           np.zeros(int(1.5 * RATE))]).astype(np.float32)


def test_energy_crop_keeps_a_word_the_centre_crop_misses():
    wav = _tone_then_silence()
    tone_energy = float(np.sum(wav[:TONE].astype(np.float64) ** 2))
    element = {"audio": wav, "index": 0}

    def crop(train, mode, epoch=0, **kw):
        t = audio_labeled.AudioFinetuneTransform(RATE, False, 0, train, mode, **kw)
        return t(element, epoch)

    centre = crop(False, "center")["audio"]
    assert np.sum(centre.astype(np.float64) ** 2) == 0  # window 0.4-1.4 s: silence only
    for mode in ("energy", "start"):
        np.testing.assert_array_equal(crop(False, mode)["audio"][:TONE], wav[:TONE])
    # Training: random windows that keep >= 90% of the best window's energy.
    for epoch in range(8):
        got = crop(True, "energy", epoch)["audio"]
        assert np.sum(got.astype(np.float64) ** 2) >= 0.9 * tone_energy - 1e-6
    random_energies = [np.sum(crop(True, "random", e)["audio"].astype(np.float64) ** 2)
                       for e in range(8)]
    assert min(random_energies) < 0.5 * tone_energy  # plain random crops lose the word
    # Trimming the trailing silence (30 dB below the peak) leaves the tone, padded.
    out = crop(False, "center", trim_db=30.0)
    loud = np.flatnonzero(np.abs(wav) >= 0.5 * 10 ** (-30 / 20))
    assert int((~out["padding_mask"]).sum()) == loud[-1] - loud[0] + 1
    np.testing.assert_array_equal(out["audio"][:loud[-1] + 1 - loud[0]],
                                  wav[loud[0]:loud[-1] + 1])
    with pytest.raises(errors.ConfigError, match="eval_crop='middle'"):
        audio_labeled.AudioFinetuneTransform(RATE, False, 0, False, "middle")


def test_audio_folder_config_reaches_the_crops(tmp_path):
    os.makedirs(tmp_path / "word")
    sf.write(tmp_path / "word" / "a.wav", _tone_then_silence(), RATE, subtype="FLOAT")
    ft = _ft("audio_folder", **{"data.path": str(tmp_path), "data.eval_crop": "energy",
                                "data.max_sample_size": RATE})
    backbone = load_config(f"{AUDIO}:tiny_v2", {"data.normalize": False})
    source, *_, eval_transform = audio_labeled.labeled_parts(ft, backbone)
    got = eval_transform(source[0])["audio"]
    assert np.abs(got[:TONE]).max() > 0.45 and eval_transform.crop == "energy"
