"""Randomized SMILES enumeration (Bjerrum 2017; Arus-Pous et al. 2019): the same
molecule written from a random start atom along a random traversal, as data
augmentation for SMILES pretraining and fine-tuning.

`random_smiles(mol, seed)` is RDKit's `MolToSmiles(mol, doRandom=True,
canonical=False)` drawn from a generator seeded per call
(`Chem.MolToRandomSmilesVect(mol, 1, randomSeed=seed)`). RDKit keeps that
generator process-global, so the seeding and the draw happen under one lock:
with grain's read threads each example's string depends on its own seed
only, never on which thread ran first.

`SmilesEnumerator` turns that into a per-example draw: with probability
`probability` (seeded by (seed, epoch, index), `data.rng.example_rng`) an
example's SMILES is replaced by a random one; a random SMILES is usually a
little longer than the canonical one (more ring-closure digits and branches),
so one that does not fit the row (`max_tokens`) is redrawn up to `tries`
times and, failing that, the example keeps its canonical tokens, never a cut
molecule. A draw is also redrawn if it has a token the vocabulary lacks that
the canonical SMILES does not have (e.g. `[C@@H]` where the corpus only had
`[C@H]`): its backoff would drop the stereo, i.e. change the molecule.
Evaluation never calls it: test rows stay canonical.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from d2v_jax.data.rng import example_rng
from d2v_jax.errors import ConfigError
from d2v_jax.modalities.text.tokenizer import smiles_tokens

ENUMERATE_STREAM = 3  # random stream of the enumeration draws (masks: 1, crops: 2)
_RDKIT_RANDOM = threading.Lock()


def random_smiles(mol, seed: int) -> str:
    """A random (non-canonical) SMILES of `mol`, a function of `seed` (>= 1)."""
    from rdkit import Chem

    with _RDKIT_RANDOM:
        return Chem.MolToRandomSmilesVect(mol, 1, randomSeed=int(seed))[0]


def check_smiles(smiles: str, parse: bool) -> str | None:
    """None if `smiles` is valid, else the reason: the tokenizer regex must cover it
    exactly and, with `parse`, RDKit must read it as a molecule."""
    if not smiles:
        return "empty SMILES"
    try:
        smiles_tokens(smiles)
    except ValueError as e:
        return str(e)
    if parse:
        from rdkit import Chem, RDLogger
        RDLogger.DisableLog("rdApp.*")  # the reason is reported by us, once
        if Chem.MolFromSmiles(smiles) is None:
            return f"RDKit cannot parse SMILES {smiles!r}"
    return None


def check_enumerate(probability: float, tries: int, field: str = "data") -> None:
    if not 0.0 <= float(probability) <= 1.0:
        raise ConfigError(f"config.{field}.smiles_enumerate={probability} must be a probability "
                          "in [0, 1] (0 = canonical SMILES only)")
    if int(tries) < 1:
        raise ConfigError(f"config.{field}.smiles_enumerate_tries={tries} must be >= 1")


class SmilesEnumerator:
    """Per-example random SMILES tokens of `smiles[index]`, or None (keep canonical).

    `max_tokens`: the most tokens a SMILES may have to fit the row (without
    <s> / </s>). Counters `drawn`, `kept_canonical` (no fitting draw in `tries`)
    say how often each happened in this process.
    """

    def __init__(self, smiles: Sequence[str], tokenizer, max_tokens: int, probability: float,
                 tries: int, seed: int):
        check_enumerate(probability, tries)
        self.smiles = list(smiles)
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        self.probability = float(probability)
        self.tries = int(tries)
        self.seed = int(seed)
        self._mols: dict[int, object] = {}
        self._unknown: dict[int, set[str]] = {}  # canonical SMILES' out-of-vocabulary tokens
        self.drawn = 0
        self.kept_canonical = 0

    def _out_of_vocabulary(self, tokens: Sequence[str]) -> set[str]:
        ids = self.tokenizer.ids
        return {t for t in tokens if t not in ids}

    def _mol(self, index: int):
        mol = self._mols.get(index)
        if mol is None:
            from rdkit import Chem
            mol = self._mols[index] = Chem.MolFromSmiles(self.smiles[index])
        return mol

    def draw(self, index: int, epoch: int) -> np.ndarray | None:
        """Token ids of a random SMILES of example `index` in `epoch`, or None
        (not drawn this time, or no draw fitted: the caller keeps the canonical row)."""
        if self.probability <= 0.0:
            return None
        rng = example_rng(self.seed, epoch, index, ENUMERATE_STREAM)
        if rng.random() >= self.probability:
            return None
        mol = self._mol(index)
        if mol is None:  # validated upstream; a string RDKit cannot read stays as it is
            return None
        if index not in self._unknown:
            self._unknown[index] = self._out_of_vocabulary(smiles_tokens(self.smiles[index]))
        for seed in rng.integers(1, 2**31 - 1, size=self.tries):
            tokens = smiles_tokens(random_smiles(mol, int(seed)))
            if (len(tokens) <= self.max_tokens
                    and self._out_of_vocabulary(tokens) <= self._unknown[index]):
                self.drawn += 1
                return self.tokenizer.encode_tokens(tokens)
        self.kept_canonical += 1
        return None
