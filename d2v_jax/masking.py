"""Shared pieces of the per-modality maskers (`modalities/*/masking.py`, SPEC 5):
argument checks and config reads. Pure Python/numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return int(value)


def check_float(name: str, value: Any) -> float:
    real = (int, float, np.integer, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def uniform(rng: np.random.Generator, a: float, b: float) -> float:
    # Python's random.uniform(a, b) semantics (as BEiT relies on): a + (b - a) * U[0, 1),
    # well defined even when a > b (e.g. remaining budget below min_num_patches).
    return a + (b - a) * float(rng.random())



def check_ratio(mask_ratio: Any) -> float:
    mask_ratio = check_float("mask_ratio", mask_ratio)
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    return mask_ratio



_MISSING = object()


def get_field(cfg: Any, name: str, default: Any = _MISSING) -> Any:
    """Reads ``name`` from a ConfigDict-like object or a plain mapping."""
    if isinstance(cfg, Mapping):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default)
    if value is _MISSING:
        raise ValueError(f"masking config is missing required field {name!r}")
    return value
