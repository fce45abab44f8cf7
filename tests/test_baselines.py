"""benchmarks/baselines.py: the fine-tune's exact rows, and sklearn's numbers."""

import collections
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import FINETUNE, MOLECULES, ROOT, TINY_MOLECULES, write_text

from d2v_jax.config import load_config
from d2v_jax.data.splits import label_subset, split_test
from d2v_jax.finetune import make_labeled_data
from d2v_jax.modalities.text import data as text_data

# Small molecules (not the tests' other sets), target = a made-up linear function
# of the atom counts, so the split sizes are exact and the models have signal.
SMILES = ["CCO", "CCCO", "CCCCO", "CC(C)O", "OCCO", "CCN", "CCCN", "NCCN", "CC(=O)O", "CCC(=O)O",
          "c1ccccc1", "Cc1ccccc1", "Oc1ccccc1", "Nc1ccccc1", "c1ccncc1", "C1CCCCC1", "C1CCNCC1",
          "C1CCOC1", "CC#N", "ClCCl", "FC(F)F", "BrCCBr", "CCOCC", "CCSC"]


@pytest.fixture(scope="module")
def baselines():
    spec = importlib.util.spec_from_file_location("baselines_under_test",
                                                  os.path.join(ROOT, "benchmarks", "baselines.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def mols_csv(tmp_path):
    y = [0.3 * s.count("C") - 0.7 * s.count("O") + 0.1 * i % 0.5 for i, s in enumerate(SMILES)]
    return write_text(tmp_path / "mols.csv", "smiles,y\n" + "".join(
        f"{s},{v:.4f}\n" for s, v in zip(SMILES, y))), np.array([float(f"{v:.4f}") for v in y])


def test_baseline_rows_are_the_finetunes_rows(tmp_path, baselines, mols_csv):
    path, _ = mols_csv
    bconfig = text_data.prepare(load_config(f"{MOLECULES}:tiny_v2", {
        **TINY_MOLECULES, "data.path": path}), str(tmp_path))
    over = {"data.path": path, "data.target_column": "y", "data.test_fraction": 0.25}
    task = baselines.read(load_config(f"{FINETUNE}:smiles_csv", over))
    for fraction, seed in ((0.5, 0), (0.5, 1), (1.0, 2)):
        config = load_config(f"{FINETUNE}:smiles_csv", {**over, "data.label_fraction": fraction,
                                                        "seed": seed})
        data = make_labeled_data(config, bconfig)
        train, test = baselines.splits(task, config)
        np.testing.assert_array_equal(train, data.train)
        np.testing.assert_array_equal(test, data.test)
    assert len(test) == 6 and len(baselines.splits(task, load_config(
        f"{FINETUNE}:smiles_csv", {**over, "data.label_fraction": 0.5}))[0]) == 9


def test_forest_and_ridge_are_sklearn_on_those_rows(baselines, mols_csv):
    from rdkit import Chem, DataStructs
    from rdkit.Chem import AllChem
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import RidgeCV

    path, y = mols_csv
    over = {"data.path": path, "data.target_column": "y", "data.test_fraction": 0.25}
    opts = baselines.Options(rf_trees=25, rf_jobs=1)
    runs = baselines.run(f"{FINETUNE}:smiles_csv", over, [0.5], [3], opts)
    # Independently: the splits' own functions, the legacy Morgan API, sklearn.
    pool, test = split_test(y, 0.25, seed=0, stratify=False)
    train = label_subset(y, pool, 0.5, seed=3, stratify=False)
    x = np.zeros((len(SMILES), 2048))
    for i, s in enumerate(SMILES):
        DataStructs.ConvertToNumpyArray(
            AllChem.GetMorganFingerprintAsBitVect(Chem.MolFromSmiles(s), 2, nBits=2048), x[i])
    rf = RandomForestRegressor(n_estimators=25, random_state=3).fit(x[train], y[train])
    ridge = RidgeCV(alphas=opts.ridge_alphas).fit(x[train], y[train])
    got = {r["arm"]: r for r in runs}
    assert got["rf_morgan"]["train"] == train.tolist() and got["rf_morgan"]["test"] == test.tolist()
    mean = np.full(len(test), y[train].mean())
    for arm, pred in (("rf_morgan", rf.predict(x[test])), ("ridge_morgan", ridge.predict(x[test])),
                      ("train_mean", mean)):
        err = pred - y[test]
        np.testing.assert_allclose(got[arm]["metrics"]["rmse"], np.sqrt(np.mean(err ** 2)),
                                   rtol=1e-5)
        np.testing.assert_allclose(got[arm]["metrics"]["mae"], np.mean(np.abs(err)), rtol=1e-5)


def test_tfidf_logistic_regression_on_a_text_tsv(tmp_path, baselines):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    words = {"fruit": "apple pear plum fig", "tool": "hammer saw drill wrench",
             "sea": "wave tide salt reef"}
    rows = [(f"{w} and {words[c].split()[(i + 1) % 4]} {i}", c)
            for c in words for i, w in enumerate(words[c].split() * 3)]
    path = write_text(tmp_path / "t.tsv", "text\tlabel\n" + "".join(f"{t}\t{c}\n" for t, c in rows))
    runs = baselines.run(f"{FINETUNE}:text_tsv", {"data.path": path}, [1.0], [0])
    classes = sorted(words)
    labels = np.array([classes.index(c) for _, c in rows])
    texts = np.array([t for t, _ in rows], dtype=object)
    pool, test = split_test(labels, 0.2, seed=0)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(vec.fit_transform(texts[pool]), labels[pool])
    preds = clf.predict(vec.transform(texts[test]))
    assert [r["arm"] for r in runs] == ["tfidf_lr", "majority"] and runs[0]["test"] == test.tolist()
    assert runs[0]["metrics"]["accuracy"] == pytest.approx(np.mean(preds == labels[test]))
    majority = np.argmax(np.bincount(labels[pool]))
    assert runs[1]["metrics"]["accuracy"] == pytest.approx(np.mean(labels[test] == majority))


@pytest.mark.slow
def test_cli_table_and_json(tmp_path, mols_csv):
    path, _ = mols_csv
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "baselines.py"),
                           "--finetune", f"{FINETUNE}:smiles_csv", "--overrides",
                           f"data.path={path},data.target_column=y", "--fractions", "0.5,1.0",
                           "--seeds", "0,1", "--rf_trees", "10", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| rf_morgan | 50% (10) |" in proc.stdout and "| ridge_morgan | 100% (19) |" in proc.stdout
    saved = json.loads(out.read_text())
    assert len(saved["runs"]) == 12 and saved["summary"]["rf_morgan"]["0.5"]["seeds"] == [0, 1]


def test_tasks_without_a_baseline_are_a_clear_error(baselines):
    with pytest.raises(ValueError, match=r"no baseline for the 'image' 'classification' task"):
        baselines.read(load_config(f"{FINETUNE}:mnist_5k"))


@pytest.mark.slow
def test_label_efficiency_table_has_the_baseline_rows(tmp_path, mols_csv):
    """benchmarks/label_efficiency.py's summarize / write_table on its grid plus
    `baselines.grid_rows` (in a subprocess: the script defines absl flags)."""
    path, _ = mols_csv
    code = f"""
import sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})
import baselines, label_efficiency as le
rows = baselines.grid_rows({FINETUNE + ':smiles_csv'!r}, {{'data.path': {path!r},
    'data.target_column': 'y', 'init.params': 'teacher'}}, [0.5, 1.0], [0, 1],
    baselines.Options(rf_trees=10, rf_jobs=1))
fake = [dict(arm=a, label_fraction=f, seed=s, num_labels=9, headline='rmse', metrics=dict(rmse=1.0))
        for a in ('pretrained', 'scratch') for f in (0.5, 1.0) for s in (0, 1)]
names = ['pretrained', 'scratch'] + list(dict.fromkeys(r['arm'] for r in rows))
summary = le.summarize(fake + rows, names, [0.5, 1.0])
meta = dict(seeds=[0, 1], num_test=6, pretrain_seconds=0, finetune_seconds=0, total_seconds=0,
            load_start='-', load_end='-')
print(le.write_table({str(tmp_path / 't.md')!r}, summary, 'rmse', 'T', meta))
print(baselines.grid_rows({FINETUNE + ':mnist_5k'!r}, {{}}, [0.5], [0]))
"""
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert ("| labels | pretrained rmse | scratch rmse | rf_morgan rmse | ridge_morgan rmse | "
            "train_mean rmse | pretrained - scratch |") in out
    assert "| 50% (9) | 1.000 +- 0.000 | 1.000 +- 0.000 | " in out and out.rstrip().endswith("[]")


def test_kmer_composition_by_hand(baselines):
    AMINO_ACIDS = baselines.AMINO_ACIDS
    x = baselines.kmer_composition(["ACA", "AXA", "W"], 2)
    assert x.shape == (3, 20 + 400)
    a, c, w = (AMINO_ACIDS.index(r) for r in "ACW")
    expect = np.zeros((3, 420), np.float32)
    expect[0, [a, c]] = [2 / 3, 1 / 3]                        # ACA: residues
    expect[0, [20 + 20 * a + c, 20 + 20 * c + a]] = [1 / 2, 1 / 2]  # AC, CA
    expect[1, a] = 2 / 3                                       # X is not counted, AX / XA neither
    expect[2, w] = 1.0                                         # one residue: no pairs
    np.testing.assert_allclose(x, expect, rtol=1e-6)


def test_peptide_baselines_on_the_amp_splits(baselines):
    """amp: AAC + DPC with a forest and a logistic regression, the majority class;
    the fine-tune's exact split sizes, and the majority row checked by hand."""
    from d2v_jax.modalities.text.labeled import amp_set

    config = load_config(f"{FINETUNE}:amp", {"data.label_fraction": 0.05})
    assert baselines.models_for(config) == ("rf_kmer", "lr_kmer", "majority")
    runs = baselines.run(f"{FINETUNE}:amp", {}, [0.05], [0], baselines.Options(rf_trees=50))
    by_arm = {r["arm"]: r for r in runs}
    assert set(by_arm) == {"rf_kmer", "lr_kmer", "majority"}
    assert all(r["num_labels"] == 185 and r["num_test"] == 924 for r in runs)
    names = np.array(amp_set()[1])
    task = baselines.read(config)
    train, test = baselines.splits(task, config)
    majority = collections.Counter(names[train]).most_common(1)[0][0]
    assert by_arm["majority"]["metrics"]["accuracy"] == pytest.approx(np.mean(names[test] == majority))
    # Residue composition separates antimicrobial peptides well (cationic, amphipathic).
    assert by_arm["rf_kmer"]["metrics"]["accuracy"] > 0.75
    assert by_arm["lr_kmer"]["metrics"]["accuracy"] > 0.7


def test_a_text_tsv_of_peptides_gets_the_kmer_baselines(tmp_path, baselines):
    peptides = ["KWKLFKKIGAVLKVL", "GLFDIIKKIAESF", "ALWKTMLKKLGTMAL", "FLPLIGRVLSGIL",
                "MSTNPKPQRKTKRNT", "MADQLTEEQIAEFKE", "MKVLAAGIVGLLLAA", "MSKGEELFTGVVPIL"]
    path = write_text(tmp_path / "pep.tsv", "text\tlabel\n" + "".join(
        f"{p}\t{'amp' if i < 4 else 'other'}\n" for i, p in enumerate(peptides)))
    config = load_config(f"{FINETUNE}:text_tsv", {"data.path": path, "data.test_fraction": 0.25})
    assert baselines.models_for(config) == ("tfidf_lr", "majority")  # English text by default
    assert baselines.models_for(config, "protein") == ("rf_kmer", "lr_kmer", "majority")
    runs = baselines.run(f"{FINETUNE}:text_tsv", {"data.path": path, "data.test_fraction": 0.25},
                         [1.0], [0], baselines.Options(rf_trees=10, sequences="protein"))
    assert [r["arm"] for r in runs] == ["rf_kmer", "lr_kmer", "majority"]
    assert all(r["num_labels"] == 6 and r["num_test"] == 2 for r in runs)
    with pytest.raises(ValueError, match=r"--sequences='dna'; expected one of \('auto', 'protein'\)"):
        baselines.models_for(config, "dna")
