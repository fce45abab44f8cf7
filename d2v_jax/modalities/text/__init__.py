"""Token sequences: English text, SMILES and proteins (one model, four
tokenizers), data2vec 1.0 (RoBERTa-style) and 2.0 (SPEC 2-7).

A corpus (packaged, files, or a fairseq data directory of shards) -> the run's
tokenizer (`prepare`: trained, GPT-2 BPE files, or the shards') -> rows cut as
fairseq's TokenBlockDataset (blocks.py) -> BERT / span (1.0) or random (2.0)
masks -> batches of rows or of a token budget (batching.py) -> the encoder.
`python -m d2v_jax.prepare` writes shards (prepare.py); `hf.py` maps
Data2VecText, `fairseq.py` converts fairseq checkpoints.
"""

import functools

from d2v_jax.modalities.registry import Modality, register
from d2v_jax.modalities.text import batching, config, data, flops, labeled, model

MODALITY = register(Modality(
    name="text",
    build_model=model.build,
    teacher_modules=model.TEACHER_MODULES,
    dummy_batch=model.dummy_batch,
    validate=config.validate,
    pretrain_dataset=functools.partial(batching.pretrain_dataset, parts=data.pretrain_parts),
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
    shards="d2v_jax.modalities.text.prepare",
))
