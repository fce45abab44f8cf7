"""Random time-step masking with an exact count per row, and the config checks."""

import numpy as np

from d2v_jax.errors import check_field


def num_masked(config) -> int:
    return int(config.masking.ratio * config.data.length)


def num_keep(config) -> int:
    """Time steps the 2.0 student encodes per row."""
    return int(config.data.length) - num_masked(config)


def masks(rng: np.random.Generator, config) -> np.ndarray:
    """bool [M, T]: each clone masks exactly `num_masked` steps, True = masked."""
    t, k = int(config.data.length), num_masked(config)
    out = np.zeros((config.masking.num_clones, t), bool)
    for row in out:
        row[rng.choice(t, k, replace=False)] = True
    return out


def validate(config) -> None:
    check_field(config.version == "v2", "version", "the toy sensor model is data2vec 2.0 only")
    check_field(0 < num_masked(config) < config.data.length, "masking.ratio",
                f"{config.masking.ratio} masks no step or every step of data.length="
                f"{config.data.length}")
    check_field(config.data.channels >= 1, "data.channels", f"{config.data.channels} < 1")
