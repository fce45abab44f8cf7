"""GLUE as fairseq's sentence_prediction runs it: the metrics against
scikit-learn and scipy (what fairseq's criterion calls), each task's TSV
layout, fairseq's preprocessed input0 / input1 / label folders, the
`<s> A </s></s> B </s>` rows, MNLI's matched / mismatched groups, STS-B's
regression, and bad input as one clear error."""

import json
import os

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from d2v_jax.data import fairseq_bin
from d2v_jax.errors import ConfigError, DataError
from d2v_jax.finetune import metrics
from d2v_jax.finetune.__main__ import main as finetune_main
from d2v_jax.modalities.text import glue

from helpers import finetune_config

TOL = 1e-12  # the metrics are the same formulas in float64


# --- metrics --------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 3])
def test_matthews_corrcoef_matches_sklearn(classes):
    rng = np.random.default_rng(classes)
    for _ in range(20):
        y = rng.integers(0, classes, 60)
        p = np.where(rng.uniform(size=60) < 0.6, y, rng.integers(0, classes, 60))
        assert metrics.matthews_corrcoef(y, p) == pytest.approx(matthews_corrcoef(y, p), abs=TOL)
    y = np.array([0, 1, 1, 0])
    assert metrics.matthews_corrcoef(y, np.zeros(4, int)) == matthews_corrcoef(y, np.zeros(4, int))


def test_f1_and_acc_and_f1_match_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
        assert metrics.binary_f1(y, p) == pytest.approx(f1_score(y, p), abs=TOL)
        logits = np.eye(2)[p] + 0.1
        m = metrics.extra_metrics(("acc_and_f1",), logits, y, "classification")
        assert m["acc_and_f1"] == pytest.approx((np.mean(y == p) + f1_score(y, p)) / 2, abs=TOL)
    # no positive anywhere: sklearn's zero_division default gives 0
    zeros = np.zeros(5, int)
    assert metrics.binary_f1(zeros, zeros) == f1_score(zeros, zeros, zero_division=0.0)


def test_pearson_and_spearman_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 6, 80) / 5.0  # STS-B-like scores with many ties
        p = y + rng.normal(0, 0.3, 80)
        p[:10] = np.round(p[:10], 1)
        m = metrics.extra_metrics(("pearson_and_spearman",), p, y, "regression")
        assert m["pearson"] == pytest.approx(pearsonr(p, y)[0], abs=1e-10)
        assert m["spearman"] == pytest.approx(spearmanr(p, y)[0], abs=1e-10)
        assert m["pearson_and_spearman"] == pytest.approx(
            (pearsonr(p, y)[0] + spearmanr(p, y)[0]) / 2, abs=1e-10)


# --- GLUE's TSV layouts -----------------------------------------------------------------

MNLI_TRAIN = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
              "sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label").split()
MNLI_DEV = MNLI_TRAIN[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
STSB = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
HEADERS = {"sst_2": ["sentence", "label"], "qnli": ["index", "question", "sentence", "label"],
           "rte": ["index", "sentence1", "sentence2", "label"], "sts_b": STSB,
           "mrpc": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
           "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]}


def _row(task, a, b, label, header):
    """One GLUE row of `task`: sentence(s) a (b) and label, in GLUE's column order."""
    if task == "cola":
        return ["gj04", label, "", a]
    cells = {h: "x" for h in header}
    names = {"sst_2": ("sentence", None, "label"), "qnli": ("question", "sentence", "label"),
             "rte": ("sentence1", "sentence2", "label"), "sts_b": ("sentence1", "sentence2", "score"),
             "mrpc": ("#1 String", "#2 String", "Quality"),
             "qqp": ("question1", "question2", "is_duplicate"),
             "mnli": ("sentence1", "sentence2", "gold_label")}[task]
    cells[names[0]], cells[names[2]] = a, label
    if names[1]:
        cells[names[1]] = b
    return [cells[h] for h in header]


def write_glue(root, task, rows, split="train", header=None):
    """`rows` of (a, b, label) as GLUE's `<split>.tsv` of `task` under root."""
    if header is None:
        header = ((MNLI_TRAIN if split == "train" else MNLI_DEV) if task == "mnli"
                  else HEADERS.get(task))
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, split + ".tsv"), "w") as f:
        if task != "cola":
            f.write("\t".join(header) + "\n")
        for a, b, label in rows:
            f.write("\t".join(_row(task, a, b, label, header)) + "\n")
    return str(root)


class WordTokenizer:
    """A tokenizer of the fairseq id layout (<s>=0 <pad>=1 </s>=2 <unk>=3): a
    word's id is 4 + its position in `words` (the interface glue.py uses)."""

    kind = "words"
    bos_id, pad_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, words):
        self.ids = {w: 4 + i for i, w in enumerate(words)}

    def encode_batch(self, texts):
        return [np.asarray([self.ids.get(w, 3) for w in t.split()], np.int32) for t in texts]


WORDS = "a cat sat on the mat dogs run far birds sing".split()
TOK = WordTokenizer(WORDS)


def _config(task, path, **kw):
    return finetune_config(f"glue_{task}", **{"data.path": str(path), **kw})


@pytest.mark.parametrize("task", sorted(glue.TASKS))
def test_each_task_reads_its_glue_layout_into_pair_rows(tmp_path, task):
    t = glue.TASKS[task]
    labels = ("3.2", "0.4") if t.regression else (t.classes[1], t.classes[0])
    rows = [("a cat sat", "the mat", labels[0]), ("dogs run", "far", labels[1])]
    for _, stem, _ in t.dev:
        write_glue(tmp_path, task, rows[::-1], stem)
    write_glue(tmp_path, task, rows, "train")
    g = glue.read_glue(_config(task, tmp_path), TOK)
    ids = TOK.ids
    first = [0, ids["a"], ids["cat"], ids["sat"], 2]
    if len(t.text) == 2:  # <s> A </s></s> B </s>
        first += [2, ids["the"], ids["mat"], 2]
    assert g["rows"][0].tolist() == first
    assert list(g["parts"]) == ["train"] + [group for group, _, _ in t.dev]
    assert len(g["rows"]) == 2 + 2 * len(t.dev) and g["labels"][:2] == list(labels)
    targets, names = glue._targets(t, g["labels"], g["origins"], ())
    if t.regression:
        assert names is None and targets[:2].tolist() == pytest.approx([3.2, 0.4])
    else:
        assert names == list(t.classes) and targets[:2].tolist() == [1, 0]


def test_separator_and_init_tokens_come_from_the_config(tmp_path):
    write_glue(tmp_path, "rte", [("a cat", "the mat", "entailment")], "train")
    write_glue(tmp_path, "rte", [("a cat", "the mat", "entailment")], "dev")
    g = glue.read_glue(_config("rte", tmp_path, **{"data.init_token": "",
                                                   "data.separator_token": "<s>"}), TOK)
    ids = TOK.ids
    assert g["rows"][0].tolist() == [ids["a"], ids["cat"], 2, 0, ids["the"], ids["mat"], 2]
    with pytest.raises(ConfigError, match=r"config\.data\.separator_token='<sep>'"):
        glue.read_glue(_config("rte", tmp_path, **{"data.separator_token": "<sep>"}), TOK)


def test_qqp_drops_rows_without_six_fields_as_the_official_script(tmp_path):
    write_glue(tmp_path, "qqp", [("a cat", "sat", "1"), ("dogs", "run", "0")], "train")
    with open(tmp_path / "train.tsv", "a") as f:
        f.write("7\t1\t2\ta broken row\n")
    write_glue(tmp_path, "qqp", [("a", "cat", "0")], "dev")
    g = glue.read_glue(_config("qqp", tmp_path), TOK)
    assert len(g["parts"]["train"]) == 2


def test_bad_glue_input_names_file_line_and_task(tmp_path):
    write_glue(tmp_path / "cols", "rte", [("a", "b", "entailment")], "train",
               header=["index", "sentence1", "hypothesis", "label"])
    with pytest.raises(DataError, match=r"train\.tsv: no column 'sentence2' .*GLUE RTE"):
        glue.read_glue(_config("rte", tmp_path / "cols"), TOK)
    write_glue(tmp_path / "lab", "mnli", [("a", "b", "maybe")], "train")
    rows = [("a cat", "sat", "entailment")]
    for stem in ("dev_matched", "dev_mismatched"):
        write_glue(tmp_path / "lab", "mnli", rows, stem)
    g = glue.read_glue(_config("mnli", tmp_path / "lab"), TOK)
    with pytest.raises(DataError, match=r"train\.tsv:2: GLUE MNLI label 'maybe' is not one of"):
        glue._targets(g["task"], g["labels"], g["origins"], ())
    with open(tmp_path / "lab" / "train.tsv", "a") as f:
        f.write("too\tfew\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: 2 fields, expected 12"):
        glue.read_glue(_config("mnli", tmp_path / "lab"), TOK)


# --- fairseq's preprocessed folders ----------------------------------------------------------


def write_fairseq_glue(root, task, split_rows, label_symbols=None):
    """preprocess_GLUE_tasks.sh's output: input0/ (input1/) and label/ with
    dict.txt and <split>.bin / .idx, records ending in </s> (id 2)."""
    t = glue.TASKS[task]
    for k in range(len(t.text)):
        d = os.path.join(root, f"input{k}")
        os.makedirs(d, exist_ok=True)
        fairseq_bin.write_dictionary(os.path.join(d, "dict.txt"), [str(i) for i in range(len(WORDS))])
    os.makedirs(os.path.join(root, "label"), exist_ok=True)
    if not t.regression:
        fairseq_bin.write_dictionary(os.path.join(root, "label", "dict.txt"), label_symbols)
    for split, rows in split_rows.items():
        for k in range(len(t.text)):
            fairseq_bin.write_indexed(os.path.join(root, f"input{k}", split),
                                      [np.append(TOK.encode_batch([r[k]])[0], 2) for r in rows])
        if t.regression:
            with open(os.path.join(root, "label", split + ".label"), "w") as f:
                f.write("".join(f"{float(r[-1]) / 5}\n" for r in rows))
        else:
            ids = {s: 4 + i for i, s in enumerate(label_symbols)}
            fairseq_bin.write_indexed(os.path.join(root, "label", split),
                                      [np.array([ids[r[-1]], 2]) for r in rows])
    return str(root)


class DictTokenizer(WordTokenizer):
    kind = "gpt2"

    def __init__(self, dict_txt):
        super().__init__(WORDS)
        self.dictionary = fairseq_bin.read_dictionary(dict_txt)


def test_fairseq_preprocessed_folders_read_as_the_task_does(tmp_path):
    rows = {"train": [("a cat", "sat", "not_entailment"), ("dogs run", "far", "entailment")],
            "valid": [("the mat", "a", "entailment")]}
    # fairseq's label dict.txt is in frequency order: ids follow GLUE's class order here
    root = write_fairseq_glue(tmp_path / "RTE-bin", "rte", rows, ["not_entailment", "entailment"])
    tok = DictTokenizer(os.path.join(root, "input0", "dict.txt"))
    g = glue.read_glue(_config("rte", root), tok)
    ids = TOK.ids
    assert g["rows"][0].tolist() == [0, ids["a"], ids["cat"], 2, 2, ids["sat"], 2]
    assert g["labels"] == ["not_entailment", "entailment", "entailment"]
    targets, names = glue._targets(g["task"], g["labels"], g["origins"], ())
    assert names == ["entailment", "not_entailment"] and targets.tolist() == [1, 0, 0]
    # another dictionary: the ids would mean other tokens
    with pytest.raises(ConfigError, match=r"input0/dict\.txt: the preprocessed ids"):
        glue.read_glue(_config("rte", root), TOK)
    # STS-B: label/<split>.label floats, already / 5 by the script
    sts = write_fairseq_glue(tmp_path / "STS-B-bin", "sts_b",
                             {"train": [("a", "cat", "4.0")], "valid": [("sat", "on", "2.5")]})
    g = glue.read_glue(_config("sts_b", sts), DictTokenizer(os.path.join(sts, "input0", "dict.txt")))
    assert [float(v) for v in g["labels"]] == pytest.approx([0.8, 0.5])


# --- through the CLI -------------------------------------------------------------------------


def _rows(n, seed, task):
    rng = np.random.default_rng(seed)
    t = glue.TASKS[task]
    out = []
    for _ in range(n):
        a = " ".join(rng.choice(WORDS, rng.integers(2, 6)))
        b = " ".join(rng.choice(WORDS, rng.integers(2, 6)))
        label = f"{rng.uniform(0, 5):.2f}" if t.regression else str(rng.choice(t.classes))
        out.append((a, b, label))
    return out


def _tiny_text_backbone(tmp_path):
    path = tmp_path / "tiny_text.py"
    path.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                    "import helpers\n\ndef get_config(arg=None):\n"
                    "    return helpers.tiny_config('text', 'tiny_v2')\n")
    return f"{path}:tiny"


@pytest.mark.slow  # two short fine-tunes (scratch tiny text model, own tokenizer)
def test_glue_mnli_and_sts_b_run_with_their_metrics(tmp_path):
    mnli = tmp_path / "MNLI"
    write_glue(mnli, "mnli", _rows(24, 0, "mnli"), "train")
    write_glue(mnli, "mnli", _rows(6, 1, "mnli"), "dev_matched")
    write_glue(mnli, "mnli", _rows(4, 2, "mnli"), "dev_mismatched")
    common = ["--config.train.num_steps=3", "--config.optim.warmup_steps=1",
              "--config.data.batch_size=8", "--config.data.too_long=truncate",
              f"--config.backbone={_tiny_text_backbone(tmp_path)}"]
    assert finetune_main(["finetune", "--config=experiments/finetune.py:glue_mnli",
                          f"--workdir={tmp_path / 'run_mnli'}", f"--config.data.path={mnli}"]
                         + common) == 0
    r = json.load(open(tmp_path / "run_mnli" / "results.json"))
    m = r["metrics"]
    assert r["headline"] == "accuracy_matched" and r["num_test"] == 10
    assert m["accuracy"] == pytest.approx(0.6 * m["accuracy_matched"]
                                          + 0.4 * m["accuracy_mismatched"])
    assert r["class_names"] == ["entailment", "neutral", "contradiction"]
    sts = tmp_path / "STS-B"
    write_glue(sts, "sts_b", _rows(24, 3, "sts_b"), "train")
    write_glue(sts, "sts_b", _rows(8, 4, "sts_b"), "dev")
    assert finetune_main(["finetune", "--config=experiments/finetune.py:glue_sts_b",
                          f"--workdir={tmp_path / 'run_sts'}", f"--config.data.path={sts}"]
                         + common) == 0
    r = json.load(open(tmp_path / "run_sts" / "results.json"))
    assert r["kind"] == "regression" and r["headline"] == "pearson_and_spearman"
    assert -1 <= r["metrics"]["pearson"] <= 1 and -1 <= r["metrics"]["spearman"] <= 1


def test_glue_bad_columns_are_one_error_line_and_nothing_is_written(tmp_path, capsys):
    write_glue(tmp_path / "RTE", "rte", _rows(6, 0, "rte"), "train",
               header=["index", "premise", "hypothesis", "label"])
    write_glue(tmp_path / "RTE", "rte", _rows(2, 1, "rte"), "dev")
    work = tmp_path / "run"
    code = finetune_main(["finetune", "--config=experiments/finetune.py:glue_rte",
                          f"--workdir={work}", f"--config.data.path={tmp_path / 'RTE'}",
                          f"--config.backbone={_tiny_text_backbone(tmp_path)}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not work.exists()
    assert err[0].startswith("error: ") and "no column 'sentence1'" in err[0] and "RTE" in err[0]


def test_a_byte_order_mark_before_the_header_is_ignored(tmp_path):
    """GLUE's MRPC files start with one (the official script cuts by position)."""
    for split in ("train", "dev"):
        write_glue(tmp_path, "mrpc", [("a cat", "sat", "1")], split)
        path = tmp_path / f"{split}.tsv"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    g = glue.read_glue(_config("mrpc", tmp_path), TOK)
    assert g["labels"] == ["1", "1"]


# --- the official vocabulary's layout (GPT-2 BPE + fairseq dict.txt) -------------------------


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    from gpt2_helpers import write_gpt2_files

    return write_gpt2_files(str(tmp_path_factory.mktemp("gpt2")))


RTE_ROWS = {"train": [("Return the file name.", "Open a socket.", "not_entailment"),
                      ("Read the JSON file.", "Write a CSV row.", "entailment")] * 4,
            "valid": [("Close the file.", "Send bytes to the host.", "entailment")] * 2}


def _preprocessed_rte(root, tok, dict_txt):
    """What preprocess_GLUE_tasks.sh makes: GPT-2 BPE ids mapped through dict.txt
    (+ </s>) in input0 / input1, labels through a label dictionary."""
    for k in (0, 1):
        os.makedirs(os.path.join(root, f"input{k}"))
        with open(dict_txt) as src, open(os.path.join(root, f"input{k}", "dict.txt"), "w") as dst:
            dst.write(src.read())
    os.makedirs(os.path.join(root, "label"))
    fairseq_bin.write_dictionary(os.path.join(root, "label", "dict.txt"),
                                 ["entailment", "not_entailment"])
    for split, rows in RTE_ROWS.items():
        for k in (0, 1):
            fairseq_bin.write_indexed(os.path.join(root, f"input{k}", split),
                                      [np.append(ids, tok.eos_id)
                                       for ids in tok.encode_batch([r[k] for r in rows])])
        fairseq_bin.write_indexed(os.path.join(root, "label", split),
                                  [np.array([4 + ["entailment", "not_entailment"].index(r[2]), 2])
                                   for r in rows])
    return str(root)


def test_tsv_and_preprocessed_folders_give_the_same_rows_with_gpt2_bpe(tmp_path, gpt2_files):
    from d2v_jax.modalities.text.gpt2 import Gpt2Tokenizer

    tok = Gpt2Tokenizer.from_files(gpt2_files["encoder_json"], gpt2_files["vocab_bpe"],
                                   gpt2_files["dict"])
    tsv = tmp_path / "RTE"
    write_glue(tsv, "rte", RTE_ROWS["train"], "train")
    write_glue(tsv, "rte", RTE_ROWS["valid"], "dev")
    binned = _preprocessed_rte(tmp_path / "RTE-bin", tok, gpt2_files["dict"])
    a = glue.read_glue(_config("rte", tsv), tok)
    b = glue.read_glue(_config("rte", binned), tok)
    assert [r.tolist() for r in a["rows"]] == [r.tolist() for r in b["rows"]]
    assert a["labels"] == b["labels"] and a["parts"]["dev"].tolist() == b["parts"]["dev"].tolist()
    assert a["parts"]["dev"].tolist() == [8, 9]
    row = a["rows"][0].tolist()  # <s> A </s></s> B </s> in fairseq's ids: <s>=0, </s>=2
    first = tok.encode_batch(["Return the file name."])[0].tolist()
    assert row[:len(first) + 3] == [0] + first + [2, 2] and row[-1] == 2


@pytest.mark.slow  # a short run from fairseq's preprocessed folder, GPT-2 vocabulary backbone
def test_glue_rte_from_a_preprocessed_folder_with_the_official_vocabulary_layout(tmp_path,
                                                                                 gpt2_files):
    from d2v_jax.modalities.text.gpt2 import Gpt2Tokenizer

    tok = Gpt2Tokenizer.from_files(gpt2_files["encoder_json"], gpt2_files["vocab_bpe"],
                                   gpt2_files["dict"])
    root = _preprocessed_rte(tmp_path / "RTE-bin", tok, gpt2_files["dict"])
    backbone = tmp_path / "tiny_gpt2.py"
    backbone.write_text(
        f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\nimport helpers\n\n"
        "def get_config(arg=None):\n    return helpers.tiny_config('text', 'tiny_v2', **{"
        f"'tokenizer.kind': 'gpt2', 'tokenizer.encoder_json': {gpt2_files['encoder_json']!r}, "
        f"'tokenizer.vocab_bpe': {gpt2_files['vocab_bpe']!r}, "
        f"'tokenizer.dict': {gpt2_files['dict']!r}, "
        "'model.max_positions': 64, 'data.max_len': 64})\n")
    work = tmp_path / "run"
    assert finetune_main(["finetune", "--config=experiments/finetune.py:glue_rte",
                          f"--workdir={work}", f"--config.data.path={root}",
                          f"--config.backbone={backbone}:tiny", "--config.train.num_steps=2",
                          "--config.optim.warmup_steps=1", "--config.data.batch_size=8"]) == 0
    r = json.load(open(work / "results.json"))
    assert r["num_labels"] == 8 and r["num_test"] == 2
    assert r["class_names"] == ["entailment", "not_entailment"] and r["headline"] == "accuracy"
