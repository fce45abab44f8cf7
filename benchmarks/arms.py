"""The arms of the label-efficiency benchmark (benchmarks/label_efficiency.py).

A plain module with no absl flags, so that tests can import it next to
`d2v_jax.train` (whose flags a flag-defining benchmark script would clash with).
"""

from __future__ import annotations

from d2v_jax.config import parse_overrides


def label_efficiency_arms(init_from: str, both: str, pretrained: str, scratch: str) -> dict:
    """{arm: fine-tune config overrides}. Scratch builds the pretraining run's own
    architecture (its saved config, --pretrain_overrides included) unless its
    overrides name another `backbone`: the arms differ only in the initial weights."""
    common = parse_overrides(both)
    return {"pretrained": {**common, **parse_overrides(pretrained)},
            "scratch": {"backbone": init_from, **common, **parse_overrides(scratch)}}
