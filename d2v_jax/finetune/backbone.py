"""The backbone: pretrained weights and config from a pretraining work dir, its
run-level preparation, and the labeled data read with its preprocessing."""

from __future__ import annotations

import importlib
import os

import ml_collections

from d2v_jax import checkpoint, modalities
from d2v_jax.config import load_config
from d2v_jax.data import labeled
from d2v_jax.errors import CheckpointError, ConfigError
from d2v_jax.finetune.config import INIT_PARAMS
from d2v_jax.train_state import teacher_view


def load_pretrained(workdir: str, which: str = "student", step: int | None = None
                    ) -> tuple[dict, ml_collections.ConfigDict]:
    """(encoder params, pretraining config) from a pretraining work dir.

    `which='teacher'` returns the teacher's view: the student's params with the
    EMA subtrees (SPEC 4) in place of the student's. Only the params are read,
    never the optimizer state.
    """
    if which not in INIT_PARAMS:
        raise ConfigError(f"config.init.params={which!r}; expected one of {INIT_PARAMS}")
    subtrees = ("params", "ema_params") if which == "teacher" else ("params",)
    restored, config = checkpoint.restore_params(workdir, step, subtrees=subtrees)
    if which == "teacher":
        # Leaf by leaf: a partial ema_params (audio 1.0 shares its conv
        # positions) keeps the student's other leaves of the same module.
        return teacher_view(restored["params"], restored["ema_params"], config), config
    return restored, config


def backbone_config_for(config: ml_collections.ConfigDict, init_from: str | None):
    """(pretrained encoder params or None, the backbone's pretraining config)."""
    if init_from:
        params, bconfig = load_pretrained(init_from, config.init.params, config.init.step)
        if bconfig.modality != config.modality:
            raise CheckpointError(f"--init_from={init_from!r} holds a {bconfig.modality!r} model; "
                                  f"config.modality is {config.modality!r}")
        return params, bconfig
    if not config.backbone:
        raise ConfigError(
            f"config.backbone is empty: a scratch run of data.source={config.data.source!r} "
            "needs the architecture to build (there is no default for your own data, so the "
            "scratch arm cannot silently differ from the pretrained one)",
            hint="pass --config.backbone=<a pretraining work dir> (that run's architecture "
                 f"and tokenizer, fresh weights) or an experiment, e.g. "
                 f"--config.backbone={_example_backbone(config.modality)}; or "
                 "--init_from=<a pretraining work dir> for its weights too")
    if os.path.isdir(config.backbone):  # a pretraining run: its architecture, fresh weights
        bconfig = checkpoint.restore_config(config.backbone)
    else:
        bconfig = load_config(config.backbone)
        if config.data.source in _own_corpus_sources(bconfig.modality):
            bconfig = _tokenize_finetune_data(config, bconfig)
    if bconfig.modality != config.modality:
        raise ConfigError(f"config.backbone={config.backbone!r} is a {bconfig.modality!r} model; "
                          f"config.modality is {config.modality!r}")
    return None, bconfig


def _example_backbone(name: str) -> str:
    """The modality's example experiment for a scratch backbone ('' if none)."""
    return modalities.get(name).example_backbone if name in modalities.names() else ""


def _own_corpus_sources(name: str) -> tuple[str, ...]:
    """The fine-tuning sources a scratch backbone of modality `name` pretrains on
    (`Modality.own_corpus_sources`)."""
    return modalities.get(name).own_corpus_sources if name in modalities.names() else ()


def _tokenize_finetune_data(config: ml_collections.ConfigDict,
                            bconfig: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`bconfig` with the fine-tune's labeled file as its corpus, the test rows
    held out (modalities/text/corpus.py reads the fine-tuning sets), so a scratch
    backbone's tokenizer is trained on the fine-tune's own training rows."""
    bconfig = ml_collections.ConfigDict(bconfig.to_dict())
    d, b = config.data, bconfig.data
    b.source, b.path = d.source, d.path
    for key in ("text_column", "label_column", "smiles_column"):
        if key in d:
            b[key] = d[key]
    b.holdout_fraction, b.holdout_seed = float(d.test_fraction), int(d.split_seed)
    return bconfig


def prepare_backbone(bconfig: ml_collections.ConfigDict, init_from: str | None,
                     workdir: str | None) -> ml_collections.ConfigDict:
    """The modality's run-level set-up of the backbone config (its
    `Modality.prepare_backbone`, e.g. the text tokenizer), on a copy."""
    bconfig = ml_collections.ConfigDict(bconfig.to_dict())
    return modalities.get(bconfig).prepare_backbone(bconfig, init_from, workdir)


# Model fields a backbone config may lack (read with a default by the model).
OPTIONAL_MODEL_FIELDS = ("final_norm",)


def with_encoder_overrides(config: ml_collections.ConfigDict,
                           bconfig: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The backbone config with `config.encoder`'s fields (dropout, layer-drop,
    feature_grad_mult, ...) in place of its `model` ones (the CTC recipe); a
    field the backbone's model lacks is an error naming it."""
    if "encoder" not in config:
        return bconfig
    bconfig = ml_collections.ConfigDict(bconfig.to_dict())
    for key, value in config.encoder.items():
        if key not in bconfig.model and key not in OPTIONAL_MODEL_FIELDS:
            raise ConfigError(f"config.encoder.{key}: the backbone's model has no field {key!r}")
        bconfig.model[key] = value
    return bconfig


def make_labeled_data(config: ml_collections.ConfigDict,
                      backbone_config: ml_collections.ConfigDict) -> labeled.LabeledData:
    """The task of `config` (a fine-tune config) read with `backbone_config`'s
    preprocessing by the modality's `labeled_parts`; splits as in
    `data.labeled.labeled_data`."""
    entry = modalities.get(config)
    if config.task == "ctc":  # transcribed speech: the modality's ASR hooks
        if entry.asr is None:
            raise ConfigError(f"config.task='ctc': the {config.modality!r} modality has no "
                              "transcribed data (its Modality record sets no `asr`)")
        return importlib.import_module(entry.asr).asr_data(config, backbone_config)
    if entry.labeled_parts is None:
        raise ConfigError(f"config.modality={config.modality!r} has no labeled data for "
                          "fine-tuning (its Modality record sets no labeled_parts)")
    if config.task not in labeled.TASKS:
        raise ConfigError(f"config.task={config.task!r}; expected one of {labeled.TASKS}")
    return labeled.labeled_data(config, *entry.labeled_parts(config, backbone_config))


def held_out_of_pretraining(config: ml_collections.ConfigDict,
                            bconfig: ml_collections.ConfigDict, data=None) -> bool | None:
    """Whether the pretraining run kept this fine-tune's test split out: it
    pretrained on this very labeled set (same `data.source`, `path`, cache and
    columns: text / SMILES pretraining reads the fine-tuning sets as corpora,
    modalities/text/corpus.py) with `data.holdout_fraction` / `holdout_seed` equal
    to our `data.test_fraction` / `split_seed` (data/pipeline.py; the set may be
    one of its packaged `data.extra_sources`), and our class
    ids in the sorted order that pretraining stratifies by. False when the
    corpus was another one (e.g. text tiny's pydoc topics, not the docstrings):
    then nothing was held out, and nothing needed to be.
    CTC: the modality's file-by-file check of the test utterances."""
    if config.task == "ctc":
        asr = importlib.import_module(modalities.get(config).asr)
        return asr.held_out_of_pretraining(config, bconfig, data)
    d, b = config.data, bconfig.data
    # data.source, or one of the packaged data.extra_sources (text / SMILES).
    parts = [(b.get("source"), b.get("path", ""))] + [
        (s, "") for s in tuple(b.get("extra_sources", ()) or ())]
    same = (any(s == d.source and _same_path(p, d.get("path", "")) for s, p in parts)
            and float(b.get("holdout_fraction", 0.0)) == float(d.test_fraction)
            and int(b.get("holdout_seed", -1)) == int(d.split_seed))
    # The fields that choose the rows, where both configs have them.
    for key in ("cache_dir", "text_column", "label_column", "smiles_column"):
        if same and key in d and key in b and d.source in _READS.get(key, (d.source,)):
            same = b[key] == d[key]
    classes = tuple(d.get("classes", ()) or ())
    return bool(same and list(classes) == sorted(classes))


def _same_path(a: str, b: str) -> bool:
    """Equal, or the same file / folder spelt differently (`images` and
    `./images/`, relative to this process's working directory)."""
    return a == b or (bool(a) and bool(b) and os.path.exists(a)
                      and os.path.realpath(a) == os.path.realpath(b))


# Which labeled sources each row-choosing field applies to (default: any).
_READS = {"cache_dir": ("espeak_words",), "text_column": ("text_tsv",), "label_column": ("text_tsv",),
          "smiles_column": ("smiles_csv",)}
