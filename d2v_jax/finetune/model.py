"""The fine-tune models: the pretraining encoder pooled then a head
(`FinetuneModel`), or per frame then a CTC head (`CTCModel`, speech
recognition); and the copy of pretrained encoder weights into them."""

from __future__ import annotations

import importlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from d2v_jax import modalities
from d2v_jax.finetune import ctc
from d2v_jax.errors import CheckpointError


class FinetuneModel(nn.Module):
    """The pretraining model's `encode` (as `backbone`), pooled, then a head.

    `freeze_backbone` stops gradients at the features: a probe never
    differentiates through the encoder.
    """

    backbone_config: ml_collections.ConfigDict
    num_outputs: int
    pool: str = "mean"
    norm: str = "layer"
    bn_momentum: float = 0.9
    init_std: float = 2e-5
    freeze_backbone: bool = False

    def setup(self):
        self.backbone = modalities.build_model(self.backbone_config)
        if self.norm == "layer":
            self.fc_norm = nn.LayerNorm(epsilon=1e-6, name="fc_norm")
        elif self.norm == "batch":
            # MAE's probe: per-channel standardization over the batch, no affine.
            # Pooled features share a large common component that per-sample
            # LayerNorm keeps; a linear head then needs huge weights.
            self.fc_norm = nn.BatchNorm(momentum=self.bn_momentum, epsilon=1e-6, use_bias=False,
                                        use_scale=False, name="fc_norm")
        self.head = nn.Dense(self.num_outputs, name="head",
                             kernel_init=nn.initializers.truncated_normal(self.init_std))

    def features(self, batch: dict[str, jax.Array]) -> jax.Array:
        h = self.backbone.encode(batch)  # [B, T, D]
        # Models with a CLS (or <s>) position put it first; others pool every position.
        cls_first = getattr(self.backbone, "cls_first", False)
        if self.pool == "cls":
            if not cls_first:
                raise ValueError(f"head.pool='cls': the {self.backbone_config.modality} "
                                 "model has no CLS position")
            f = h[:, 0]
        else:
            keep = jnp.ones(h.shape[:2], h.dtype)
            pad = batch.get("padding_mask")
            if pad is not None and hasattr(self.backbone, "frame_padding"):
                # Audio: the mask is over samples; the encoder's positions are conv frames.
                pad = self.backbone.frame_padding(batch, h.shape[1])
            if pad is not None:
                keep = keep * (~pad).astype(h.dtype)
            if cls_first:
                keep = keep.at[:, 0].set(0)
            f = jnp.einsum("btd,bt->bd", h, keep) / jnp.maximum(keep.sum(1, keepdims=True), 1)
        return jax.lax.stop_gradient(f) if self.freeze_backbone else f

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> jax.Array:
        f = self.features(batch)
        if self.norm == "layer":
            f = self.fc_norm(f)
        elif self.norm == "batch":
            f = self.fc_norm(f, use_running_average=not train)
        return self.head(f.astype(jnp.float32))


class CTCModel(nn.Module):
    """The encoder over every frame, then dropout and a linear CTC head to the
    letter units (wav2vec 2.0 / data2vec `Wav2VecCtc`; `Data2VecAudioForCTC`).

    In training (`train=True`) the features get wav2vec 2.0's fine-tuning masks
    before the positional encoder: time spans (`mask_prob`, `mask_length`)
    replaced by the mask embedding (the pretrained 1.0 one; a fresh learned one
    for 2.0, which pretrains without), channel spans (`mask_channel_prob`,
    `mask_channel_length`) zeroed; the encoder runs with its dropout and
    layer-drop. Returns (logits [B, T, V] float32, frame padding [B, T] or None).
    """

    backbone_config: ml_collections.ConfigDict
    num_outputs: int
    mask_prob: float = 0.65
    mask_length: int = 10
    mask_channel_prob: float = 0.0
    mask_channel_length: int = 64
    final_dropout: float = 0.0

    def setup(self):
        self.backbone = modalities.build_model(self.backbone_config)
        self.drop = nn.Dropout(self.final_dropout)
        # fairseq Wav2VecCtc's proj: xavier-uniform weights, zero bias.
        self.head = nn.Dense(self.num_outputs, name="head",
                             kernel_init=nn.initializers.xavier_uniform())
        if self.mask_prob > 0 and self.backbone_config.get("version") != "v1":
            # wav2vec 2.0's mask_emb ~ U[0, 1), learned from the start of fine-tuning.
            self.ft_mask_emb = self.param("ft_mask_emb", nn.initializers.uniform(1.0),
                                          (self.backbone_config.model.dim,))

    @property
    def asr(self):
        """The modality's speech-recognition hooks (e.g. modalities/audio/asr.py)."""
        entry = modalities.get(self.backbone_config)
        if entry.asr is None:
            raise ValueError(f"config.task='ctc': the {entry.name} modality has no speech "
                             "recognition hooks (its Modality record sets no `asr`)")
        return importlib.import_module(entry.asr)

    def _mask_emb(self) -> jax.Array:
        emb = self.asr.mask_embedding(self.backbone)
        return self.ft_mask_emb if emb is None else emb

    def _mask(self, x: jax.Array, pad: jax.Array | None) -> jax.Array:
        b, t, d = x.shape
        if self.mask_prob > 0:
            emb = self._mask_emb()
            m = ctc.span_mask(self.make_rng("mask"), (b, t), self.mask_prob, self.mask_length, pad)
            x = jnp.where(m[..., None], emb.astype(x.dtype), x)
        if self.mask_channel_prob > 0:
            c = ctc.span_mask(self.make_rng("mask"), (b, d), self.mask_channel_prob,
                              self.mask_channel_length)
            x = jnp.where(c[:, None, :], 0, x)
        return x

    def __call__(self, batch: dict[str, jax.Array], train: bool = False):
        if self.is_initializing() and self.mask_prob > 0:
            self._mask_emb()  # creates the pretrained 1.0 mask embedding's param
        apply_mask = self._mask if train else (lambda x, pad: x)
        h, pad = self.asr.encode(self.backbone, batch, deterministic=not train,
                                 apply_mask=apply_mask)
        h = self.drop(h, deterministic=not train)
        return self.head(h.astype(jnp.float32)), pad


def build_model(config: ml_collections.ConfigDict, backbone_config: ml_collections.ConfigDict,
                num_outputs: int) -> FinetuneModel | CTCModel:
    if config.task == "ctc":
        k = config.masking
        return CTCModel(backbone_config, num_outputs, mask_prob=k.mask_prob,
                        mask_length=k.mask_length, mask_channel_prob=k.mask_channel_prob,
                        mask_channel_length=k.mask_channel_length,
                        final_dropout=config.head.final_dropout)
    h = config.head
    return FinetuneModel(backbone_config, num_outputs, pool=h.pool, norm=h.norm,
                         bn_momentum=h.bn_momentum,
                         init_std=h.init_std, freeze_backbone=config.mode == "linear_probe")


def load_backbone_into(params: dict, pretrained: dict) -> dict:
    """`params` with its `backbone` subtree replaced by the matching subtrees of
    `pretrained` (exact arrays). The pretraining-only parts (decoder, prediction
    head) are dropped; a missing key or a shape mismatch is an error naming it."""
    want = flax.traverse_util.flatten_dict(params["backbone"], sep="/")
    have = flax.traverse_util.flatten_dict(pretrained, sep="/")
    missing = sorted(k for k in want if k not in have)
    if missing:
        raise CheckpointError(f"the pretrained checkpoint lacks encoder params {missing[:5]} "
                              f"(of {len(missing)}); it has {sorted(have)[:5]}...")
    bad = [(k, have[k].shape, want[k].shape) for k in want if have[k].shape != want[k].shape]
    if bad:
        raise CheckpointError(f"pretrained param shapes differ from the model's: {bad[:5]}")
    backbone = flax.traverse_util.unflatten_dict({k: jnp.asarray(have[k]) for k in want}, sep="/")
    return {**params, "backbone": backbone}
