"""The fine-tuned task heads that converted checkpoints carry (docs/convert.md).

A head is a params dict plus its task name; `apply_head(task, head, hidden)`
runs it on our encoder's last hidden state `encode(batch)`:

  ctc             per-frame Linear `head`: `w2v_encoder.proj` (fairseq
                  Wav2VecCtc), `lm_head` (HF Data2VecAudioForCTC) -> logits
                  [B, T, V].
  classification  RoBERTa's head on the first token: dense -> tanh -> out_proj
                  (fairseq `classification_heads.<name>`, HF
                  Data2VecTextForSequenceClassification `classifier`) -> [B, C].
  image_classification
                  BEiT's: mean over the patch tokens (CLS left out) -> LayerNorm
                  `fc_norm` -> Linear `head` (HF Data2VecVisionForImageClassification
                  with use_mean_pooling), or the CLS token -> `head` without
                  `fc_norm` -> [B, C]. The same names as `finetune.FinetuneModel`
                  (pool "mean", norm "layer"), so the head drops into a fine-tune.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

TASKS = ("ctc", "classification", "image_classification")


def _dense(p: Mapping[str, Any], x):
    return x @ jnp.asarray(p["kernel"]) + jnp.asarray(p["bias"])


def _layer_norm(p: Mapping[str, Any], x, eps: float):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * jnp.asarray(p["scale"]) + jnp.asarray(p["bias"])


def apply_head(task: str, head: Mapping[str, Any], hidden: Any, eps: float = 1e-6) -> np.ndarray:
    """Task logits from the encoder's last hidden state [B, T, D]."""
    x = jnp.asarray(hidden, jnp.float32)
    if task == "ctc":
        out = _dense(head["head"], x)
    elif task == "classification":
        out = _dense(head["out_proj"], jnp.tanh(_dense(head["dense"], x[:, 0])))
    elif task == "image_classification":
        if "fc_norm" in head:
            f = _layer_norm(head["fc_norm"], x[:, 1:].mean(1), eps)
        else:
            f = x[:, 0]
        out = _dense(head["head"], f)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return np.asarray(out)


HEAD_FILE = "task_head.npz"  # what `fairseq-to-jax` writes beside a fine-tuned model's checkpoint


def save_head(path: str, task: str, head: Mapping[str, Any]) -> str:
    """A task head -> one .npz (arrays under '/'-joined paths, plus `task`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    flat = traverse_util.flatten_dict(dict(head), sep="/")
    np.savez(path, __task__=np.array(task), **{k: np.asarray(v) for k, v in flat.items()})
    return path


def load_head(path: str) -> tuple[str, dict[str, Any]]:
    """`save_head`'s file -> (task, head)."""
    with np.load(path) as f:
        task = str(f["__task__"])
        flat = {k: f[k] for k in f.files if k != "__task__"}
    return task, traverse_util.unflatten_dict(flat, sep="/")
