"""Token sequences: English text, SMILES and proteins (one model, three
tokenizers), data2vec 1.0 (RoBERTa-style) and 2.0 (SPEC 2-7).

A corpus (packaged or files) -> tokenizer trained once per run (`prepare`) ->
packed rows -> BERT / span (1.0) or random (2.0) masks -> the encoder; `hf.py`
maps Data2VecText.
"""

import functools

from d2v_jax.data.pipeline import map_pretrain_dataset
from d2v_jax.modalities.registry import Modality, register
from d2v_jax.modalities.text import config, data, flops, labeled, model

MODALITY = register(Modality(
    name="text",
    build_model=model.build,
    teacher_modules=model.TEACHER_MODULES,
    dummy_batch=model.dummy_batch,
    validate=config.validate,
    pretrain_dataset=functools.partial(map_pretrain_dataset, parts=data.pretrain_parts),
    step_flops=flops.step_flops,
    prepare=data.prepare,
    prepare_backbone=data.prepare_backbone,
    labeled_parts=labeled.labeled_parts,
    hf="d2v_jax.modalities.text.hf",
    fairseq="d2v_jax.modalities.text.fairseq",
    example_backbone="experiments/text.py:tiny_v2 (SMILES: experiments/molecules.py:tiny_v2)",
    # Your own text / SMILES: a scratch backbone from an experiment file trains
    # its tokenizer on the fine-tune's file (its corpus names none, or another one).
    own_corpus_sources=("text_tsv", "smiles_csv"),
))
