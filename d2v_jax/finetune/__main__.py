"""`python -m d2v_jax.finetune`: the command-line flags and `main`.

A user error (bad config key or value, bad data, a checkpoint of another
modality or size) prints `error: ...` (and a `hint: ...` line) and exits with
2, no traceback (`--debug` or D2V_DEBUG=1 shows it); see d2v_jax/errors.py.
A refused run leaves the work dir as it was.
"""

from __future__ import annotations

import logging as pylogging
import sys

from absl import flags
from ml_collections import config_flags

from d2v_jax import errors, finetune
from d2v_jax.finetune.loop import train_and_evaluate

def _define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    # On a FlagValues of its own per call, so that this CLI and d2v_jax.train
    # (which has flags of the same names) can run in one process.
    config_flags.DEFINE_config_file(
        "config", None, "Fine-tune experiment and arg, e.g. experiments/finetune.py:mnist_5k.",
        flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("init_from", None, "Pretraining work dir to initialize the encoder from; "
                        "absent = train from scratch.", flag_values=fv)
    flags.DEFINE_string("workdir", None, "Directory for results.json, metrics and the plot.",
                        flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def _run(fv: flags.FlagValues) -> int:
    pylogging.getLogger("absl").setLevel(pylogging.INFO)
    train_and_evaluate(fv.config, fv.workdir, fv.init_from)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m d2v_jax.finetune` with `argv` (default sys.argv); returns the
    exit code: 0, or 2 for a user error (printed as `error: ...`)."""
    return errors.absl_main(_define_flags, _run, argv, doc=finetune.__doc__)


if __name__ == "__main__":
    sys.exit(main())
