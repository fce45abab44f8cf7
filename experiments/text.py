r"""data2vec text pretraining: a RoBERTa-style Transformer, data2vec 1.0 or 2.0.

`arg` is `<size>_<version>` with size in {tiny, base} and version in {v1, v2}:

  python -m d2v_jax.train --config experiments/text.py:tiny_v2 --workdir runs/text

`tiny` trains on the English of CPython's packaged reference manual
(`pydoc_data.topics`, no download) on a laptop CPU in minutes; `base` carries the
numbers of SPEC.md (sections 2-7) and the official recipe's data: RoBERTa's
GPT-2 vocabulary over fairseq's preprocessed corpus (docs/text.md),

  python -m d2v_jax.train --config experiments/text.py:base_v2 --workdir runs/base \
      --config.data.source=fairseq --config.data.path=/data/bookwiki-bin \
      --config.tokenizer.encoder_json=gpt2/encoder.json --config.tokenizer.vocab_bpe=gpt2/vocab.bpe

or your raw text (`--config.data.source=text --config.data.path=/data/*.txt`;
a large corpus is turned into shards once by `python -m d2v_jax.prepare`).

The run's tokenizer is saved in `<workdir>/tokenizer/` (`--config.tokenizer.path`
reuses one): a byte-level BPE trained on the corpus (tiny; base without GPT-2
files), the GPT-2 one, or the shards' own; `model.vocab_size` is taken from it.
`experiments/molecules.py` builds on `build_config` below for SMILES and proteins.
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

  # --- tokenizer (saved in the work dir) -----------------------------------------
  c.tokenizer = tk = ml_collections.ConfigDict()
  # bpe: byte-level BPE trained on the corpus (Hugging Face tokenizers) | gpt2:
  # RoBERTa's vocabulary, GPT-2 BPE through a fairseq dict.txt (the files below;
  # fairseq's ids) | smiles | protein | auto (base): gpt2 when its files or a
  # fairseq data directory are given, else bpe.
  tk.kind = "bpe" if tiny else "auto"
  tk.vocab_size = 2000 if tiny else 50265  # bpe: target size (RoBERTa's 50k for base)
  tk.min_frequency = 2
  tk.path = ""  # "" = <workdir>/tokenizer; reloaded from there when present
  tk.encoder_json = ""  # gpt2: GPT-2's encoder.json
  tk.vocab_bpe = ""  # gpt2: GPT-2's vocab.bpe (the merges)
  tk.dict = ""  # gpt2: fairseq dict.txt ("" = <data.path>/dict.txt with data.source=fairseq)

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
  # Regularization (SPEC 7): fairseq dropout (2.0: encoder_dropout, post_mlp_drop)
  # 0.1 as residual dropout and after the embedding LayerNorm, attention_dropout
  # 0.1, activation_dropout 0, no layer-drop. tiny: none (its measured recipe).
  m.dropout = 0.0 if tiny else 0.1  # residual dropout (attention projection, FFN output)
  m.activation_dropout = 0.0  # after the FFN's GELU
  m.attn_dropout = 0.0 if tiny else 0.1
  m.layerdrop = 0.0  # skip a whole block (student only)
  m.drop_path = 0.0
  # Init: fairseq init_bert_params, Linear and Embedding ~ N(0, 0.02) untruncated.
  m.init_std = 0.02
  m.init_truncation = config_dict.placeholder(float)  # in std; None = untruncated
  m.init_depth_rescale = False
  m.remat = "none"  # none | full | save_dots (= block) | save_dots_no_batch | save_bf16_dots
  # auto: cuDNN flash attention on an NVIDIA GPU (bf16/fp16), XLA elsewhere | xla | cudnn
  m.attention_impl = "auto"
  # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16;
  # params, EMA, optimizer state and the loss stay float32. The tiny CPU recipes
  # pin float32 so their measured runs are the same on any machine.
  m.dtype = "float32" if tiny else "auto"

  # --- 2.0 conv decoder (SPEC 6): 1-D over the sequence -------------------------
  c.decoder = d = ml_collections.ConfigDict()
  d.dim = 64 if tiny else 768
  d.kernel = 5 if tiny else 9
  d.layers = 2 if tiny else 5
  d.groups = 1
  # fairseq base_text_only_task.yaml: decoder_residual false, projection_layers 2,
  # projection_ratio 2.0 (Linear(D, 2D) -> GELU -> Linear(2D, D)), input_dropout
  # 0.1; the text decoder keeps init_bert_params' N(0, 0.02) projection (its
  # modality encoder never calls reset_parameters). tiny: no dropout.
  d.residual = False
  d.projection_layers = 2
  d.projection_ratio = 2.0
  d.proj_init = "normal"  # torch | normal
  # The convs: torch = PyTorch's Conv default (fairseq never re-inits them) | normal
  # = N(0, 0.02) weights, zero bias.
  d.conv_init = "torch"
  d.input_dropout = 0.0 if tiny else 0.1
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
  # Not in the papers: subtract the targets' per-position batch mean
  # (targets.position_center), against the positional collapse of small runs.
  # tiny: on; without it the tiny text run's targets became 0.94 position by
  # step 200 and its probe fell below random features (docs/results.md).
  t.position_center = tiny

  # --- loss (SPEC 3) --------------------------------------------------------------
  c.loss = l = ml_collections.ConfigDict()
  # 1.0: smooth-L1 beta 4, loss_scale 1 (base.yaml); 2.0: L2, loss_scale 1
  # (base_text_only_task.yaml; not the 1/sqrt(D) default). tiny_v2 keeps
  # 1/sqrt(D) (None), with which its lr and clipping were tuned.
  l.beta = 4.0 if v1 else 0.0
  l.scale = 1.0 if v1 or not tiny else config_dict.placeholder(float)
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
  # What the teacher's blocks read: 2.0 "student", the student's embeddings
  # after its dropout (fairseq ema_encoder_only: extractor_out["local_features"]);
  # 1.0 "clean", embedded again without dropout (the EMA model in eval mode).
  e.teacher_input = "clean" if v1 else "student"

  # --- masking (SPEC 5), drawn in the input pipeline ------------------------------
  c.masking = k = ml_collections.ConfigDict()
  if v1:
    # The fairseq release (text/pretraining/base.yaml): spans of 4 from
    # int(0.35 n / 4 + U) starts, every chosen position gets <mask> (no random
    # or unchanged tokens); the loss counts the <mask> positions. BERT:
    # --config.masking.kind=bert --config.masking.ratio=0.15
    # --config.masking.leave_unmasked_prob=0.1 --config.masking.random_token_prob=0.1
    k.kind = "span"  # span | bert
    k.ratio = 0.35
    k.num_clones = 1
    k.leave_unmasked_prob = 0.0
    k.random_token_prob = 0.0
    k.loss_on = "mask_token"  # mask_token | all (every chosen position)
  else:
    # 2.0: MAE random masking, int(n * 0.52) kept per row, M clones; masked
    # tokens are removed.
    k.kind = "random"
    k.ratio = 0.48
    k.num_clones = 4 if tiny else 8
    k.leave_unmasked_prob = 0.0
    k.random_token_prob = 0.0
    k.loss_on = "all"
  k.span = 4  # span length for kind=span
  # fairseq masks <s> and </s> like other tokens (1.0 and 2.0); False keeps
  # them visible.
  k.mask_specials = True

  # --- data -------------------------------------------------------------------------
  c.data = dt = ml_collections.ConfigDict()
  # python_docs | text | chembl | smiles | proteome | fasta | fairseq
  # (modalities/text/corpus.py); fairseq: a fairseq data directory (dict.txt +
  # <split>.bin / .idx: fairseq-preprocess or python -m d2v_jax.prepare output),
  # read from disk row by row.
  dt.source = "python_docs" if tiny else "text"
  dt.path = ""  # file, glob or comma-separated list; fairseq: the data directory
  dt.split = "train"  # fairseq: the split's files (train.bin, train1.bin, ...)
  # Packaged corpora read after data.source, e.g. ('chembl', 'freesolv'): each
  # labeled one loses its held-out rows too (modalities/text/corpus.py).
  dt.extra_sources = ()
  # text files: line (one document per line) | blank (paragraphs, lines joined) |
  # fairseq (each line a record, a blank line ends the document: RoBERTa's layout,
  # what fairseq-preprocess reads; complete_doc packs lines of one document).
  dt.doc_sep = "blank" if tiny else "fairseq"
  dt.smiles_column = "smiles"
  # Fine-tuning sets as corpora (data.source text_tsv | stdlib_docs | smiles_csv |
  # solubility, one document per labeled row): the TSV/CSV columns, and the rows
  # a fine-tune on the same set tests on kept out of pretraining and of the
  # tokenizer: same fraction / seed as its data.test_fraction / split_seed.
  dt.text_column = "text"
  dt.label_column = "label"
  dt.holdout_fraction = 0.0
  dt.holdout_seed = 0
  dt.on_invalid = "skip"  # skip (and count) | error (naming the line)
  dt.validate_smiles = True  # RDKit must parse every SMILES
  # SMILES tokens the tokenizer lacks (a reloaded tokenizer, min_frequency > 1)
  # are listed in a warning, or stop the run (error).
  dt.on_unknown = "warn"  # warn | error
  # Randomized SMILES (modalities/text/smiles.py): the probability that a row is
  # rewritten from a random start atom and traversal of its molecule, redrawn up
  # to smiles_enumerate_tries times if longer than the row, else kept canonical.
  # 0 = off; experiments/molecules.py turns it on. Needs packing='doc'.
  dt.smiles_enumerate = 0.0
  dt.smiles_enumerate_tries = 5
  dt.max_len = m.max_positions  # tokens per row, <s> and </s> included
  # fairseq sample_break_mode (modalities/text/blocks.py): 2.0 none = stream;
  # 1.0 complete_doc (whole lines of one document per row). A line longer than
  # a row is dropped, as fairseq's trainer drops it (too_long skip).
  dt.packing = "complete_doc" if v1 and not tiny else "stream"  # stream | complete | complete_doc | doc
  dt.too_long = "skip" if v1 and not tiny else "error"  # error | skip | split | crop
  # 1.0: fairseq's token budget, max_tokens 8192 per GPU x 16 GPUs, spent per
  # length bucket (modalities/text/batching.py); rows a multiple of 16 GPUs x
  # required_batch_size_multiple 8 = 128 (256 rows of 512, 1,024 of 128).
  # 2.0: batch_size 4 x 16 GPUs = 64 rows of 512. 0 = data.batch_size rows.
  dt.max_tokens = 16 * 8192 if v1 and not tiny else 0
  dt.buckets = (128, 256, 384, 512) if v1 and not tiny else ()  # row lengths of max_tokens
  dt.batch_size = 32 if tiny else (128 if v1 else 64)
  dt.num_workers = common.num_workers(0 if tiny else "auto")  # see experiments/common.py
  common.bad_samples(dt)  # data.on_bad_sample, data.max_bad_fraction
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
  # Weight-decay scope (SPEC 7): 1.0 fairseq plain `adam` decays every
  # parameter; 2.0 `composite` excludes biases, norms and other 1-D params.
  o.decay_scope = "all" if v1 else "matrices"  # all | matrices
  o.decay_names = ()
  o.no_decay = () if v1 else ("alibi_scale",)
  o.accum_steps = 1

  # --- run ----------------------------------------------------------------------------
  num_steps = 1_000_000
  if tiny:  # ~3 minutes on 2 CPU cores
    num_steps, o.warmup_steps, o.lr = 400, 40, 1e-3
  c.train = common.train(num_steps, log_every=20 if tiny else 100,
                         checkpoint_every=0 if tiny else 5000)

  # tiny: the online probe on stdlib_docs (docstrings by module family; no
  # docstring is in the pretraining corpus). experiments/molecules.py swaps it.
  common.add_run_sections(c, collapse_after=100 if tiny else 5000,
                          probe_task=common.finetune_task("stdlib_docs") if tiny else "",
                          probe_every=100 if tiny else 0)
  return c


def get_config(arg: str = "tiny_v2") -> ml_collections.ConfigDict:
  size, version, _ = parse_arg(arg, "experiments/text.py")
  return build_config(size, version)
