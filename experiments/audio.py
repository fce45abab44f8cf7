r"""data2vec speech pretraining on raw 16 kHz waveforms, 1.0 or 2.0.

`arg` is `<size>_<version>[_logmel]`, size in {tiny, base}, version in {v1, v2}:

  python -m d2v_jax.train --config experiments/audio.py:tiny_v2 --workdir runs/a

`_logmel` (not in the papers; the speech-recognition recipe of
docs/results.md) replaces the raw-waveform convs with a fixed 64-band
log-mel filterbank every 10 ms and one learned conv to the same 20-ms frames,
and centres the targets per position (`target.position_center`). On the tiny
CPU runs the raw-waveform student falls to predicting the mean and its encoder
output goes flat; with log-mel frames it learns.

`tiny` trains on a small spoken-words set that espeak-ng synthesizes into a
cache folder on first use (`d2v_jax/data/speech_set.py`; nothing is downloaded)
and runs on a laptop CPU in minutes. `base` carries the numbers of SPEC.md
(sections 2-7) and reads a fairseq manifest: `--config.data.path=/data/ls/train.tsv`
(or a folder holding `train.tsv`; `--config.data.source=audio_folder` for a
plain folder of audio files).
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
    #        dim, depth, heads, conv channels
    "tiny": (64, 4, 4, 32),
    "base": (768, 12, 12, 512),
}


_MEL_BANDS = 64  # the _logmel front-end: 64 log-mel bands of 25-ms windows every 10 ms


def _parse(arg: str) -> tuple[str, str, bool]:
  parts = (arg or "tiny_v2").split("_")
  if (len(parts) not in (2, 3) or parts[0] not in _SIZES or parts[1] not in ("v1", "v2")
      or parts[2:] not in ([], ["logmel"])):
    raise ValueError(
        f"experiments/audio.py: bad config arg {arg!r}; expected <size>_<version>[_logmel] "
        f"with size in {sorted(_SIZES)} and version in ['v1', 'v2'], e.g. 'tiny_v2' or "
        "'tiny_v2_logmel'.")
  return parts[0], parts[1], len(parts) == 3


def get_config(arg: str = "tiny_v2") -> ml_collections.ConfigDict:
  size, version, logmel = _parse(arg)
  dim, depth, heads, conv = _SIZES[size]
  tiny, v1 = size == "tiny", version == "v1"

  c = ml_collections.ConfigDict()
  c.modality = "audio"
  c.version = version
  c.seed = 0

  # --- model (SPEC 6, 7) ------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  # wav2vec 2.0 feature extractor: 7 convs, 320x down-sampling (20 ms frames).
  m.conv_dims = (conv,) * 7
  m.conv_kernels = (10, 3, 3, 3, 3, 2, 2)
  m.conv_strides = (5, 2, 2, 2, 2, 2, 2)
  m.conv_bias = False  # layer-norm mode convs have no bias
  m.feature_grad_mult = 1.0  # gradient scale into the conv extractor (0 freezes it)
  # conv: the papers' raw-waveform convs. fbank (not in the papers): layer 0 is a
  # fixed log-mel filterbank of conv_dims[0] bands, window conv_kernels[0], hop
  # conv_strides[0] (the `_logmel` variant below: 64 mels every 10 ms, then a
  # learned conv to 20-ms frames).
  m.frontend = "conv"
  if logmel:  # 400-sample windows, 160-sample hop at 16 kHz; then 2x to 20-ms frames
    m.frontend = "fbank"
    m.conv_dims = (_MEL_BANDS, max(conv, _MEL_BANDS))
    m.conv_kernels = (400, 2)
    m.conv_strides = (160, 2)
  m.dim = dim
  m.depth = depth
  m.num_heads = heads
  m.mlp_ratio = 4.0
  m.qkv_bias = True
  m.norm_eps = 1e-5  # torch LayerNorm default, as fairseq's post-LN blocks
  # Conv positional encoder: "stack" = pos_conv_depth grouped convs of kernel
  # max(3, width // depth) = 19 (data2vec); "single" = one weight-normed conv of
  # kernel width (wav2vec 2.0 uses width 128).
  m.pos_conv = "stack"  # stack | single
  m.pos_conv_width = 38 if tiny else 95  # tiny: 2 layers of kernel 19
  m.pos_conv_depth = 2 if tiny else 5
  m.pos_conv_groups = 16 if not tiny else 4
  # Padded frames and the positional convs: zeroed at the input and after every
  # layer ("layer": a clip's encoding does not depend on its batch's padding),
  # at the input only ("input": wav2vec 2.0 / data2vec 1.0 / Hugging Face), or
  # never ("none": fairseq data2vec 2.0). Converted checkpoints set theirs.
  m.pos_conv_zero_pad = "layer"
  m.conv_impl = "dense" if tiny else "xla"  # grouped conv kernel (see decoder.conv_impl)
  m.alibi = not v1  # 2.0: ALiBi attention bias with a learned per-head scale
  m.alibi_scale_init = 1.0
  # Regularization (SPEC 7): fairseq dropout / encoder_dropout + post_mlp_drop 0.1
  # (residual dropout), attention_dropout 0.1, activation_dropout 0; layer-drop
  # 0.05 (1.0 encoder_layerdrop, 2.0 layerdrop); prenet_dropout 0.1 after the
  # embedding LayerNorm (1.0: the encoder's dropout there). tiny: none, as its
  # 300-step run is measured without (README).
  m.dropout = 0.0 if tiny else 0.1  # residual dropout (attention projection, FFN output)
  m.activation_dropout = 0.0  # after the FFN's GELU
  m.attn_dropout = 0.0 if tiny else 0.1
  m.prenet_dropout = 0.0 if tiny else 0.1
  m.layerdrop = 0.0 if tiny else 0.05  # skip a whole block (student only), one draw per block
  m.dropout_input = 0.0  # on the projected features of the student
  m.drop_path = 0.0
  # Init: fairseq init_bert_params, Linear ~ N(0, 0.02) untruncated (the conv
  # positional encoder and the feature projection keep PyTorch's default).
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

  # --- 2.0 conv decoder (SPEC 6) ----------------------------------------------
  c.decoder = d = ml_collections.ConfigDict()
  d.dim = 32 if tiny else 384
  d.kernel = 7
  d.layers = 2 if tiny else 4
  d.groups = 4 if tiny else 16
  d.residual = True
  d.conv_impl = "dense" if tiny else "xla"
  d.mask_noise_std = 0.01
  d.input_dropout = 0.0 if tiny else 0.1  # on the encoder outputs the decoder gets
  # fairseq Decoder1d for audio: one Linear projection, reset to PyTorch's default.
  d.projection_layers = 1
  d.projection_ratio = 2.0
  d.proj_init = "torch"  # torch | normal
  # The convs: torch = PyTorch's Conv default (fairseq never re-inits them) | normal
  # = N(0, 0.02) weights, zero bias.
  d.conv_init = "torch"

  # --- targets (SPEC 2): FFN outputs of the top K blocks, instance norm each --
  c.target = t = ml_collections.ConfigDict()
  t.top_k = 3 if tiny else 8
  t.layer_norm = "instance"  # over time, padded frames excluded
  t.final_norm = "none"
  t.eps = 1e-5
  # Not in the papers: subtract the targets' per-position batch mean
  # (targets.position_center), against the positional collapse of small runs.
  t.position_center = logmel

  # --- loss (SPEC 3) ----------------------------------------------------------
  c.loss = l = ml_collections.ConfigDict()
  l.beta = 0.0  # L2
  l.scale = config_dict.placeholder(float)  # None -> 1/sqrt(D)
  l.cls_weight = 0.0
  l.cls_reduction = "sum"

  # --- EMA teacher (SPEC 4) ---------------------------------------------------
  c.ema = e = ml_collections.ConfigDict()
  if v1:
    e.start, e.end, e.anneal_steps = 0.999, 0.9999, 30_000
  else:
    e.start, e.end, e.anneal_steps = 0.999, 0.99999, 75_000
  if tiny:  # short runs need a teacher that moves within a few hundred steps
    e.start, e.end, e.anneal_steps = 0.99, 0.999, 300
  # Parameters the teacher takes from the student instead of EMA (SPEC 4),
  # '/'-separated path prefixes with wildcards. 1.0 (ema_layers_only): conv
  # features, projection and the conv positional encoder; EMA on the blocks and
  # the encoder LayerNorm. 2.0 (ema_local_encoder: false): the local encoder
  # (conv features + projection); positional convs, LayerNorm, ALiBi scale and
  # blocks are EMA.
  e.shared = ("frontend", "context/pos_conv*") if v1 else ("frontend",)

  # --- masking (SPEC 5), on the frame grid, in the input pipeline -------------
  c.masking = k = ml_collections.ConfigDict()
  if v1:  # wav2vec 2.0 span masking; rows trimmed to one count
    k.kind = "span"
    k.num_clones = 1
    k.ratio = 0.65  # fairseq mask_prob: spans start at ratio / span of the frames
    k.span = 10
    k.min_masks = 1  # fairseq data2vec_audio.py compute_mask_indices(min_masks=1)
    k.same_count = True
  else:  # 1-D blocks, exactly int(ratio * frames) masked, M clones (SPEC 6)
    k.kind = "block_1d"
    k.num_clones = 4 if tiny else 8
    k.ratio = 0.5
    k.span = 5  # block length
    k.prob_adjust = 0.05

  # --- data -------------------------------------------------------------------
  c.data = dt = ml_collections.ConfigDict()
  dt.source = "espeak_words" if tiny else "manifest"  # espeak_words | manifest | audio_folder
  dt.path = ""  # manifest file, folder with <split>.tsv, or audio folder
  # Files a fine-tune on the same labeled set tests on, kept out of pretraining:
  # with the fine-tune's data.test_fraction / split_seed, its stratified test split
  # of espeak_words (<cache>/words) or of the audio_folder class folders.
  dt.holdout_fraction = 0.0
  dt.holdout_seed = 0
  dt.split = "train"
  dt.cache_dir = ""  # espeak_words: "" = $D2V_JAX_CACHE or ~/.cache/d2v_jax
  dt.sample_rate = 16_000
  dt.normalize = True  # zero mean, unit variance per utterance
  dt.max_sample_size = 16_000 if tiny else 320_000  # random crop to at most this
  dt.min_sample_size = 4_000 if tiny else 32_000  # shorter files are left out
  # Waveform lengths of the batch shapes (one compiled step each); the last is
  # max_sample_size. pad=True: pad up to the bucket (with a padding mask);
  # pad=False: crop down to it (fairseq's default, no padding).
  dt.buckets = (12_000, 16_000) if tiny else (120_000, 200_000, 260_000, 320_000)
  dt.pad = True
  dt.check_files = True  # open every header at start: bad files fail (or skip) early
  dt.on_error = "raise"  # raise | skip (count and log bad files, train on the rest)
  # Token budget (fairseq dataset.max_tokens x world size): with max_tokens > 0
  # a batch of bucket length S has (max_tokens // S) // batch_size * batch_size
  # rows, i.e. batch_size acts as fairseq's required_batch_size_multiple; with
  # batch_size = the official GPU count this is exactly fairseq's per-GPU budget
  # (floor(floor(N/S)/G) = floor((N/G)/S)). 1.0: 3.8M samples x 16 GPUs; 2.0:
  # 1M samples x 8 GPUs. 0 = fixed batches of batch_size (the tiny runs).
  dt.max_tokens = 0 if tiny else (16 * 3_800_000 if v1 else 8 * 1_000_000)
  dt.batch_size = 16 if tiny else (16 if v1 else 8)
  # tiny: a small set, per-clip work << a worker's start-up; base: "auto" (common.num_workers)
  dt.num_workers = common.num_workers(0 if tiny else "auto")
  dt.prefetch = 2
  common.bad_samples(dt)  # data.on_bad_sample, data.max_bad_fraction

  # --- optimizer (SPEC 7) -----------------------------------------------------
  c.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"
  o.b1, o.b2, o.eps = 0.9, 0.98, 1e-6
  o.weight_decay = 0.01
  # Neither official config clips; tiny_v2 keeps its clip of 1.
  o.clip_norm = 1.0 if tiny and not v1 else 0.0
  # 1.0: fairseq tri_stage, 3/90/7 % of the updates, from and to 0.01 x lr
  # (optim.tri_stage_schedule); 2.0: cosine after 8k warm-up updates.
  o.schedule = "tri_stage" if v1 and not tiny else "cosine"
  o.phase_ratio = (0.03, 0.9, 0.07)
  o.init_lr_scale = 0.01
  o.final_lr_scale = 0.01
  o.end_lr_ratio = 0.0
  # fairseq's plain `adam` optimizer decays every parameter (SPEC 7).
  o.decay_scope = "all"  # all | matrices
  o.decay_names = ()
  o.no_decay = ()
  o.accum_steps = 1  # micro-batches per step (gradient accumulation)
  o.lr = 5e-4 if v1 else 7.5e-4

  # --- run --------------------------------------------------------------------
  if tiny:
    num_steps, o.warmup_steps, o.lr = 300, 30, 1e-3
  elif v1:
    num_steps, o.warmup_steps = 400_000, 12_000
  else:
    num_steps, o.warmup_steps = 400_000, 8_000
  c.train = common.train(num_steps, log_every=10 if tiny else 100,
                         checkpoint_every=0 if tiny else 5000)

  # tiny: the online probe on espeak_words (keyword spotting over the same set).
  common.add_run_sections(c, collapse_after=50 if tiny else 5000,
                          probe_task=common.finetune_task("espeak_words") if tiny else "",
                          probe_every=50 if tiny else 0)
  return c
