"""The grain pipeline that feeds pretraining: source -> shuffle -> repeat ->
transform (crop, flip, normalize, masks) -> per-process batch -> iterator.

Everything up to `.to_iter_dataset` is a lazy random-access `MapDataset`, so
the iterator's checkpoint state is just a position: `get_state()` /
`set_state()` (or orbax's `grain.checkpoint.CheckpointSave`) resume exactly,
with the same examples, crops and masks.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from d2v_jax.data import text
from d2v_jax.data.image import PretrainTransform
from d2v_jax.data.sources import ImageSource, SubsetSource, make_source


def holdout_split(config: ml_collections.ConfigDict, source) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) indices of `source` for pretraining.

    `data.holdout_fraction` of the labeled examples (stratified, seeded by
    `data.holdout_seed`) are kept out of pretraining. With the same fraction
    and seed as a fine-tune's `data.test_fraction` / `data.split_seed` this is
    exactly its test split, so the test images are unseen by the encoder too.
    """
    from d2v_jax.data.labeled import split_test  # labeled imports this package

    labels = getattr(source, "labels", None)
    if labels is None:
        raise ValueError(f"config.data.holdout_fraction={config.data.holdout_fraction}: the source "
                         f"{source!r} has no `labels` to stratify the held-out split by")
    return split_test(np.asarray(labels), float(config.data.holdout_fraction),
                      int(config.data.holdout_seed))


def _image_parts(config: ml_collections.ConfigDict, source=None):
    src = make_source(config) if source is None else source
    if config.data.get("holdout_fraction", 0.0) > 0:
        kept, _ = holdout_split(config, src)
        src = SubsetSource(src, kept, name=f"{config.data.source} without the held-out split")
    return src, PretrainTransform(config)


# modality -> (config, source or None) -> (grain source, transform(element, epoch)).
PRETRAIN_PARTS = {"image": _image_parts, "text": text.pretrain_parts}
# modality -> (config, workdir) -> config: run-level set-up before the model is
# built (text: train or reload the tokenizer, set model.vocab_size).
PREPARE = {"text": text.prepare}


def prepare(config: ml_collections.ConfigDict, workdir: str | None) -> ml_collections.ConfigDict:
    """What a modality must set up once per run; the identity for images."""
    fn = PREPARE.get(config.modality)
    return fn(config, workdir) if fn is not None else config


def local_batch_size(config: ml_collections.ConfigDict, process_count: int) -> int:
    """Per-process batch: config.data.batch_size split evenly over processes."""
    global_batch = int(config.data.batch_size)
    if process_count < 1 or global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"config.data.batch_size={global_batch} must be a positive multiple of the "
            f"process count {process_count}")
    return global_batch // process_count


def make_pretrain_dataset(
    config: ml_collections.ConfigDict,
    *,
    process_index: int = 0,
    process_count: int = 1,
    source: ImageSource | None = None,
    num_threads: int = 4,
    prefetch_buffer_size: int = 8,
) -> grain.IterDataset:
    """Endless batches for this process.

    Yields {"image": float32 [b, S, S, C], "mask": bool [b, M, N],
    "label": int32 [b], "index": int32 [b]} with b = data.batch_size //
    process_count. Process p gets rows [p*b, (p+1)*b) of every global batch,
    so the processes together see exactly the 1-process stream. `source`
    overrides `make_source(config)` (custom data, tests). `num_threads` /
    `prefetch_buffer_size` are grain's in-process read threads and the number
    of batches they buffer (per worker when data.num_workers > 0).
    """
    if config.modality == "audio":  # batch-level pipeline: length buckets, batch masks
        from d2v_jax.data import audio

        return audio.make_pretrain_dataset(
            config, process_index=process_index, process_count=process_count, source=source,
            num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    batch = local_batch_size(config, process_count)
    if config.modality not in PRETRAIN_PARTS:
        raise ValueError(f"config.modality={config.modality!r} has no input pipeline; "
                         f"expected one of {sorted(PRETRAIN_PARTS)}")
    src, transform = PRETRAIN_PARTS[config.modality](config, source)
    num_examples = len(src)
    if num_examples < 1:
        raise ValueError(f"data source {src!r} is empty")

    def apply(position: int, element: dict[str, Any]) -> dict[str, Any]:
        # `position` counts examples in the global stream (all processes), so
        # the epoch, and with it the crop/mask seeds, is shard-independent.
        return transform(element, position // num_examples)

    ds = grain.MapDataset.source(src)
    # shuffle-then-repeat: repeat re-seeds the shuffle each epoch, so every
    # epoch is a fresh permutation (each index exactly once per epoch).
    ds = ds.shuffle(seed=config.seed).repeat(None)
    ds = ds.map_with_index(apply)
    # Batches of b consecutive examples; global batch k is the chunks
    # [k*P, (k+1)*P), and process p keeps chunk k*P + p. MapDataset is lazy,
    # so other processes' examples are never decoded here.
    ds = ds.batch(batch, drop_remainder=True)
    if process_count > 1:
        ds = ds[process_index::process_count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    if config.data.num_workers > 0:
        # grain's workers read absl flags; outside `app.run` (notebooks, tests)
        # they are unparsed and grain would raise, so fall back to defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(config.data.num_workers)))
    return it
