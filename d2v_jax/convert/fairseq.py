"""fairseq data2vec checkpoints -> our config, params and ema_params.

Each layout's mapping lives with its modality (`modalities/<m>/fairseq.py`,
named by the registry's `Modality.fairseq`): a module with `matches(state)` and
`from_fairseq(checkpoint, num_heads)`. This module picks the one whose keys the
checkpoint holds; docs/convert.md has the tables. Layouts: data2vec_multi
(2.0) IMAGE / AUDIO / TEXT, data2vec_audio (1.0) and its Wav2VecCtc fine-tune,
data2vec_text (1.0) and its classification fine-tune.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from d2v_jax import modalities
from d2v_jax.convert.common import ConversionError
from d2v_jax.convert.fairseq_common import FairseqConversion


def from_fairseq(checkpoint: Mapping[str, Any], num_heads: int | None = None
                 ) -> FairseqConversion:
    """A fairseq data2vec checkpoint (what `torch.load` returns, or its model
    state dict) -> (config, params, ema_params), a tuple that also carries
    `.head` and `.task` for fine-tuned checkpoints (CTC, classification;
    `ema_params` is then None). The config comes from the checkpoint's own
    `cfg` and tensor shapes. `num_heads` is needed when the checkpoint saved
    no cfg. Anything left unmapped raises `ConversionError` naming the keys."""
    state = checkpoint["model"] if "model" in checkpoint else checkpoint
    mappings = {name: importlib.import_module(modalities.get(name).fairseq)
                for name in modalities.names() if modalities.get(name).fairseq}
    for mapping in mappings.values():
        if mapping.matches(state):
            return mapping.from_fairseq(checkpoint, num_heads)
    keys = sorted(state)[:10]
    raise ConversionError(f"fairseq state dict: no known data2vec layout; the mappings "
                          f"{sorted(mappings)} expect their modality's keys "
                          f"({', '.join(m.KEY_PREFIX for m in mappings.values())}); "
                          f"the first keys are {keys}")
