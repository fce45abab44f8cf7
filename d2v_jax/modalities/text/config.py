"""The text modality's config checks (called by `d2v_jax.config.validate`)."""

from __future__ import annotations

import ml_collections

from d2v_jax.errors import check_field
from d2v_jax.models.decoder import validate_decoder
from d2v_jax.models.layers import validate_encoder
from d2v_jax.modalities.text import corpus as text_corpus
from d2v_jax.modalities.text import data as text_data
from d2v_jax.modalities.text import batching, shards, tokenizer
from d2v_jax.modalities.text import masking as text_masking


def validate(config: ml_collections.ConfigDict) -> None:
    """Text, SMILES and proteins (d2v_jax/models/text.py, d2v_jax/data/text.py)."""
    validate_encoder(config)
    m, k, d = config.model, config.masking, config.data
    t = config.tokenizer
    check_field(t.kind in tokenizer.KINDS, "tokenizer.kind", f"{t.kind!r} not in {list(tokenizer.KINDS)}")
    gpt2_files = (t.get("encoder_json", ""), t.get("vocab_bpe", ""))
    check_field(bool(gpt2_files[0]) == bool(gpt2_files[1]), "tokenizer.encoder_json",
                f"{gpt2_files}: GPT-2's encoder.json and vocab.bpe go together")
    check_field(t.kind in ("gpt2", "auto") or not (any(gpt2_files) or t.get("dict", "")),
                "tokenizer.kind", f"{t.kind!r} with GPT-2 BPE files (tokenizer.encoder_json / "
                "vocab_bpe / dict): set tokenizer.kind='gpt2'")
    sources = (*text_corpus.SOURCES, shards.SOURCE)
    check_field(d.source in sources, "data.source", f"{d.source!r} not in {sources}")
    if d.source == shards.SOURCE:
        check_field(not tuple(d.get("extra_sources", ()) or ()), "data.extra_sources",
                    "a fairseq data directory is read from disk; packaged corpora cannot join it "
                    "(prepare them into the same directory with python -m d2v_jax.prepare)")
    holdout = d.get("holdout_fraction", 0.0)
    check_field(0.0 <= holdout < 1.0, "data.holdout_fraction", f"{holdout} is not in [0, 1)")
    extra = tuple(d.get("extra_sources", ()) or ())
    check_field(all(s in text_corpus.EXTRA_SOURCES for s in extra), "data.extra_sources",
                f"{extra}: each must be a packaged corpus {text_corpus.EXTRA_SOURCES} (files go "
                "in data.source / data.path)")
    check_field(len(set(extra) | {d.source}) == len(extra) + 1, "data.extra_sources",
                f"{extra} repeats a corpus (data.source={d.source!r})")
    labeled_parts = [s for s in (d.source, *extra) if s in text_corpus.LABELED_SOURCES]
    check_field(holdout == 0 or bool(labeled_parts), "data.holdout_fraction",
                f"{holdout} with data.source={d.source!r}: only a labeled set "
                f"{text_corpus.LABELED_SOURCES} (the fine-tune's own file) has a test split to "
                "hold out")
    check_field(d.packing in text_data.PACKINGS, "data.packing", f"{d.packing!r} not in {text_data.PACKINGS}")
    batching.validate(config)
    check_field(d.too_long in text_data.TOO_LONG, "data.too_long", f"{d.too_long!r} not in {text_data.TOO_LONG}")
    check_field(d.on_invalid in ("skip", "error"), "data.on_invalid", f"{d.on_invalid!r} is not 'skip' or 'error'")
    check_field(3 <= d.max_len <= m.max_positions, "data.max_len",
                f"{d.max_len} must be in [3, model.max_positions={m.max_positions}]: a sequence longer "
                "than the learned positions cannot be embedded")
    check_field(k.kind in text_masking.KINDS, "masking.kind", f"{k.kind!r} not in {text_masking.KINDS}")
    if config.version == "v2":
        check_field(k.kind == "random", "masking.kind",
                    "2.0 encodes only the visible tokens, which needs the exact per-row count of "
                    f"'random' masking, not {k.kind!r}")
        check_field(k.leave_unmasked_prob == 0 and k.random_token_prob == 0, "masking.random_token_prob",
                    "2.0 removes masked tokens from the student; leave_unmasked_prob and "
                    "random_token_prob must be 0")
        validate_decoder(config)
    else:
        check_field(k.kind != "random", "masking.kind", "1.0 text masking is 'bert' or 'span'")
        check_field(k.loss_on in ("mask_token", "all"), "masking.loss_on",
                    f"{k.loss_on!r} is not 'mask_token' or 'all'")
    check_field(config.loss.cls_weight == 0, "loss.cls_weight", "the text model has no CLS loss")
    teacher_input = config.ema.get("teacher_input", "clean")
    check_field(teacher_input in ("student", "clean"), "ema.teacher_input",
                f"{teacher_input!r} is not 'student' (the student's embeddings, after its "
                "dropout) or 'clean'")
    check_field(teacher_input == "clean" or "frontend" in tuple(config.ema.shared),
                "ema.teacher_input", "'student' needs the student's embeddings: "
                "ema.shared must hold 'frontend'")
