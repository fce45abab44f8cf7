"""The token-sequence modality (text, SMILES, proteins): data2vec 1.0 and 2.0.

Front-end (SPEC 6): token embeddings + learned absolute positions + embedding
LayerNorm (+ dropout), then post-LN Transformer blocks with a fused qkv
projection (`layers.Encoder`), as RoBERTa / fairseq data2vec text. Entry points
for the train step (`method=`):

- `teacher(batch)`: the full, unmasked `tokens` (SPEC 9: fairseq 1.0 feeds the
  teacher pad-filled target tokens; here it sees the real input), deterministic
  blocks; returns the block FFN outputs [L, B, T, D] and the padding mask. 2.0
  (`ema.teacher_input='student'`): the embeddings carry the student's dropout
  (the train step passes the student's dropout key), as fairseq's
  `ema_encoder_only` teacher reads `extractor_out["local_features"]`.
- `student(batch)`: 1.0 embeds the corrupted `inputs` (mask / random / kept tokens,
  drawn in the pipeline) and runs the whole sequence, then the two-layer head
  Linear(D, 2D) -> GELU -> Linear(2D, D) (SPEC 3). 2.0 encodes only the visible
  tokens of M clones (a static `num_keep`, `text_masking.num_keep_random`) and the
  1-D conv decoder predicts every position (fairseq's text decoder: no residual,
  Linear(D, 2D) -> GELU -> Linear(2D, D), input dropout 0.1; SPEC 6).
- `encode(batch)`: final hidden states [B, T, D] of the full sequence.

Padding is masked out as attention keys everywhere. The teacher uses only
`frontend` and `encoder`; data2vec text shares the embeddings with the student
(`ema.shared = ("frontend",)`, SPEC 4), so the EMA holds just the blocks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from d2v_jax.modalities.text import masking as text_masking
from d2v_jax.models import visible
from d2v_jax.models.decoder import ConvDecoder, decoder_from_config
from d2v_jax.models.sharding import constrain
from d2v_jax.models.layers import Encoder, dense, dtype_of, encoder_from_config, kernel, layer_norm

TEACHER_MODULES = ("frontend", "encoder")
DUMMY_TOKEN = 5  # any non-special id: the dummy batch must not be all padding


def _vocab_size(config: ml_collections.ConfigDict) -> int:
    v = config.model.vocab_size
    if v is None:
        raise ValueError("config.model.vocab_size is unset: it comes from the tokenizer; call "
                         "d2v_jax.data.prepare(config, workdir) first (train.py does)")
    return int(v)


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, np.ndarray]:
    """A batch of the pipeline's shapes with a valid mask, for `init` and tracing."""
    t, k = config.data.max_len, config.masking
    tokens = np.full((batch_size, t), DUMMY_TOKEN, np.int32)
    mask = np.zeros((batch_size, k.num_clones, t), bool)
    mask[..., :text_masking.num_masked_random(t, k.ratio)] = True
    batch = {"tokens": tokens, "padding_mask": np.zeros((batch_size, t), bool), "mask": mask}
    if config.version == "v1":
        batch["inputs"] = np.repeat(tokens[:, None], k.num_clones, axis=1)
    return batch


class TokenEmbed(nn.Embed):
    """`nn.Embed` (same parameter, `embedding` [V, D]) whose lookup reads the
    whole table on every device: under FSDP the table is all-gathered like any
    other parameter and the lookup stays local to each device's rows. Left to
    itself the partitioner looks the tokens up in the D-split table instead
    and moves the activations (all-gather of the ids, all-to-all of the
    embeddings; models/sharding.py)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        table = constrain(jnp.asarray(self.embedding, self.dtype), ())
        return constrain(jnp.take(table, inputs, axis=0))


class TextFrontEnd(nn.Module):
    """Token + learned position embeddings, embedding LayerNorm, dropout."""

    vocab_size: int
    max_positions: int
    dim: int
    norm_eps: float = 1e-5
    dropout: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool) -> jax.Array:
        t = tokens.shape[-1]
        if t > self.max_positions:
            raise ValueError(f"sequence length {t} > model.max_positions={self.max_positions}")
        dtype = dtype_of(self.dtype)
        embed = TokenEmbed(self.vocab_size, self.dim, dtype=dtype, name="token_embed",
                           embedding_init=kernel((None, "embed")))
        pos = self.param("pos_embed", kernel((None, "embed")), (self.max_positions, self.dim))
        # Rows stay split (models/sharding.py): the lookup reads the whole table.
        x = embed(tokens) + pos[:t].astype(dtype)
        x = constrain(layer_norm(self.norm_eps, dtype, "emb_norm")(x))
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class TextData2Vec(nn.Module):
    """The sequence model; `build(config)` makes it from an experiment config."""

    version: str  # "v1" or "v2"
    frontend: TextFrontEnd
    encoder: Encoder
    decoder: ConvDecoder | None = None  # 2.0 only
    num_keep: int = 0  # 2.0: positions the student encodes per row (masking.num_keep)
    mask_noise_std: float = 0.01  # 2.0: the decoder's fill at removed positions
    decoder_input_dropout: float = 0.0  # 2.0: on the encoder outputs the decoder gets
    teacher_student_input: bool = False  # the teacher reads the student's dropped-out embeddings
    dtype: str = "float32"
    # `encode` puts <s> first, RoBERTa's sequence representation.
    cls_first = True

    def setup(self):
        dtype = dtype_of(self.dtype)
        dim = self.frontend.dim
        if self.version == "v1":
            # SPEC 3: text 1.0 regresses with Linear(D, 2D) -> GELU -> Linear(2D, D).
            self.head_fc1 = dense(2 * dim, ("embed", "mlp"), dtype, name="head_fc1")
            self.head_fc2 = dense(dim, ("mlp", "embed"), dtype, name="head_fc2")
        else:
            self.decoder_dropout = nn.Dropout(self.decoder_input_dropout)

    def _encode(self, tokens, padding_mask, *, deterministic: bool):
        x = self.frontend(tokens, deterministic=deterministic)
        return self.encoder(x, None, padding_mask, deterministic=deterministic)
    # -- entry points -------------------------------------------------------------
    def teacher(self, batch: dict[str, jax.Array]) -> dict[str, Any]:
        """{'layers': [L, B, T, D] block FFN outputs of the full sequence (SPEC 2),
        'padding_mask': [B, T]}. The blocks run deterministically; with
        `teacher_student_input` and a 'dropout' rng (the train step passes the
        student's) the embeddings keep the student's dropout: fairseq 2.0's
        `ema_encoder_only` teacher reads the student's local features."""
        padding = batch["padding_mask"]
        student_input = self.teacher_student_input and self.has_rng("dropout")
        x = self.frontend(batch["tokens"], deterministic=not student_input)
        _, layers = self.encoder(x, None, padding, deterministic=True)
        return {"layers": layers, "padding_mask": padding}

    def encode(self, batch: dict[str, jax.Array], deterministic: bool = True) -> jax.Array:
        """Final hidden states [B, T, D] of the full sequence (<s> first);
        `deterministic=False`: with dropout (fine-tuning)."""
        return self._encode(batch["tokens"], batch["padding_mask"],
                            deterministic=deterministic)[0]

    def student(self, batch: dict[str, jax.Array], *, deterministic: bool = False
                ) -> dict[str, Any]:
        """batch['mask']: bool [B, M, T], the positions the loss counts. Returns
        {'pred': [B*M, T, D], 'loss_mask': [B*M, T], 'cls': None}; row b*M + j is
        clone j of sequence b."""
        mask = batch["mask"]
        b, m, t = mask.shape
        padding = jnp.repeat(batch["padding_mask"], m, axis=0)
        if self.version == "v1":
            x, _ = self._encode(batch["inputs"].reshape(b * m, t), padding,
                                deterministic=deterministic)
            pred = self.head_fc2(nn.gelu(self.head_fc1(x), approximate=False))
        else:
            pred = self._student_v2(batch["tokens"], padding, mask.reshape(b * m, t), m,
                                    deterministic)
        return {"pred": pred, "cls": None, "loss_mask": mask.reshape(b * m, t)}

    def _student_v2(self, tokens, padding, mask, clones, deterministic):
        x = self.frontend(tokens, deterministic=deterministic)  # once per sequence
        # Visible real tokens first, then padding, then masked tokens (stable, so in
        # order). A row with n real tokens has n - int(p n) visible ones, never more
        # than num_keep; the padding positions that fill the rest stay padding.
        keep, removed = visible.split_indices(jnp.where(mask, 2, jnp.where(padding, 1, 0)),
                                              self.num_keep)
        h, _ = self.encoder(visible.gather(x, keep, clones=clones), None,
                            visible.gather(padding, keep),
                            deterministic=deterministic)
        # Decoder input: visible outputs (after the decoder's input dropout) back
        # in place, masked slots ~ N(0, std), padding 0 (the convolution must not
        # read the pad tokens' states).
        h = self.decoder_dropout(h, deterministic=deterministic)
        full = visible.scatter_with_noise(h, keep, removed, self.mask_noise_std,
                                          self.make_rng("noise"))
        full = jnp.where(padding[..., None], 0, full)
        return self.decoder(full)


def build(config: ml_collections.ConfigDict) -> TextData2Vec:
    """The sequence model an experiment config describes (`config.model` with
    the tokenizer's `vocab_size`, `config.decoder`, `config.masking`)."""
    m = config.model
    frontend = TextFrontEnd(vocab_size=_vocab_size(config), max_positions=m.max_positions,
                            dim=m.dim, norm_eps=m.norm_eps, dropout=m.dropout, dtype=m.dtype)
    encoder = encoder_from_config(m, dtype=dtype_of(m.dtype))
    student_input = config.ema.get("teacher_input", "clean") == "student"
    if config.version == "v1":
        return TextData2Vec("v1", frontend, encoder, teacher_student_input=student_input,
                            dtype=m.dtype)
    decoder = decoder_from_config(config.decoder, (config.data.max_len,), m.dim,
                                  dtype_of(m.dtype))
    return TextData2Vec("v2", frontend, encoder, decoder, num_keep=text_masking.num_keep(config),
                        mask_noise_std=config.decoder.mask_noise_std,
                        decoder_input_dropout=config.decoder.get("input_dropout", 0.0),
                        teacher_student_input=student_input, dtype=m.dtype)
