"""Speech: raw 16 kHz waveforms, data2vec 1.0 and 2.0 (SPEC 2-7).

Manifests or folders (or the packaged espeak-ng set) -> length buckets ->
span (1.0) or 1-D block (2.0) masks over conv frames -> the encoder; `hf.py`
maps Data2VecAudio.
"""

from d2v_jax.modalities.audio import config, data, flops, labeled, model
from d2v_jax.modalities.registry import Modality, register

MODALITY = register(Modality(
    name="audio",
    build_model=model.build,
    teacher_modules=model.TEACHER_MODULES,
    dummy_batch=model.dummy_batch,
    validate=config.validate,
    pretrain_dataset=data.make_pretrain_dataset,
    step_flops=flops.step_flops,
    labeled_parts=labeled.labeled_parts,
    hf="d2v_jax.modalities.audio.hf",
    fairseq="d2v_jax.modalities.audio.fairseq",
    asr="d2v_jax.modalities.audio.asr",
    example_backbone="experiments/audio.py:tiny_v2",
))
