"""Images: a ViT for data2vec 1.0 (BEiT recipe) and 2.0 (SPEC 2-7).

mnist_5k (packaged) or class folders -> random-resized crops -> block (1.0) or
inverse block (2.0) masks -> patches -> the encoder; `hf.py` maps
Data2VecVision, `fairseq.py` the data2vec 2.0 image checkpoints.
"""

import functools

from d2v_jax.data.pipeline import map_pretrain_dataset
from d2v_jax.modalities.image import config, flops, labeled, model, transforms
from d2v_jax.modalities.registry import Modality, register

MODALITY = register(Modality(
    name="image",
    build_model=model.build,
    teacher_modules=model.TEACHER_MODULES,
    dummy_batch=model.dummy_batch,
    validate=config.validate,
    pretrain_dataset=functools.partial(map_pretrain_dataset, parts=transforms.pretrain_parts),
    step_flops=flops.step_flops,
    labeled_parts=labeled.labeled_parts,
    input_key="image",
    eval_data=transforms.eval_data,
    hf="d2v_jax.modalities.image.hf",
    fairseq="d2v_jax.modalities.image.fairseq",
    example_backbone="experiments/image.py:tiny_v2",
))
