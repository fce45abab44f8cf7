"""The modality registry: one `Modality` record per modality, looked up by name.

Train, finetune, api, flops, convert and config validation ask the registry
and name no modality; everything a modality is lives in its folder
`d2v_jax/modalities/<name>/` and reaches the rest of the code through its
record. A new modality is one folder that calls `register` (a test adds a toy
one from the test folder, docs/architecture.md walks through it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

Config = ml_collections.ConfigDict


def _unchanged(config: Config, workdir: str | None) -> Config:
    del workdir
    return config


def _prepare_backbone(entry: "Modality") -> Callable:
    def prepare(config: Config, init_from: str | None, workdir: str | None) -> Config:
        del init_from
        return entry.prepare(config, workdir)
    return prepare


@dataclasses.dataclass(frozen=True)
class Modality:
    """What the generic code needs of a modality.

    Required:
      name: the `config.modality` value.
      build_model(config) -> the Flax module with `student`, `teacher` and
        `encode` methods (SPEC 2-6; see modalities/image/model.py).
      teacher_modules: the top-level parameter subtrees the teacher uses.
      dummy_batch(config, batch_size) -> a batch of the pipeline's shapes with
        valid masks, for `init` and tracing.
      validate(config): raises ValueError naming the first impossible field.
      pretrain_dataset(config, *, process_index, process_count, source,
        num_threads, prefetch_buffer_size) -> endless grain batches.
      step_flops(config, batch_size, clones) -> `models.flops.StepFlops`.
    Optional:
      prepare(config, workdir) -> config: run-level set-up before the model is
        built (text: train or reload the tokenizer, set model.vocab_size).
      prepare_backbone(config, init_from, workdir) -> config: the same for a
        fine-tune's backbone (default: `prepare(config, workdir)`).
      labeled_parts(config, backbone_config) -> (source, labels, class names,
        train transform, eval transform) of a fine-tuning task.
      input_key: the batch key a bare array goes to in `d2v_jax.encode`.
      eval_data(config, limit) -> (inputs, labels) for `d2v_jax.load_eval_data`.
      hf / fairseq: module paths of the checkpoint mappings (they import torch
        lazily, so they are loaded only by `d2v_jax.convert`).
      asr: module path of the CTC speech-recognition hooks of `d2v_jax.finetune`
        (`asr_data`, `encode`, `mask_embedding`, `held_out_of_pretraining`; see
        modalities/audio/asr.py).
      example_backbone: an experiment a scratch fine-tune can take as
        `config.backbone`, named in the error hint when it sets none.
      shards: module path of the corpus -> shards writer of `python -m
        d2v_jax.prepare` (`prepare_shards(config, out, workers=, chunk_mb=)`,
        `attach_tokenizer(config, run_dir)`; text).
      own_corpus_sources: fine-tuning `data.source`s (the user's own files)
        that a scratch backbone from an experiment file pretrains on, the test
        rows held out, so its `prepare` (text: the tokenizer) sees the
        fine-tune's own training rows (finetune/backbone.py).
    """

    name: str
    build_model: Callable[[Config], Any]
    teacher_modules: tuple[str, ...]
    dummy_batch: Callable[[Config, int], dict]
    validate: Callable[[Config], None]
    pretrain_dataset: Callable[..., Any]
    step_flops: Callable[[Config, int, int], Any]
    prepare: Callable[[Config, str | None], Config] = _unchanged
    prepare_backbone: Callable[[Config, str | None, str | None], Config] | None = None
    labeled_parts: Callable[[Config, Config], tuple] | None = None
    input_key: str | None = None
    eval_data: Callable[[Config, int | None], tuple] | None = None
    hf: str | None = None
    fairseq: str | None = None
    asr: str | None = None
    example_backbone: str = ""
    own_corpus_sources: tuple[str, ...] = ()
    shards: str | None = None

    def __post_init__(self):
        if self.prepare_backbone is None:
            object.__setattr__(self, "prepare_backbone", _prepare_backbone(self))


_REGISTRY: dict[str, Modality] = {}


def register(entry: Modality) -> Modality:
    """Adds `entry` (replacing one of the same name, so a test or notebook can
    re-register while it edits a modality) and returns it."""
    if not isinstance(entry, Modality):
        raise TypeError(f"register: expected a Modality, got {type(entry).__name__}")
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name_or_config: str | Config) -> Modality:
    """The record of a modality name, or of `config.modality`."""
    name = name_or_config if isinstance(name_or_config, str) else name_or_config.modality
    if name not in _REGISTRY:
        raise ValueError(f"config.modality={name!r}; expected one of {list(names())} "
                         "(a new modality registers a d2v_jax.modalities.Modality)")
    return _REGISTRY[name]
