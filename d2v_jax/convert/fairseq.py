"""fairseq data2vec checkpoints -> our config, params and ema_params.

Each layout's mapping lives with its modality (`modalities/<m>/fairseq.py`,
named by the registry's `Modality.fairseq`): a module with `matches(state)` and
`from_fairseq(checkpoint, num_heads)`. This module picks the one whose keys the
checkpoint holds; docs/convert.md has the tables.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import ml_collections

from d2v_jax import modalities
from d2v_jax.convert.common import ConversionError


def from_fairseq(checkpoint: Mapping[str, Any], num_heads: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """A fairseq data2vec checkpoint (what `torch.load` returns, or its model
    state dict) -> (config, params, ema_params). `num_heads` is needed when the
    checkpoint saved no cfg. Anything left unmapped raises `ConversionError`."""
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
