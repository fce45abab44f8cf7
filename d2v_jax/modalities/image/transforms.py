"""Image transforms (numpy + PIL), the per-example pretraining transform and
the pretraining pipeline's parts.

Small named functions, each uint8 [H, W, C] in and out except `normalize`
(the numpy reference of the on-device `model.normalize_pixels`),
composed by `PretrainTransform` (augmentation + masks) and `EvalTransform`
(deterministic). All randomness comes from numpy Generators seeded by
(config.seed, epoch, example index, stream), never from global state, so a
resumed or re-sharded run sees the same crops and masks (ARCHITECTURE.md,
"Masks in the data pipeline"; SPEC.md section 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image, ImageEnhance

from d2v_jax.data.pipeline import holdout_split
from d2v_jax.data.rng import AUG_STREAM, MASK_STREAM, example_rng
from d2v_jax.data.sources import SubsetSource
from d2v_jax.modalities.image import masking
from d2v_jax.modalities.image.sources import make_source
from d2v_jax.errors import ConfigError, DataError

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# BEiT / data2vec use bicubic RandomResizedCrop.
DEFAULT_INTERPOLATION = "bicubic"


def _check_image(image: np.ndarray | Image.Image, where: str) -> np.ndarray | Image.Image:
    if isinstance(image, Image.Image):  # a decoded file (ImageFolderSource(as_pil=True))
        if image.mode not in ("L", "RGB"):
            raise DataError(f"{where}: expected a PIL image in mode L or RGB, got {image.mode}")
        return image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise DataError(f"{where}: expected uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
    return image


def _hwc(image: np.ndarray | Image.Image) -> tuple[int, int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width, 1 if image.mode == "L" else 3
    return image.shape[0], image.shape[1], image.shape[2]


def _to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    # 1-channel images go through mode "L" so PIL filters them as one plane.
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def _from_pil(pil: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(pil, dtype=np.uint8)
    return out[:, :, None] if channels == 1 else out


def _resample(interpolation: str) -> Image.Resampling:
    if interpolation not in _RESAMPLE:
        raise ConfigError(f"unknown interpolation {interpolation!r}; expected one of {sorted(_RESAMPLE)}")
    return _RESAMPLE[interpolation]


def crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> tuple[int, int, int, int]:
    """(top, left, h, w) exactly as torchvision's `RandomResizedCrop.get_params`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centered crop whose aspect lies within `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    rng: np.random.Generator,
    image: np.ndarray,
    size: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    interpolation: str = DEFAULT_INTERPOLATION,
) -> np.ndarray:
    """torchvision RandomResizedCrop: uint8 [H, W, C] (or a PIL image) -> uint8 [size, size, C]."""
    image = _check_image(image, "random_resized_crop")
    return _from_pil(_crop_resize_pil(rng, image, size, scale, ratio, interpolation), _hwc(image)[2])


def _crop_resize_pil(rng, image, size, scale, ratio, interpolation) -> Image.Image:
    height, width, _ = _hwc(image)
    top, left, h, w = crop_params(rng, height, width, scale, ratio)
    # One PIL call crops and resizes (box=), antialiased like torchvision on PIL.
    return _to_pil(image).resize((size, size), _resample(interpolation),
                                 box=(left, top, left + w, top + h))


def color_jitter(rng: np.random.Generator, image: np.ndarray, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0) -> np.ndarray:
    """torchvision ``ColorJitter(brightness, contrast, saturation)`` on PIL images
    (BEiT's 1.0 pretraining transform, SPEC 7): the three adjustments in a random
    order, each with a factor drawn from U[max(0, 1 - v), 1 + v] (skipped when
    v = 0), applied with PIL's ImageEnhance as torchvision does for PIL input.
    Saturation leaves a 1-channel image as it is. uint8 throughout, each
    enhancement rounding to uint8 exactly as torchvision's PIL path; a PIL
    image in gives a PIL image out (the crop follows)."""
    image = _check_image(image, "color_jitter")
    values = (float(brightness), float(contrast), float(saturation))
    if any(v < 0 for v in values):
        raise ConfigError(f"color_jitter: strengths {values} must be >= 0")
    if not any(values):
        return image
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    pil = _to_pil(image)
    for i in rng.permutation(3):
        if values[i] > 0:
            factor = rng.uniform(max(0.0, 1.0 - values[i]), 1.0 + values[i])
            pil = enhancers[i](pil).enhance(factor)
    return pil if isinstance(image, Image.Image) else _from_pil(pil, image.shape[2])


def maybe_flip(rng: np.random.Generator, image: np.ndarray, prob: float = 0.5) -> np.ndarray:
    """Horizontal flip with probability `prob` (one draw from `rng` either way)."""
    return image[:, ::-1] if rng.uniform() < prob else image


def resize_pad(image: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Centers a small image (an MNIST digit) on a black size x size canvas.

    When the image does not fit, it is resized to size x size instead, so a
    digit is never cut.
    """
    image = _check_image(image, "resize_pad")
    height, width, channels = _hwc(image)
    if isinstance(image, Image.Image):
        image = _from_pil(image, channels)
    if height > size or width > size:
        pil = _to_pil(image).resize((size, size), _resample(interpolation))
        return _from_pil(pil, channels)
    out = np.zeros((size, size, channels), dtype=np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    out[top:top + height, left:left + width] = image
    return out


def resize_center_crop(
    image: np.ndarray,
    size: int,
    crop_fraction: float = 0.875,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> np.ndarray:
    """Eval resize: shorter side to int(size / crop_fraction), then a centered
    size x size crop, with torchvision's arithmetic (`Resize(int)`: the longer
    side int(short * long / short_in); `CenterCrop`: offsets int(round(d / 2))),
    as fairseq's and BEiT's eval transforms (Resize(256) + CenterCrop(224) at
    crop_fraction 224 / 256). crop_fraction 1.0: the whole image resized to
    size x size (no border cut; a non-square image is squeezed rather than cropped)."""
    image = _check_image(image, "resize_center_crop")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"resize_center_crop: crop_fraction={crop_fraction} is not in (0, 1]")
    height, width, channels = _hwc(image)
    if crop_fraction == 1:
        return _from_pil(_to_pil(image).resize((size, size), _resample(interpolation)), channels)
    short = int(size / crop_fraction)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    pil = _to_pil(image).resize((new_w, new_h), _resample(interpolation))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return _from_pil(pil.crop((left, top, left + size, top + size)), channels)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [H, W, C], (x / 255 - mean) / std per channel."""
    mean_a = np.asarray(mean, dtype=np.float32).reshape(-1)
    std_a = np.asarray(std, dtype=np.float32).reshape(-1)
    channels = image.shape[-1]
    if mean_a.size not in (1, channels) or std_a.size not in (1, channels):
        raise ValueError(
            f"normalize: mean {tuple(mean_a.shape)} / std {tuple(std_a.shape)} must have 1 or "
            f"{channels} entries for an image of shape {image.shape}")
    return (image.astype(np.float32) * np.float32(1 / 255) - mean_a) / std_a


def _check_stats(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    channels = config.model.channels
    stats = []
    for key in ("mean", "std"):
        value = np.asarray(config.data[key], dtype=np.float32).reshape(-1)
        if value.size not in (1, channels):
            raise ConfigError(
                f"config.data.{key}={tuple(config.data[key])} has {value.size} entries; "
                f"config.model.channels={channels} needs 1 or {channels}")
        stats.append(value)
    if np.any(stats[1] <= 0):
        raise ConfigError(f"config.data.std={tuple(config.data.std)} must be > 0")
    return stats[0], stats[1]


def _check_grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
    size, patch = config.model.image_size, config.model.patch_size
    if size <= 0 or patch <= 0 or size % patch:
        raise ConfigError(
            f"config.model.image_size={size} must be a positive multiple of "
            f"config.model.patch_size={patch}")
    return size // patch, size // patch


def _check_element(element: dict[str, Any], channels: int) -> np.ndarray | Image.Image:
    image = element["image"]
    if isinstance(image, Image.Image):
        if image.mode != ("L" if channels == 1 else "RGB"):
            raise DataError(f"example {element.get('index')}: PIL image mode {image.mode} does "
                            f"not match config.model.channels={channels}")
        return image
    if image.ndim != 3 or image.shape[2] != channels or image.dtype != np.uint8:
        raise DataError(
            f"example {element.get('index')}: image {image.dtype} {image.shape} does not match "
            f"uint8 [H, W, config.model.channels={channels}]")
    return image


class PretrainTransform:
    """(element, epoch) -> {"image": uint8 [S,S,C], "mask": bool [M,N], "label": i32, "index": i32}.

    element is a source record {"image": uint8 [H,W,C], "label", "index"}.
    mnist_5k: resize_pad to S -> random_resized_crop -> flip?;
    image_folder: color_jitter? -> random_resized_crop to S -> flip?.
    Every step stays uint8 (PIL works on uint8, as torchvision's PIL path
    does, so ColorJitter rounds exactly as there); `config.data.mean/std`
    are applied on device, as the model's first op (`model.normalize_pixels`,
    the formula of `normalize` here).
    """

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        if int(config.seed) < 0:
            raise ConfigError(f"config.seed={config.seed} must be >= 0 (it seeds numpy SeedSequences)")
        self.seed = int(config.seed)
        self.size = int(config.model.image_size)
        self.channels = int(config.model.channels)
        self.grid = _check_grid(config)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_clones = int(config.masking.num_clones)
        # Digits are small and centered; padding first keeps them whole.
        self.pad_first = config.data.source == "mnist_5k"
        lo, hi = (float(v) for v in config.data.crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"config.data.crop_scale={tuple(config.data.crop_scale)} must satisfy 0 < lo <= hi <= 1")
        self.crop_scale = (lo, hi)
        rlo, rhi = (float(v) for v in config.data.crop_ratio)
        if not 0 < rlo <= rhi:
            raise ConfigError(f"config.data.crop_ratio={tuple(config.data.crop_ratio)} must satisfy 0 < lo <= hi")
        self.crop_ratio = (rlo, rhi)
        self.flip = bool(config.data.flip)
        jitter = tuple(float(v) for v in config.data.get("color_jitter", (0.0, 0.0, 0.0)))
        if len(jitter) != 3 or min(jitter) < 0:
            raise ConfigError(f"config.data.color_jitter={jitter} must be 3 strengths >= 0 "
                              "(brightness, contrast, saturation)")
        self.color_jitter = jitter
        self.mean, self.std = _check_stats(config)
        # A plain dict pickles cheaply into grain worker processes.
        self.masking_cfg = config.masking.to_dict()

    def __call__(self, element: dict[str, Any], epoch: int) -> dict[str, Any]:
        image = _check_element(element, self.channels)
        index = int(element["index"])
        rng = example_rng(self.seed, epoch, index, AUG_STREAM)
        if self.pad_first:
            image = resize_pad(image, self.size)
        if any(self.color_jitter):  # BEiT: ColorJitter before flip and crop
            image = color_jitter(rng, image, *self.color_jitter)
        image = _check_image(image, "random_resized_crop")
        pil = _crop_resize_pil(rng, image, self.size, self.crop_scale, self.crop_ratio,
                               DEFAULT_INTERPOLATION)
        # maybe_flip's draw, the flip done in PIL: the crop becomes an array once.
        if self.flip and rng.uniform() < 0.5:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = _from_pil(pil, self.channels)
        mask = masking.image_masks(example_rng(self.seed, epoch, index, MASK_STREAM), self.grid, self.masking_cfg)
        if mask.shape != (self.num_clones, self.num_patches) or mask.dtype != np.bool_:
            raise ValueError(
                f"masking.image_masks returned {mask.dtype} {mask.shape}; expected bool "
                f"[config.masking.num_clones={self.num_clones}, {self.num_patches} patches]")
        return {
            # uint8: normalized on device (model.normalize_pixels), 1/4 of float32's bytes.
            "image": image,
            "mask": mask,
            "label": np.int32(element["label"]),
            "index": np.int32(index),
        }


class EvalTransform:
    """element -> {"image": uint8 [S,S,C], "label": i32, "index": i32}; no randomness, no mask.

    mnist_5k: resize_pad to S; image_folder: resize shorter side to S / 0.875 and
    center-crop S (the usual ImageNet eval). Normalized on device, as in pretraining.
    """

    def __init__(self, config: ml_collections.ConfigDict, crop_fraction: float = 0.875) -> None:
        self.size = int(config.model.image_size)
        self.channels = int(config.model.channels)
        _check_grid(config)
        self.pad_only = config.data.source == "mnist_5k"
        self.crop_fraction = float(crop_fraction)
        self.mean, self.std = _check_stats(config)

    def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
        image = _check_element(element, self.channels)
        if self.pad_only:
            image = resize_pad(image, self.size)
        else:
            image = resize_center_crop(image, self.size, self.crop_fraction)
        return {
            "image": np.ascontiguousarray(image),  # uint8; normalized on device
            "label": np.int32(element["label"]),
            "index": np.int32(element["index"]),
        }


def pretrain_parts(config: ml_collections.ConfigDict, source=None):
    """(source, PretrainTransform) for `data.pipeline.map_pretrain_dataset`;
    without the held-out split when `data.holdout_fraction` > 0."""
    # Decoded PIL images: cropped in PIL, only the crop becomes an array.
    src = make_source(config, as_pil=True) if source is None else source
    if config.data.get("holdout_fraction", 0.0) > 0:
        kept, _ = holdout_split(config, src)
        src = SubsetSource(src, kept, name=f"{config.data.source} without the held-out split")
    return src, PretrainTransform(config)


def eval_data(config: ml_collections.ConfigDict, limit: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(images [n,S,S,C] uint8, labels [n]) of the config's source in order,
    through `EvalTransform` (no crops, no masks); the model normalizes uint8
    pixels with `config.data.mean/std` on device."""
    source = make_source(config)
    transform = EvalTransform(config)
    n = len(source) if limit is None else min(int(limit), len(source))
    rows = [transform(source[i]) for i in range(n)]
    return (np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows]))
