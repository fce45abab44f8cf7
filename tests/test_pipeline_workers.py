"""data.num_workers: an int or "auto" (grain worker processes by default where
the cores allow; none on <= 2 cores, where starting them costs more than they
give back: docs/performance.md)."""

from __future__ import annotations

import pytest

from d2v_jax.config import load_config
from d2v_jax.data.pipeline import resolve_num_workers
from d2v_jax.errors import ConfigError

from helpers import AUDIO, IMAGE, TEXT


@pytest.mark.parametrize("cores,expected", [(1, 0), (2, 0), (3, 2), (16, 15), (33, 32), (256, 32)])
def test_auto_rule(cores, expected):
    assert resolve_num_workers("auto", cores=cores) == expected
    assert resolve_num_workers("AUTO", cores=cores) == expected


def test_ints_pass_and_bad_values_name_the_field():
    assert resolve_num_workers(0) == 0 and resolve_num_workers(5) == 5
    for bad in (-1, 1.5, "four", True, None):
        with pytest.raises(ConfigError, match="config.data.num_workers"):
            resolve_num_workers(bad)


@pytest.mark.parametrize("path", [IMAGE, AUDIO, TEXT])
def test_defaults_and_overrides_either_way(path):
    # tiny configs (the tests' and the CPU quick runs') stay in-process; base is "auto".
    assert load_config(f"{path}:tiny_v2").data.num_workers == 0
    assert load_config(f"{path}:base_v2").data.num_workers == "auto"
    # An int overrides "auto" and "auto" an int (a field of type object).
    assert load_config(f"{path}:base_v2", {"data.num_workers": 3}).data.num_workers == 3
    assert load_config(f"{path}:tiny_v2", {"data.num_workers": "auto"}).data.num_workers == "auto"
