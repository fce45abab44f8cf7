"""timm's augmentation code as the tests' reference, loaded file by file.

The official fine-tuning recipes (fairseq's data2vec 2.0 image fine-tune,
BEiT's run_class_finetuning.py) build their augmentation with timm. timm's
package `__init__` imports torchvision, which does not import beside the CPU
torch this project pins, so the tests load the few modules they compare
against by path: `auto_augment.py` (PIL and numpy only), `random_erasing.py`
and `mixup.py` (torch), `loss/cross_entropy.py` (torch). CI installs timm with
`pip install --no-deps timm==1.0.24` (.ci/run): 1.0.24 is the newest release
whose cutmix box is `cy +- cut_h // 2`, the timm of the official runs (1.0.29
changed the upper edge to `cy + (cut_h + 1) // 2`).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

TIMM_VERSION = "1.0.24"


def timm_root() -> str:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"timm is not installed; the augmentation tests compare against it: "
                    f"pip install --no-deps timm=={TIMM_VERSION} (as .ci/run does)")
    return list(spec.submodule_search_locations)[0]


def load(relpath: str):
    """A fresh copy of timm/<relpath>.py as a module of its own (tests may
    replace its `random` / `np` to feed it chosen draws)."""
    path = os.path.join(timm_root(), *relpath.split("/")) + ".py"
    name = "timm_reference_" + relpath.replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FeedRandom:
    """A stand-in for the `random` module that returns the values it is given,
    in order, and fails if asked for more (or for another kind of draw)."""

    def __init__(self, draws):
        self.draws = list(draws)

    def _next(self, kind):
        if not self.draws:
            raise AssertionError(f"timm asked for an unexpected {kind} draw")
        got_kind, value = self.draws.pop(0)
        if got_kind != kind:
            raise AssertionError(f"timm asked for a {kind} draw where {got_kind} was planned")
        return value

    def random(self):
        return self._next("random")

    def gauss(self, mu, sigma):
        return self._next("gauss")

    def uniform(self, a, b):
        return self._next("uniform")

    def randint(self, a, b):
        return self._next("randint")

    def choice(self, seq):
        return self._next("choice")
