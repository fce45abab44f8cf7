r"""data2vec text pretraining: a RoBERTa-style Transformer, data2vec 1.0 or 2.0.

`arg` is `<size>_<version>` with size in {tiny, base} and version in {v1, v2}:

  python -m d2v_jax.train --config experiments/text.py:tiny_v2 --workdir runs/text

`tiny` trains on the English of CPython's packaged reference manual
(`pydoc_data.topics`, no download) on a laptop CPU in minutes; `base` carries the
numbers of SPEC.md (sections 2-7) and reads your corpus:
`--config.data.source=text --config.data.path=/data/corpus/*.txt`.

A byte-level BPE tokenizer is trained on the corpus at the start of a run and
saved in `<workdir>/tokenizer/` (`--config.tokenizer.path` reuses one);
`model.vocab_size` is taken from it. `experiments/molecules.py` builds on
`build_config` below for SMILES and proteins.
"""

import os
import sys

import ml_collections
from ml_collections import config_dict

# Experiment files are loaded by path, not as a package: import the shared
# sections (experiments/common.py) from this folder.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)
import common  # noqa: E402

_SIZES = {
    #        dim, depth, heads
    "tiny": (128, 4, 4),
    "base": (768, 12, 12),
}


def parse_arg(arg: str, file: str, variants: tuple[str, ...] = ()) -> tuple[str, str, str]:
  """`<size>_<version>[_<variant>]` -> (size, version, variant or "")."""
  parts = (arg or "tiny_v2").split("_")
  ok = (len(parts) in (2, 3) and parts[0] in _SIZES and parts[1] in ("v1", "v2")
        and (len(parts) == 2 or parts[2] in variants))
  if not ok:
    extra = f"[_<variant>] with variant in {list(variants)}" if variants else ""
    raise ValueError(
        f"{file}: bad config arg {arg!r}; expected <size>_<version>{extra} with size in "
        f"{sorted(_SIZES)} and version in ['v1', 'v2'], e.g. 'tiny_v2'.")
  return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def build_config(size: str, version: str) -> ml_collections.ConfigDict:
  """The text recipe; the molecular experiments change data and tokenizer only."""
  dim, depth, heads = _SIZES[size]
  tiny, v1 = size == "tiny", version == "v1"

  c = ml_collections.ConfigDict()
  c.modality = "text"  # text, SMILES and proteins share the model
  c.version = version
  c.seed = 0

  # --- tokenizer (trained on the corpus, saved in the work dir) ---------------
  c.tokenizer = tk = ml_collections.ConfigDict()
  tk.kind = "bpe"  # bpe (byte-level, Hugging Face tokenizers) | smiles | protein
  tk.vocab_size = 2000 if tiny else 50265  # BPE target size (RoBERTa's 50k for base)
  tk.min_frequency = 2
  tk.path = ""  # "" = <workdir>/tokenizer; reloaded from there when present

  # --- model (SPEC 6, 7) --------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = config_dict.placeholder(int)  # set from the tokenizer, never by hand
  m.max_positions = 64 if tiny else 512  # learned positions
  m.dim = dim
  m.depth = depth
  m.num_heads = heads
  m.mlp_ratio = 4.0
  m.qkv_bias = True
  m.norm_eps = 1e-5  # post-LN blocks and the embedding LN (RoBERTa)
  m.dropout = 0.0 if tiny else 0.1
  m.attn_dropout = 0.0 if tiny else 0.1
  m.drop_path = 0.0
  m.remat = "none"  # none | block | full
  m.attention_impl = config_dict.placeholder(str)  # None (auto) | xla | cudnn
  m.dtype = "float32"  # compute dtype (float32 | bfloat16); params and EMA stay float32

  # --- 2.0 conv decoder (SPEC 6): 1-D over the sequence -------------------------
  c.decoder = d = ml_collections.ConfigDict()
  d.dim = 64 if tiny else 768
  d.kernel = 5 if tiny else 9
  d.layers = 2 if tiny else 5
  d.groups = 1
  d.residual = True
  d.conv_impl = "dense" if tiny else "xla"  # groups=1: every impl is one plain conv
  d.mask_noise_std = 0.01

  # --- targets (SPEC 2) -----------------------------------------------------------
  c.target = t = ml_collections.ConfigDict()
  if v1:  # top 10 of 12 blocks, LN per layer, no final norm
    t.top_k = depth - 1 if tiny else 10
    t.layer_norm, t.final_norm = "layer", "none"
  else:  # all blocks, instance norm per layer, no final norm
    t.top_k = depth
    t.layer_norm, t.final_norm = "instance", "none"
  t.eps = 1e-5

  # --- loss (SPEC 3) --------------------------------------------------------------
  c.loss = l = ml_collections.ConfigDict()
  if v1:
    l.beta, l.scale = 4.0, 1.0  # smooth-L1 beta 4, scale 1
  else:
    l.beta, l.scale = 0.0, config_dict.placeholder(float)  # L2, 1/sqrt(D)
  l.cls_weight = 0.0  # no CLS loss for text
  l.cls_reduction = "sum"

  # --- EMA teacher (SPEC 4) -------------------------------------------------------
  c.ema = e = ml_collections.ConfigDict()
  if v1:
    e.start, e.end, e.anneal_steps = 0.999, 0.9999, 300_000
  else:
    e.start, e.end, e.anneal_steps = 0.9999, 0.99999, 100_000
  if tiny:  # a teacher that moves within a few hundred steps
    e.start, e.end, e.anneal_steps = 0.996, 0.9998, 400
  # The teacher uses the student's embeddings (token, position, LN); only the
  # Transformer blocks are EMA (SPEC 4, fairseq ema_encoder_only).
  e.shared = ("frontend",)

  # --- masking (SPEC 5), drawn in the input pipeline ------------------------------
  c.masking = k = ml_collections.ConfigDict()
  if v1:
    # BERT 15% with 80/10/10; the loss counts only positions given <mask>. The
    # fairseq release: --config.masking.kind=span --config.masking.ratio=0.35.
    k.kind = "bert"  # bert | span
    k.ratio = 0.15
    k.num_clones = 1
    k.leave_unmasked_prob = 0.1
    k.random_token_prob = 0.1
    k.loss_on = "mask_token"  # mask_token | all (every chosen position)
  else:
    # 2.0: an exact count int(0.48 n) per row, M clones; masked tokens are removed.
    k.kind = "random"
    k.ratio = 0.48
    k.num_clones = 4 if tiny else 8
    k.leave_unmasked_prob = 0.0
    k.random_token_prob = 0.0
    k.loss_on = "all"
  k.span = 4  # span length for kind=span

  # --- data -------------------------------------------------------------------------
  c.data = dt = ml_collections.ConfigDict()
  # python_docs | text | chembl | smiles | proteome | fasta (d2v_jax/data/text.py)
  dt.source = "python_docs" if tiny else "text"
  dt.path = ""  # file, glob or comma-separated list for text | smiles | fasta
  dt.doc_sep = "blank"  # text files: line (one document per line) | blank (paragraphs)
  dt.smiles_column = "smiles"
  dt.on_invalid = "skip"  # skip (and count) | error (naming the line)
  dt.validate_smiles = True  # RDKit must parse every SMILES
  dt.max_len = m.max_positions  # tokens per row, <s> and </s> included
  dt.packing = "stream"  # stream | complete_doc | doc
  dt.too_long = "error"  # complete_doc/doc: error | skip | split | crop
  dt.batch_size = 32 if tiny else 256
  dt.num_workers = 0
  dt.prefetch = 2

  # --- optimizer (SPEC 7) -----------------------------------------------------------
  c.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"
  o.b1, o.b2, o.eps = 0.9, 0.98, 1e-6
  o.weight_decay = 0.01
  if v1:
    o.lr, o.clip_norm, o.warmup_steps = 2e-4, 5.0, 10_000
  else:
    o.lr, o.clip_norm, o.warmup_steps = 2e-4, 1.0, 4_000
  o.schedule = "cosine"
  o.end_lr_ratio = 0.0
  o.no_decay = ()  # biases, norms and other 1-D params never decay (SPEC 7)
  o.accum_steps = 1

  # --- run ----------------------------------------------------------------------------
  num_steps = 1_000_000
  if tiny:  # ~3 minutes on 2 CPU cores
    num_steps, o.warmup_steps, o.lr = 400, 40, 1e-3
  c.train = common.train(num_steps, log_every=20 if tiny else 100,
                         checkpoint_every=0 if tiny else 5000)

  common.add_run_sections(c, collapse_after=100 if tiny else 5000)
  return c


def get_config(arg: str = "tiny_v2") -> ml_collections.ConfigDict:
  size, version, _ = parse_arg(arg, "experiments/text.py")
  return build_config(size, version)
