"""`python -m d2v_jax.finetune`: the command-line flags and `main`."""

from __future__ import annotations

import logging as pylogging

from absl import app, flags
from ml_collections import config_flags

from d2v_jax import finetune
from d2v_jax.finetune.loop import train_and_evaluate

# absl's --help prints the main module's docstring: the package's, as before.
__doc__ = finetune.__doc__


def _define_flags() -> None:
    # Defined only when run as a program, so that importing this module next to
    # d2v_jax.train (which owns --config/--workdir at import) does not clash.
    config_flags.DEFINE_config_file(
        "config", None, "Fine-tune experiment and arg, e.g. experiments/finetune.py:mnist_5k.",
        lock_config=True)
    flags.DEFINE_string("init_from", None, "Pretraining work dir to initialize the encoder from; "
                        "absent = train from scratch.")
    flags.DEFINE_string("workdir", None, "Directory for results.json, metrics and the plot.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    pylogging.getLogger("absl").setLevel(pylogging.INFO)
    f = flags.FLAGS
    train_and_evaluate(f.config, f.workdir, f.init_from)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
