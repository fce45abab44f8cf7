"""Labeled images for fine-tuning: the backbone's preprocessing on the task's
images (`mnist_5k`, `image_folder`), with seeded crop augmentation."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from d2v_jax.data.rng import AUG_STREAM, example_rng
from d2v_jax.modalities.image import transforms as image_ops
from d2v_jax.modalities.image.sources import make_source
from d2v_jax.errors import ConfigError


class ImageFinetuneTransform:
    """(element, epoch) -> {"image": uint8 [S,S,C], "label"}: seeded crop augmentation
    (normalized on device by the backbone, `model.normalize_pixels`).

    mnist_5k digits are first padded onto the S x S canvas (as in pretraining);
    `data.crop_scale` / `crop_ratio` set the random-resized crop, `data.flip`
    the horizontal flip. With `data.augment = False` it is the eval transform.
    """

    def __init__(self, config: ml_collections.ConfigDict, view: ml_collections.ConfigDict) -> None:
        d = config.data
        self.seed = int(config.seed)
        self.augment = bool(d.augment)
        self.size = int(view.model.image_size)
        self.pad_first = view.data.source == "mnist_5k"
        self.crop_scale = tuple(float(v) for v in d.crop_scale)
        self.crop_ratio = tuple(float(v) for v in d.crop_ratio)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"config.data.crop_scale={d.crop_scale} must satisfy 0 < lo <= hi <= 1")
        self.flip = bool(d.flip)
        # data.eval_crop_ratio: 0.875 = ImageNet's resize + centre crop, 1.0 = the whole image.
        ratio = float(d.get("eval_crop_ratio", 0.875))
        if not 0 < ratio <= 1:
            raise ConfigError(f"config.data.eval_crop_ratio={ratio} is not in (0, 1] (1.0 = the "
                              "whole image resized to the model's size, no crop)")
        self.eval = image_ops.EvalTransform(view, crop_fraction=ratio)

    def __call__(self, element: dict[str, Any], epoch: int) -> dict[str, Any]:
        if not self.augment:
            return self.eval(element)
        image = element["image"]
        rng = example_rng(self.seed, epoch, int(element["index"]), AUG_STREAM)
        if self.pad_first:
            image = image_ops.resize_pad(image, self.size)
        image = image_ops.random_resized_crop(rng, image, self.size, self.crop_scale, self.crop_ratio)
        if self.flip:
            image = image_ops.maybe_flip(rng, image)
        return self.eval({**element, "image": np.ascontiguousarray(image)})


def image_view(config: ml_collections.ConfigDict,
               backbone_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The backbone's config (image size, channels, normalization) pointed at
    the fine-tune data (`config.data.source`, `config.data.path`)."""
    view = ml_collections.ConfigDict(backbone_config.to_dict())
    view.data.source = config.data.source
    view.data.path = config.data.path
    return view


def labeled_parts(config, backbone_config):
    """(source, labels, class names, train transform, eval transform) of an image task."""
    view = image_view(config, backbone_config)
    source = make_source(view)
    if hasattr(source, "labels"):  # folder sources know their labels without decoding
        labels = np.asarray(source.labels)
    else:
        labels = np.asarray([source[i]["label"] for i in range(len(source))])
    transform = ImageFinetuneTransform(config, view)
    return source, labels, list(getattr(source, "classes", [])) or None, transform, transform.eval
