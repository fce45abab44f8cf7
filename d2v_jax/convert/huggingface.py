"""Hugging Face transformers <-> d2v_jax (docs/convert.md has the tables).

Every HF tensor is mapped by name; an HF tensor left over, a missing one or a
shape that does not fit raises `ConversionError` naming it. Architectural
options our model does not have raise instead of being approximated. The
mapping of each model lives with its modality (`modalities/<m>/hf.py`, named by
the registry's `Modality.hf`); this module finds it by `model_type`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import ml_collections
import numpy as np

from d2v_jax import modalities
from d2v_jax.convert.common import (HF_IGNORE, ConversionError, Converted, StateReader,
                                    check_tree, expected_params)


def hf_mapping(modality: str) -> ModuleType:
    """The Hugging Face mapping module of `modality` (ConversionError if none)."""
    entry = modalities.get(modality)
    if not entry.hf:
        raise ConversionError(f"no Hugging Face mapping for modality {modality!r}")
    return importlib.import_module(entry.hf)


def _by_model_type() -> dict[str, ModuleType]:
    mappings = (hf_mapping(name) for name in modalities.names() if modalities.get(name).hf)
    return {m.MODEL_TYPE: m for m in mappings}


def from_huggingface(model_or_state: Any, hf_config: Any = None) -> Converted:
    """A transformers Data2Vec{Vision,Audio,Text}Model (or its state dict plus
    its config) -> `Converted(config, params)`, callable as an encoder.

    Fails with `ConversionError` on an unmapped or unused tensor, a wrong shape,
    or an architecture option our model lacks.
    """
    if hf_config is None:
        if not hasattr(model_or_state, "state_dict") or not hasattr(model_or_state, "config"):
            raise TypeError("from_huggingface: pass a transformers model, or a state dict "
                            "together with its config (hf_config=...)")
        state, hf_config = model_or_state.state_dict(), model_or_state.config
    else:
        state = model_or_state
    kind = getattr(hf_config, "model_type", None)
    kinds = _by_model_type()
    if kind not in kinds:
        raise ConversionError(f"from_huggingface: model_type {kind!r}; expected one of "
                              f"{sorted(kinds)}")
    mapping = kinds[kind]
    config = mapping.config_from_hf(hf_config)
    # A task model (e.g. ...ForImageClassification) prefixes its encoder.
    prefix = mapping.PREFIX
    if any(k.startswith(prefix) for k in state):
        # Other tensors (the task head) stay and are reported as unmapped.
        state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    reader = StateReader(state, f"Hugging Face {kind} state dict", ignore=HF_IGNORE)
    params = mapping.params_from_hf(reader, hf_config, config)
    # A task model's head (CTC, sequence / image classification), if any.
    task, head = mapping.head_from_hf(reader, hf_config)
    reader.finish()
    expected = expected_params(config)
    check_tree(params, {k: expected[k] for k in params}, "from_huggingface")
    return Converted(config, params, head=head, task=task)


def to_huggingface(config: ml_collections.ConfigDict, params: Any, head: Any = None,
                   task: str | None = None):
    """Our config and params (student or EMA teacher) -> a transformers model in
    eval mode; `model.save_pretrained(dir)` writes a folder that
    `Data2Vec*Model.from_pretrained(dir)` loads. With a task `head` (what
    `from_huggingface` / `from_fairseq` return as `.head`, `.task`) the task
    model: Data2VecAudioForCTC, Data2VecTextForSequenceClassification or
    Data2VecVisionForImageClassification."""
    import torch
    mapping = hf_mapping(config.modality)
    # A config HF has no class for fails here, before its params are looked at.
    mapping.check_export(config)
    if (head is None) != (task is None):
        raise ConversionError("to_huggingface: pass head and task together (or neither)")
    params = {k: v for k, v in params.items()}
    needed = mapping.encoder_subtrees(config)
    missing = [k for k in needed if k not in params]
    if missing:
        raise ConversionError(f"to_huggingface: params lack the subtrees {missing} "
                              f"(a {config.modality} encoder needs {list(needed)})")
    expected = expected_params(config)
    check_tree({k: params[k] for k in params if k in expected},
               {k: expected[k] for k in params if k in expected}, "to_huggingface")
    model, sd = mapping.to_hf(config, params, head, task)
    tensors = {k: torch.from_numpy(np.array(v, np.float32, copy=True))
               for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not any(s in k for s in HF_IGNORE)]
    if missing or unexpected:
        raise ConversionError(f"to_huggingface: HF model keys missing {missing[:20]}, "
                              f"unexpected {unexpected[:20]}")
    return model.eval()
