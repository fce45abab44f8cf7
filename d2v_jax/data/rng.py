"""Per-example random streams of the input pipelines.

All randomness comes from numpy Generators seeded by (config.seed, epoch,
example index, stream), never from global state, so a resumed or re-sharded run
sees the same crops and masks (ARCHITECTURE.md, "Masks in the data pipeline";
SPEC.md section 5).
"""

from __future__ import annotations

import numpy as np

# Independent random streams per example: crops/flips must not shift when the
# masking recipe changes, and vice versa.
AUG_STREAM = 0
MASK_STREAM = 1


def example_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """A Generator that depends only on (seed, epoch, index, stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index), int(stream)]))
