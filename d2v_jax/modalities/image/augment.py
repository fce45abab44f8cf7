"""Host-side image fine-tuning augmentation of the official recipes: timm's
RandAugment (`rand-m9-mstd0.5-inc1`) and the boxes of timm's random erasing.

data2vec 2.0 (fairseq `mae_finetuning_image_dataset.py`) and 1.0 (BEiT
`datasets.py`) build their training transform with timm's `create_transform`:
random-resized crop (bicubic) -> flip -> RandAugment -> normalize -> random
erasing. RandAugment is written here on PIL, op for op as timm's
`auto_augment.py` (same PIL calls, same level-to-argument maps), with every
random draw from a numpy Generator seeded per example, so a resumed run sees
the same images; tests/test_image_augment.py feeds the same draws to timm and
gets the same pixels. Random erasing replaces a box of the *normalized* image
with N(0, 1) noise, which a uint8 pipeline cannot hold: the box is drawn here
(timm's algorithm) and shipped with the batch, the noise is drawn on the
device (`mixing.erase`).

Not timm itself: timm's package imports torch and torchvision at import time,
which a JAX input pipeline (grain workers) should not need.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from d2v_jax.errors import ConfigError

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M maps to the fraction M / 10

# timm's `_RAND_TRANSFORMS` and (inc1) `_RAND_INCREASING_TRANSFORMS`, in timm's order.
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate",
                              "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                              "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                              "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
# Ops whose argument gets a random sign (timm `_randomly_negate`).
SIGNED = frozenset({"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
    """A parsed timm RandAugment string, e.g. `rand-m9-mstd0.5-inc1`: `num_layers`
    ops per image (n, default 2), each applied with probability `prob` (p, 0.5)
    at magnitude `magnitude` (m, 10) plus N(0, `magnitude_std`) noise (mstd; inf
    = uniform in [0, m]), clipped to [0, `magnitude_max`] (mmax, 10); inc1 picks
    the ops whose strength increases with the magnitude."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def parse_rand_augment(spec: str) -> RandAugmentPolicy | None:
    """timm's `rand_augment_transform` config string -> a policy ('' or 'none'
    is no RandAugment: None). Weighted op sets (`t...`) are not supported."""
    if not spec or spec == "none":
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"config.data.rand_augment={spec!r}: expected a timm RandAugment "
                          "string 'rand-m<M>[-n<N>][-mstd<S>][-inc<0|1>][-p<P>][-mmax<X>]', "
                          "e.g. 'rand-m9-mstd0.5-inc1'")
    kw = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([0-9.]*)", part)
        key, value = match.groups() if match else (part, "")
        try:
            if key == "m":
                kw["magnitude"] = float(int(value))
            elif key == "n":
                kw["num_layers"] = int(value)
            elif key == "p":
                kw["prob"] = float(value)
            elif key == "mstd":
                std = float(value)
                kw["magnitude_std"] = math.inf if std > 100 else std
            elif key == "mmax":
                kw["magnitude_max"] = float(int(value))
            elif key == "inc":
                kw["increasing"] = bool(int(value))
            else:
                raise ValueError(key)
        except ValueError:
            raise ConfigError(f"config.data.rand_augment={spec!r}: cannot read section "
                              f"{part!r} (known: m, n, p, mstd, mmax, inc)") from None
    return RandAugmentPolicy(**kw)


def _signed(value: float, negate: bool) -> float:
    return -value if negate else value


def op_argument(name: str, magnitude: float, negate: bool) -> float | int | None:
    """timm's LEVEL_TO_ARG for one op at `magnitude` (already noised and clipped),
    with the sign chosen by `negate` for the signed ops."""
    level = magnitude / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return _signed(level * 30.0, negate)
    if name == "Posterize":
        return int(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if name == "Solarize":
        return min(256, int(level * 256))
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(level * 256))
    if name == "SolarizeAdd":
        return min(128, int(level * 110))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/SharpnessIncreasing
        return max(0.1, 1.0 + _signed(level * 0.9, negate))
    if name in ("ShearX", "ShearY"):
        return _signed(level * 0.3, negate)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _signed(level * 0.45, negate)
    raise ValueError(f"unknown RandAugment op {name!r}")


_ENHANCE = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
            "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


def apply_op(img: Image.Image, name: str, arg, fill, resample=Image.Resampling.BICUBIC
             ) -> Image.Image:
    """One RandAugment op on a PIL image, the PIL calls of timm's op functions;
    `fill` is the colour of pixels moved in from outside (timm: the mean pixel)."""
    geo = {"fillcolor": fill, "resample": resample}
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, **geo)
    if name.startswith("Posterize"):
        if arg >= 8:
            return img
        # ImageOps.posterize's lut, kept for bits = 0 (PosterizeIncreasing at
        # magnitude 10): the Pillow of the official runs gave a black image,
        # Pillow >= 10 refuses the value.
        mask = ~(2 ** (8 - arg) - 1) & 0xFF
        return img.point([i & mask for i in range(256)] * len(img.getbands()))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return ImageOps.solarize(img, arg)
    if name == "SolarizeAdd":
        lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
        return img.point(lut * (3 if img.mode == "RGB" else 1))
    base = name.removesuffix("Increasing")
    if base in _ENHANCE:
        return _ENHANCE[base](img).enhance(arg)
    w, h = img.size
    matrix = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
              "TranslateXRel": (1, 0, arg * w, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, arg * h)}.get(name)
    if matrix is None:
        raise ValueError(f"unknown RandAugment op {name!r}")
    return img.transform(img.size, Image.Transform.AFFINE, matrix, **geo)


@dataclasses.dataclass(frozen=True)
class Step:
    """One drawn layer of RandAugment: the op, whether it fires, its magnitude
    (noised and clipped) and the sign of its argument."""

    op: str
    applied: bool
    magnitude: float
    negate: bool


def sample_plan(rng: np.random.Generator, policy: RandAugmentPolicy) -> list[Step]:
    """The random part of timm's RandAugment.__call__ / AugmentOp.__call__:
    `num_layers` ops uniformly with replacement, each applied with `prob`, its
    magnitude N(m, mstd) (or U[0, m] when mstd is inf) clipped to [0, mmax],
    and a fair coin for the sign."""
    ops = policy.ops
    plan = []
    for i in rng.integers(0, len(ops), policy.num_layers):
        applied = policy.prob >= 1.0 or rng.uniform() <= policy.prob
        m = policy.magnitude
        if policy.magnitude_std == math.inf:
            m = rng.uniform(0, m)
        elif policy.magnitude_std > 0:
            m = rng.normal(m, policy.magnitude_std)
        m = max(0.0, min(m, policy.magnitude_max))
        plan.append(Step(ops[int(i)], bool(applied), float(m), bool(rng.uniform() > 0.5)))
    return plan


def fill_color(mean: Sequence[float], mode: str):
    """timm's `img_mean` fill, tuple(round(255 * mean)) per channel; one value
    for a 1-channel ('L') image."""
    values = tuple(min(255, round(255 * float(m))) for m in mean)
    if mode == "L":
        return values[0]
    return values if len(values) == 3 else values * 3


def rand_augment(img: Image.Image, plan: Sequence[Step], fill) -> Image.Image:
    for step in plan:
        if step.applied:
            img = apply_op(img, step.op, op_argument(step.op, step.magnitude, step.negate), fill)
    return img


# --- random erasing (timm RandomErasing), the box half -----------------------------

ERASE_MODES = ("pixel", "rand", "const")


@dataclasses.dataclass(frozen=True)
class RandomErasing:
    """timm's RandomErasing parameters (`re_prob`, `re_mode`, `re_count`; the
    area and aspect bounds are timm's defaults)."""

    prob: float = 0.25
    mode: str = "pixel"
    count: int = 1
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3

    def __post_init__(self):
        if not 0 <= self.prob <= 1:
            raise ConfigError(f"config.data.random_erasing.prob={self.prob} is not in [0, 1]")
        if self.mode not in ERASE_MODES:
            raise ConfigError(f"config.data.random_erasing.mode={self.mode!r}; expected one of "
                              f"{ERASE_MODES}")
        if self.count < 1:
            raise ConfigError(f"config.data.random_erasing.count={self.count} < 1")

    def boxes(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """int32 [count, 4]: (top, left, h, w) of each erased box, h = w = 0 for
        none. timm's `_erase`: with probability `prob`, per box up to 10 tries of
        area U[min, max] x H x W / count and log-uniform aspect in
        [min_aspect, 1 / min_aspect]; a try fits when h < H and w < W, then the
        corner is uniform."""
        out = np.zeros((self.count, 4), np.int32)
        if rng.uniform() > self.prob:
            return out
        area, log_ratio = height * width, (math.log(self.min_aspect), -math.log(self.min_aspect))
        for k in range(self.count):
            for _ in range(10):
                target = rng.uniform(self.min_area, self.max_area) * area / self.count
                aspect = math.exp(rng.uniform(*log_ratio))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if w < width and h < height:
                    out[k] = (rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w)
                    break
        return out
