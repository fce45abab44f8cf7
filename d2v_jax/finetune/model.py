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
from d2v_jax.errors import CheckpointError
from d2v_jax.finetune import ctc
from d2v_jax.finetune.config import HEAD_INITS


def head_init(kind: str, std: float, fan_in: int):
    """(kernel init, bias init) of an output layer: `truncated_normal` (flax's,
    cut at 2 std), `normal` (torch's trunc_normal_(std) with its absolute +-2
    bounds, i.e. untruncated for a small std: BEiT's and fairseq's image heads),
    both with a zero bias; or `torch_linear` (PyTorch's nn.Linear default,
    U(+-1/sqrt(fan_in)) for weight and bias: fairseq's RobertaClassificationHead,
    which is built after the model's own init)."""
    zeros = nn.initializers.zeros_init()
    if kind == "truncated_normal":
        return nn.initializers.truncated_normal(std), zeros
    if kind == "normal":
        return nn.initializers.normal(std), zeros
    if kind == "torch_linear":
        limit = 1.0 / float(fan_in) ** 0.5
        return (nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                         -limit, limit))
    raise ValueError(f"config.head.init={kind!r}; expected one of {HEAD_INITS}")


class FinetuneModel(nn.Module):
    """The pretraining model's `encode` (as `backbone`), pooled, then a head.

    `freeze_backbone` stops gradients at the features: a probe never
    differentiates through the encoder. `stochastic_encoder`: in training the
    encoder runs with its dropout, drop path and layer-drop (fairseq's and
    BEiT's fine-tuning run the model in train mode); otherwise deterministic.
    Heads: `linear` (pool -> norm -> Linear: MAE / BEiT / data2vec image) or
    `roberta` (fairseq's RobertaClassificationHead on the first position:
    dropout -> Linear(D, D) -> tanh -> dropout -> Linear).
    """

    backbone_config: ml_collections.ConfigDict
    num_outputs: int
    pool: str = "mean"
    norm: str = "layer"
    bn_momentum: float = 0.9
    init_std: float = 2e-5
    freeze_backbone: bool = False
    stochastic_encoder: bool = False
    kind: str = "linear"
    init_kind: str = "truncated_normal"  # config.head.init
    dropout: float = 0.0  # the roberta head's pooler_dropout
    inner_dim: int | None = None

    def _dense(self, features: int, fan_in: int, name: str) -> nn.Dense:
        w, b = head_init(self.init_kind, self.init_std, fan_in)
        return nn.Dense(features, name=name, kernel_init=w, bias_init=b)

    def setup(self):
        self.backbone = modalities.build_model(self.backbone_config)
        dim = int(self.backbone_config.model.dim)
        self.head_dropout = nn.Dropout(self.dropout)
        if self.kind == "roberta":
            inner = self.inner_dim or dim
            self.dense = self._dense(inner, dim, "dense")
            # fairseq's names (classification_heads.<name>.dense / out_proj), as
            # a converted fine-tuned head has them (d2v_jax/convert/heads.py).
            self.head = self._dense(self.num_outputs, inner, "out_proj")
            return
        if self.norm == "layer":
            self.fc_norm = nn.LayerNorm(epsilon=1e-6, name="fc_norm")
        elif self.norm == "batch":
            # MAE's probe: per-channel standardization over the batch, no affine.
            # Pooled features share a large common component that per-sample
            # LayerNorm keeps; a linear head then needs huge weights.
            self.fc_norm = nn.BatchNorm(momentum=self.bn_momentum, epsilon=1e-6, use_bias=False,
                                        use_scale=False, name="fc_norm")
        self.head = self._dense(self.num_outputs, dim, "head")

    def features(self, batch: dict[str, jax.Array], train: bool = False) -> jax.Array:
        if train and self.stochastic_encoder:  # `encode(batch, deterministic=False)`
            h = self.backbone.encode(batch, deterministic=False)
        else:  # a modality whose `encode` takes only the batch fine-tunes deterministically
            h = self.backbone.encode(batch)
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
        f = self.features(batch, train)
        if self.kind == "roberta":
            f = self.head_dropout(f, deterministic=not train)
            f = jnp.tanh(self.dense(f.astype(jnp.float32)))
            f = self.head_dropout(f, deterministic=not train)
            return self.head(f)
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
                         init_std=h.init_std, freeze_backbone=config.mode == "linear_probe",
                         stochastic_encoder=bool(config.train.get("stochastic_encoder", False)),
                         kind=h.get("kind", "linear"),
                         init_kind=h.get("init", "truncated_normal"),
                         dropout=float(h.get("dropout", 0.0)), inner_dim=h.get("inner_dim"))


def load_backbone_into(params: dict, pretrained: dict) -> dict:
    """`params` with its `backbone` subtree replaced by the matching subtrees of
    `pretrained` (exact arrays). The pretraining-only parts (decoder, prediction
    head) are dropped; a missing key or a shape mismatch is an error naming it.
    A shared relative position bias table [N, H] goes into every block's table
    [L, N, H] when the fine-tune has one per block (BEiT's run_class_finetuning:
    "Expand the shared relative position embedding to each transformer block")."""
    want = flax.traverse_util.flatten_dict(params["backbone"], sep="/")
    have = dict(flax.traverse_util.flatten_dict(pretrained, sep="/"))
    for k, v in want.items():
        if (k.endswith("relative_position_bias_table") and k in have
                and tuple(have[k].shape) == tuple(v.shape[1:])):
            have[k] = jnp.broadcast_to(jnp.asarray(have[k]), v.shape)
    missing = sorted(k for k in want if k not in have)
    if missing:
        raise CheckpointError(f"the pretrained checkpoint lacks encoder params {missing[:5]} "
                              f"(of {len(missing)}); it has {sorted(have)[:5]}...")
    bad = [(k, have[k].shape, want[k].shape) for k in want if have[k].shape != want[k].shape]
    if bad:
        raise CheckpointError(f"pretrained param shapes differ from the model's: {bad[:5]}")
    backbone = flax.traverse_util.unflatten_dict({k: jnp.asarray(have[k]) for k in want}, sep="/")
    return {**params, "backbone": backbone}
