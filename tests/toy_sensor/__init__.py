"""A toy fourth modality, written as a user would add one: multichannel sensor
time series (e.g. accelerometers), data2vec 2.0 on [T, C] signals.

It is one folder's worth of code (masking, model, data, FLOPs) plus this
record; nothing in d2v_jax changes for it. tests/test_toy_modality.py registers
it and pretrains it through the public API and the train loop.
"""

import functools

from d2v_jax.data.pipeline import map_pretrain_dataset
from d2v_jax.modalities import Modality

from toy_sensor import data, masking, model

MODALITY = Modality(
    name="toy_sensor",
    build_model=model.build,
    teacher_modules=model.TEACHER_MODULES,
    dummy_batch=model.dummy_batch,
    validate=masking.validate,
    pretrain_dataset=functools.partial(map_pretrain_dataset, parts=data.pretrain_parts),
    step_flops=data.step_flops,
    input_key="signal",
)
