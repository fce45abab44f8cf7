"""The pretraining optimizer's schedules (SPEC 7) against hand-computed values."""

import math

import numpy as np
import pytest

from d2v_jax import optim
from d2v_jax.config import load_config


def test_tri_stage_matches_hand_computed_values():
    # fairseq tri_stage, max_update 1000, phase_ratio (0.03, 0.9, 0.07): 30 warm-up
    # steps from 0.01 x 5e-4, 900 at 5e-4, 70 of exponential decay to 0.01 x 5e-4.
    lr = optim.tri_stage_schedule(5e-4, 1000, (0.03, 0.9, 0.07), 0.01, 0.01)
    hand = {
        0: 5e-6,                          # init_lr
        15: 5e-6 + (5e-4 - 5e-6) / 30 * 15,  # linear warm-up
        29: 5e-6 + (5e-4 - 5e-6) / 30 * 29,
        30: 5e-4, 500: 5e-4, 929: 5e-4,   # hold
        930: 5e-4,                        # decay, 0 steps in
        965: 5e-5,                        # 35 of 70 steps: exp(-ln(100) / 2) = 0.1
        1000: 5e-6,                       # end of the decay = final_lr
        1001: 5e-6, 5000: 5e-6,           # after: final_lr
    }
    for step, want in hand.items():
        np.testing.assert_allclose(float(lr(step)), want, rtol=1e-5, err_msg=f"step {step}")


def test_audio_base_v1_selects_the_official_tri_stage():
    config = load_config("experiments/audio.py:base_v1", {})
    lr = optim.make_schedule(config)
    # 400k updates: 12,000 warm-up, 360,000 hold, 28,000 decay; peak 5e-4.
    np.testing.assert_allclose(float(lr(0)), 5e-6, rtol=1e-5)
    np.testing.assert_allclose(float(lr(12_000)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(372_000 + 14_000)), 5e-4 * math.exp(-math.log(100) / 2),
                               rtol=1e-4)
    np.testing.assert_allclose(float(lr(400_000)), 5e-6, rtol=1e-4)


def test_schedule_config_errors():
    with pytest.raises(ValueError, match="phase_ratio=.*add up to 1"):
        optim.tri_stage_schedule(1e-3, 100, (0.1, 0.1, 0.1), 0.01, 0.01)
    config = load_config("experiments/audio.py:tiny_v1", {"optim.schedule": "linear"})
    with pytest.raises(ValueError, match="optim.schedule='linear'"):
        optim.make_schedule(config)
