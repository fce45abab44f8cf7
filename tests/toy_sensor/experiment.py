"""The toy sensor experiment: `d2v_jax.load_config("tests/toy_sensor/experiment.py")`.

The generic sections (targets, loss, EMA, optimizer, run, mesh, collapse guard)
are the ones every modality has; `data`, `model`, `masking` and `decoder` are
the toy's own.
"""

import os
import sys

import ml_collections

_EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "experiments")
if _EXPERIMENTS not in sys.path:
  sys.path.insert(0, _EXPERIMENTS)
import common  # noqa: E402


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.modality, c.version, c.seed = "toy_sensor", "v2", 0
  c.data = ml_collections.ConfigDict(dict(num_examples=256, length=32, channels=3, batch_size=8,
                                          num_workers=0, prefetch=2))
  c.model = ml_collections.ConfigDict(dict(
      dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True, norm_eps=1e-5, dropout=0.0,
      attn_dropout=0.0, drop_path=0.0, remat="none", attention_impl=None, dtype="float32"))
  c.masking = ml_collections.ConfigDict(dict(ratio=0.5, num_clones=2))
  c.decoder = ml_collections.ConfigDict(dict(dim=32, kernel=3, layers=1, groups=1, residual=True,
                                             conv_impl="dense", mask_noise_std=0.01))
  c.target = ml_collections.ConfigDict(dict(top_k=2, layer_norm="instance", final_norm="none",
                                            eps=1e-5))
  c.loss = ml_collections.ConfigDict(dict(beta=0.0, scale=None, cls_weight=0.0,
                                          cls_reduction="sum"))
  c.ema = ml_collections.ConfigDict(dict(start=0.99, end=0.999, anneal_steps=100, shared=()))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, clip_norm=1.0,
      warmup_steps=5, schedule="cosine", end_lr_ratio=0.0, no_decay=(), accum_steps=1))
  c.train = common.train(30, log_every=5, checkpoint_every=0)
  common.add_run_sections(c, collapse_after=1000)
  return c
