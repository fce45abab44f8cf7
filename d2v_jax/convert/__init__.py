"""Checkpoint conversion between d2v_jax and the PyTorch world (docs/convert.md).

- `from_huggingface(model_or_state_dict, hf_config=None)` -> `Converted`: our
  config and params for a transformers `Data2VecVisionModel`,
  `Data2VecAudioModel` or `Data2VecTextModel`; callable as an encoder with the
  inputs HF takes.
- `to_huggingface(config, params)` -> a transformers model (save it with
  `save_pretrained`; it loads back with `from_pretrained`).
- `from_fairseq(checkpoint, num_heads=None)` -> config, params, ema_params of a
  released fairseq data2vec checkpoint: 2.0 (data2vec_multi) image, audio or
  text; 1.0 audio (data2vec_audio, and its CTC fine-tune) or text
  (data2vec_text, and its classification fine-tune; `.head` / `.task`).
- `apply_head(task, head, hidden)`: a converted task head's logits.
- `make_train_state(config, params, ema_params)` -> a step-0 TrainState to
  save with `d2v_jax.save_checkpoint` (then `--init_from` it).
- `python -m d2v_jax.convert {hf-to-jax,jax-to-hf,fairseq-to-jax}` for files.

torch and transformers are the optional `convert` extra: this package imports
them, the rest of d2v_jax never does.
"""

from d2v_jax.convert.common import Converted, ConversionError, make_train_state
from d2v_jax.convert.fairseq import from_fairseq
from d2v_jax.convert.fairseq_common import FairseqConversion
from d2v_jax.convert.heads import apply_head
from d2v_jax.convert.huggingface import from_huggingface, to_huggingface

__all__ = ["Converted", "ConversionError", "FairseqConversion", "apply_head", "from_fairseq",
           "from_huggingface", "make_train_state", "to_huggingface"]
