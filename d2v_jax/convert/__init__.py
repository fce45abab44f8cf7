"""Checkpoint conversion between d2v_jax and the PyTorch world (docs/convert.md).

- `from_huggingface(model_or_state_dict, hf_config=None)` -> `Converted`: our
  config and params for a transformers `Data2VecVisionModel`,
  `Data2VecAudioModel` or `Data2VecTextModel`; callable as an encoder with the
  inputs HF takes.
- `to_huggingface(config, params)` -> a transformers model (save it with
  `save_pretrained`; it loads back with `from_pretrained`).
- `from_fairseq(state_dict, config)` -> params and ema_params of a fairseq
  data2vec 2.0 image checkpoint.

torch and transformers are the optional `convert` extra: this package imports
them, the rest of d2v_jax never does.
"""

from d2v_jax.convert.common import Converted, ConversionError
from d2v_jax.convert.fairseq import from_fairseq
from d2v_jax.convert.huggingface import from_huggingface, to_huggingface

__all__ = ["Converted", "ConversionError", "from_fairseq", "from_huggingface",
           "to_huggingface"]
