"""d2v_jax: data2vec 1.0 and 2.0 self-supervised pretraining in JAX/Flax.

The public API (see docs/api.md):

    load_config(spec, overrides)            experiment file -> locked ConfigDict
    create_train_state(config, rng)         TrainState(step, params, ema_params, opt_state)
    make_train_step(config)                 jitted (state, batch, rng) -> (state, metrics)
    make_dataset(config)                    endless batches (grain), masks included
    make_encoder(config, pool) / encode     representations from trained params
    save_checkpoint / restore_checkpoint    orbax, atomic

Algorithm pieces live in `d2v_jax.targets`, `losses`, `ema` and each modality's
`masking` (`d2v_jax.modalities.<m>.masking`); docs/architecture.md has the layout.
"""

from d2v_jax.api import (POOLS, TrainState, create_train_state, encode, load_config,
                         load_eval_data, make_dataset, make_encoder, make_train_step,
                         restore_checkpoint, save_checkpoint)

__version__ = "0.1.0"

__all__ = [
    "POOLS", "TrainState", "create_train_state", "encode", "load_config", "load_eval_data",
    "make_dataset", "make_encoder", "make_train_step", "restore_checkpoint", "save_checkpoint",
]
