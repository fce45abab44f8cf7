"""The pipelines' hoisted multi-clone mask loops (input speed) draw
exactly what one masker call per clone draws from the same generator."""

from __future__ import annotations

import numpy as np
import pytest

from d2v_jax.modalities.audio import masking as audio_masking


@pytest.mark.parametrize("frames,valid,ratio,span", [(999, 999, 0.5, 5), (999, 400, 0.65, 5),
                                                      (50, 7, 0.5, 3), (20, 0, 0.5, 5),
                                                      (30, 30, 1.0, 4), (30, 30, 0.0, 1)])
def test_audio_block_1d_clones_equal_the_single_masker(frames, valid, ratio, span):
    cfg = {"kind": "block_1d", "num_clones": 4, "ratio": ratio, "span": span,
           "prob_adjust": 0.05}
    for seed in range(10):
        got = audio_masking.sequence_masks(np.random.default_rng(seed), frames, valid, cfg)
        rng = np.random.default_rng(seed)
        want = np.stack([audio_masking.block_mask_1d(rng, frames, valid, ratio, block_len=span,
                                                     prob_adjust=0.05) for _ in range(4)])
        np.testing.assert_array_equal(got, want)
        assert not got[:, valid:].any()  # padding frames never masked
        assert (got.sum(1) == audio_masking.num_masked_1d(valid, ratio)).all()
