"""Input pipelines shared by the modalities: the map-style pretraining pipeline
and the held-out split (`pipeline`), sources (`sources`), per-example random
streams (`rng`), file reading (`files`), fine-tuning splits (`splits`) and
labeled data (`labeled`). Each modality's own readers and transforms live in
`d2v_jax/modalities/<m>/`."""
