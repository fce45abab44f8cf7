"""Labeled images for fine-tuning: the backbone's preprocessing on the task's
images (`mnist_5k`, `image_folder`), with seeded augmentation: the
random-resized crop and flip, and for the official ImageNet protocols timm's
RandAugment and random erasing (`augment.py`) plus mixup / cutmix and label
smoothing on the device (`mixing.py`, reached as the train transform's
`device_augment`)."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from d2v_jax.data.rng import AUG_STREAM, example_rng
from d2v_jax.errors import ConfigError, DataError
from d2v_jax.modalities.image import augment, mixing
from d2v_jax.modalities.image import transforms as image_ops
from d2v_jax.modalities.image.sources import make_source


class ImageFinetuneTransform:
    """(element, epoch) -> {"image": uint8 [S,S,C], "label", "index"[, "erase_box"]}:
    seeded augmentation (normalized on device by the backbone,
    `model.normalize_pixels`, or by `device_augment`).

    mnist_5k digits are first padded onto the S x S canvas (as in pretraining);
    then the random-resized crop (`data.crop_scale`, `crop_ratio`, bicubic), the
    horizontal flip (`data.flip`), RandAugment (`data.rand_augment`, a timm
    string; '' = off) and the random-erasing boxes (`data.random_erasing.prob`
    > 0: int32 [count, 4], filled on the device). With `data.augment = False`
    it is the eval transform.
    """

    def __init__(self, config: ml_collections.ConfigDict, view: ml_collections.ConfigDict) -> None:
        d = config.data
        self.seed = int(config.seed)
        self.augment = bool(d.augment)
        self.size = int(view.model.image_size)
        self.channels = int(view.model.channels)
        self.pad_first = view.data.source == "mnist_5k"
        self.crop_scale = tuple(float(v) for v in d.crop_scale)
        self.crop_ratio = tuple(float(v) for v in d.crop_ratio)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"config.data.crop_scale={d.crop_scale} must satisfy 0 < lo <= hi <= 1")
        self.flip = bool(d.flip)
        self.policy = augment.parse_rand_augment(d.get("rand_augment", ""))
        self.fill = augment.fill_color(view.data.mean, "L" if self.channels == 1 else "RGB")
        re = d.get("random_erasing", None)
        self.erasing = None
        if re is not None and re.prob > 0:
            self.erasing = augment.RandomErasing(prob=float(re.prob), mode=re.mode,
                                                 count=int(re.count))
        # data.eval_crop_ratio: 0.875 = ImageNet's resize + centre crop, 1.0 = the whole image.
        ratio = float(d.get("eval_crop_ratio", 0.875))
        if not 0 < ratio <= 1:
            raise ConfigError(f"config.data.eval_crop_ratio={ratio} is not in (0, 1] (1.0 = the "
                              "whole image resized to the model's size, no crop)")
        self.eval = image_ops.EvalTransform(view, crop_fraction=ratio)
        self.device_augment = self._device_augment(config, view) if self.augment else None

    def _device_augment(self, config, view) -> mixing.DeviceAugment | None:
        """The in-step part (erasing noise, mixup / cutmix, smoothed targets), or
        None when the recipe has none of them."""
        mix = config.get("mixup", None)
        m = mixing.Mixing(float(mix.alpha), float(mix.cutmix_alpha), float(mix.prob),
                          float(mix.switch_prob), mix.mode) if mix is not None else mixing.Mixing()
        if self.erasing is None and not m.active:
            return None  # plain labels (and label smoothing) in the generic loss
        return mixing.DeviceAugment("image", tuple(view.data.mean), tuple(view.data.std), m,
                                    float(config.loss.label_smoothing),
                                    self.erasing.mode if self.erasing else "pixel")

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
        if self.policy is not None:
            pil = Image.fromarray(image[:, :, 0] if self.channels == 1 else np.asarray(image))
            pil = augment.rand_augment(pil, augment.sample_plan(rng, self.policy), self.fill)
            image = np.asarray(pil, np.uint8).reshape(self.size, self.size, self.channels)
        out = {"image": np.ascontiguousarray(image), "label": np.int32(element["label"]),
               "index": np.int32(element["index"])}
        if self.erasing is not None:
            out["erase_box"] = self.erasing.boxes(rng, self.size, self.size)
        return out


def image_view(config: ml_collections.ConfigDict,
               backbone_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The backbone's config (image size, channels, normalization) pointed at
    the fine-tune data (`config.data.source`, `config.data.path`)."""
    view = ml_collections.ConfigDict(backbone_config.to_dict())
    view.data.source = config.data.source
    view.data.path = config.data.path
    return view


class TrainTestFolders:
    """Two class-folder trees read as one source, the first `len(train)` records
    the training ones: ImageNet's train/ and val/ (`data.path`, `data.test_path`).
    `splits` tells `data.labeled.labeled_data` the given split; the test
    folder's classes must be the training folder's."""

    def __init__(self, train, test):
        if list(test.classes) != list(train.classes):
            extra = sorted(set(test.classes) - set(train.classes))
            raise DataError(f"config.data.test_path={test.root!r}: its class folders differ from "
                            f"config.data.path={train.root!r}'s ({len(test.classes)} vs "
                            f"{len(train.classes)}; not in the training folder: {extra[:5]})")
        self.parts, self.classes = (train, test), list(train.classes)
        self.labels = np.concatenate([train.labels, test.labels])
        n = len(train)
        self.splits = {"train": np.arange(n), "test": np.arange(n, n + len(test))}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        n = len(self.parts[0])
        part, i = (self.parts[0], index) if index < n else (self.parts[1], index - n)
        return {**part[i], "index": index}


def labeled_parts(config, backbone_config):
    """(source, labels, class names, train transform, eval transform) of an image task;
    with `data.test_path` (image_folder) the test set is that folder."""
    view = image_view(config, backbone_config)
    source = make_source(view)
    test_path = config.data.get("test_path", "")
    if test_path:
        if view.data.source != "image_folder":
            raise ConfigError(f"config.data.test_path={test_path!r} is for data.source="
                              f"'image_folder' (a test folder beside data.path), not "
                              f"{view.data.source!r}")
        test_view = ml_collections.ConfigDict(view.to_dict())
        test_view.data.path = test_path
        source = TrainTestFolders(source, make_source(test_view))
    if hasattr(source, "labels"):  # folder sources know their labels without decoding
        labels = np.asarray(source.labels)
    else:
        labels = np.asarray([source[i]["label"] for i in range(len(source))])
    transform = ImageFinetuneTransform(config, view)
    return source, labels, list(getattr(source, "classes", [])) or None, transform, transform.eval
