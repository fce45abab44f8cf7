"""The packaged peptide task (`amp`: a protein task from a package that
ships labeled protein data): modlAMP's AMPvsUniProt.csv read independently here,
its repeats and label conflicts, the protein backbone's rows, the pretraining
holdout (the k-mer composition baselines: tests/test_baselines.py)."""

import collections
import csv
import importlib.util
import os

import pytest

from d2v_jax import finetune
from d2v_jax.config import load_config, validate
from d2v_jax.finetune import make_labeled_data
from d2v_jax.modalities.text import data as text_data
from d2v_jax.modalities.text import labeled as text_labeled

from helpers import FINETUNE, tiny_config

AMP_CSV = os.path.join(list(importlib.util.find_spec("modlamp").submodule_search_locations)[0],
                       "data", "AMPvsUniProt.csv")


def _file_rows():
    """(line number, sequence, label) of every data row, read with the csv module."""
    with open(AMP_CSV, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][2:] == ["UniProt", "AMP"]  # header: n, 1, name of 0, name of 1
    return [(i + 1, r[0].strip(), int(r[1])) for i, r in enumerate(rows) if i and r]


def test_amp_set_keeps_each_sequence_once_and_drops_label_conflicts():
    rows = _file_rows()
    labels = collections.defaultdict(set)
    for _, seq, y in rows:
        labels[seq].add(y)
    texts, names, origins = text_labeled.amp_set()
    conflicted = {s for s, ys in labels.items() if len(ys) == 2}
    assert len(rows) == 5200 and len(conflicted) == 22
    assert len(texts) == len(set(texts)) == len(labels) - len(conflicted) == 4620
    assert not set(texts) & conflicted
    first_line = {}
    for line, seq, _ in rows:
        first_line.setdefault(seq, line)
    for t, n, o in zip(texts, names, origins):
        assert n == ("UniProt", "AMP")[labels[t].pop() if len(labels[t]) == 1 else -1]
        assert o == f"modlamp AMPvsUniProt.csv:{first_line[t]}"
    assert collections.Counter(names) == {"AMP": 2540, "UniProt": 2080}


def test_amp_finetune_rows_are_the_residues_and_need_a_protein_backbone(tmp_path):
    bconfig = text_data.prepare(tiny_config("molecules", "tiny_v2_protein", **{
        "data.source": "proteome", "data.max_len": 48, "model.max_positions": 48}),
        str(tmp_path / "pre"))
    config = load_config(f"{FINETUNE}:amp", {"data.label_fraction": 0.05})
    assert config.task == "classification" and config.backbone.endswith("tiny_v2_protein")
    data = make_labeled_data(config, bconfig)
    texts = text_labeled.amp_set()[0]
    assert data.class_names == ["AMP", "UniProt"] and len(data.test) == 924
    assert len(data.train) == round(0.05 * 3696)
    tok = text_data.tokenizer_for(bconfig)
    for i in (int(data.test[0]), int(data.train[0])):
        row = data.eval_transform(data.source[i])
        n = int((~row["padding_mask"]).sum())
        body = min(len(texts[i]), 46)  # longer peptides keep their first 46 residues
        assert n == body + 2 and tok.decode(row["tokens"][1:n - 1]) == texts[i][:body]
    smiles_backbone = text_data.prepare(tiny_config("molecules", **{"data.source": "chembl"}),
                                        str(tmp_path / "smiles"))
    with pytest.raises(ValueError, match=r"data\.source='amp' needs a protein tokenizer; "
                                         r"the backbone's .* is 'smiles'"):
        make_labeled_data(config, smiles_backbone)


def test_pretraining_on_amp_holds_out_exactly_the_finetune_test_peptides(tmp_path):
    pre = tiny_config("molecules", "tiny_v2_protein", **{
        "data.source": "amp", "data.extra_sources": ("proteome",),
        "data.holdout_fraction": 0.2, "data.max_len": 48, "model.max_positions": 48})
    validate(pre)
    pre = text_data.prepare(pre, str(tmp_path / "pre"))
    corpus = text_data.read_corpus(pre)
    ft = load_config(f"{FINETUNE}:amp", {})
    data = make_labeled_data(ft, pre)
    texts = text_labeled.amp_set()[0]
    test = {texts[i] for i in data.test}
    kept = set(corpus.texts)
    assert len(test) == 924 and not test & kept
    assert set(texts) - test <= kept  # every other peptide is pretraining text
    assert finetune.held_out_of_pretraining(ft, pre, data) is True
