"""Random-access sources for grain's `MapDataset.source`, any modality.

A source has `__len__` and `__getitem__(i) -> dict` (with "index": i, the key
that seeds the example's crops and masks); `SubsetSource` restricts one to some
indices (the examples pretraining keeps when it holds a labeled split out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Source(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def check_index(index: int, length: int, where: str) -> int:
    index = int(index)
    if not 0 <= index < length:
        raise IndexError(f"{where}: index {index} out of range [0, {length})")
    return index


class SubsetSource:
    """The examples of `source` at `indices` (sorted), re-indexed 0..len-1.

    Records keep the parent's `index`, so masks and crops seeded by it, and
    anything logged, refer to the parent's example.
    """

    def __init__(self, source: Source, indices: Sequence[int], name: str = "subset") -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or not len(self.indices):
            raise ValueError(f"SubsetSource({name}): indices must be a non-empty 1-D list, "
                             f"got shape {self.indices.shape}")
        if self.indices.min() < 0 or self.indices.max() >= len(source):
            raise ValueError(f"SubsetSource({name}): indices outside [0, {len(source)}) of {source!r}")
        self.name = name
        self.classes = getattr(source, "classes", None)
        parent_labels = getattr(source, "labels", None)
        self.labels = None if parent_labels is None else np.asarray(parent_labels)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, len(self), f"SubsetSource({self.name})")
        return self.source[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"SubsetSource({self.name}, len={len(self)} of {self.source!r})"
