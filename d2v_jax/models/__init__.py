"""Flax modules shared by every modality: the scanned Transformer `Encoder` and
its blocks (`layers`), the 2.0 conv decoder (`decoder`), and the FLOP terms of
both (`flops`). The models themselves live in `d2v_jax/modalities/<m>/model.py`
and are built through the registry (`d2v_jax.modalities.build_model`)."""
