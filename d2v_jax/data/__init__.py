"""Input pipelines: grain sources, per-example transforms (with masks), batching."""

from d2v_jax.data.image import EvalTransform, PretrainTransform
from d2v_jax.data.pipeline import make_pretrain_dataset, prepare
from d2v_jax.data.sources import SOURCES, ImageFolderSource, Mnist5kSource, make_source

__all__ = [
    "EvalTransform",
    "ImageFolderSource",
    "Mnist5kSource",
    "PretrainTransform",
    "SOURCES",
    "make_pretrain_dataset",
    "make_source",
    "prepare",
]
