r"""Convert checkpoints on disk (docs/convert.md).

  python -m d2v_jax.convert hf-to-jax --model hf_dir --out runs/from_hf
  python -m d2v_jax.convert jax-to-hf --workdir runs/x [--step N] [--teacher] --out hf_dir
  python -m d2v_jax.convert fairseq-to-jax --checkpoint d2v2.pt --out runs/from_fs [--num_heads 12]

`hf-to-jax` and `fairseq-to-jax` write a step-0 checkpoint (params, EMA teacher,
fresh optimizer state, config) that `d2v_jax.train --init_from` and
`d2v_jax.restore_checkpoint` read. `hf_dir` is a local folder written by
`save_pretrained`; nothing is downloaded.

A bad argument, a missing file or a checkpoint that cannot be mapped prints
`error: ...` (and a `hint: ...` line) and exits with 2, no traceback
(`--debug` or D2V_DEBUG=1 shows it); the output folder is left as it was.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

import jax

from d2v_jax import checkpoint, errors
from d2v_jax.api import save_checkpoint
from d2v_jax.convert import (ConversionError, from_fairseq, from_huggingface, make_train_state,
                             to_huggingface)
from d2v_jax.convert.common import describe_precision
from d2v_jax.convert.heads import HEAD_FILE, save_head
from d2v_jax.train_state import teacher_view


def _hf_to_jax(args) -> str:
    from transformers import AutoConfig, AutoModel


    if not os.path.isdir(args.model):
        raise errors.DataNotFoundError(f"--model {args.model!r} is not a folder (save_pretrained "
                                       "output)")
    try:
        hf_config = AutoConfig.from_pretrained(args.model, local_files_only=True)
        model = AutoModel.from_pretrained(args.model, config=hf_config, local_files_only=True)
    except (OSError, ValueError) as e:  # transformers: no config.json / weights, bad json
        raise errors.DataError(f"--model {args.model!r}: transformers cannot load it: "
                               f"{errors.one_line(str(e))[:300]}",
                               hint="expected a folder written by save_pretrained "
                                    "(config.json and the weights)") from e
    enc = from_huggingface(model)
    return save_checkpoint(args.out, enc.train_state(), enc.config)


def _jax_to_hf(args) -> str:
    both, config = checkpoint.restore_params(args.workdir, args.step,
                                             subtrees=("params", "ema_params"))
    params = both["params"]
    if args.teacher:  # the EMA subtrees; the rest (e.g. the final LayerNorm) is the student's
        params = teacher_view(params, both["ema_params"], config)
    model = to_huggingface(config, params)
    model.save_pretrained(args.out)
    return args.out


def _fairseq_to_jax(args) -> str:
    import torch

    if not os.path.isfile(args.checkpoint):
        raise errors.DataNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
    # fairseq checkpoints pickle their omegaconf cfg, which weights_only refuses.
    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=not args.trust_pickle)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        text = str(e).strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        hint = ("fairseq checkpoints pickle their cfg: pass --trust_pickle (only for files you "
                "trust)" if "Weights only load failed" in str(e) and not args.trust_pickle else
                "expected a fairseq data2vec checkpoint (.pt) written by torch.save")
        raise errors.DataError(f"--checkpoint {args.checkpoint!r}: torch.load cannot read it: "
                               f"{first}", hint=hint) from e
    out = from_fairseq(ckpt, num_heads=args.num_heads)
    config, params, ema_params = out
    state = ckpt.get("model", ckpt)
    student = {k: v for k, v in state.items() if k != "_ema"}
    teacher = state.get("_ema") if isinstance(state.get("_ema"), dict) else None
    print(f"convert fairseq-to-jax: student tensors {describe_precision(student)}"
          + (f", teacher (_ema) {describe_precision(teacher)}" if teacher else "")
          + "; converted to float32", file=sys.stderr, flush=True)
    path = save_checkpoint(args.out, make_train_state(config, params, ema_params), config)
    if out.head is not None:  # a fine-tuned model's task head (CTC, classification)
        save_head(os.path.join(args.out, HEAD_FILE), out.task, out.head)
    return path


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors (one `error:` line, exit 2)."""

    def error(self, message):
        raise errors.UserError(message, hint=f"{self.prog} --help")


def main(argv: list[str] | None = None) -> int:
    """`python -m d2v_jax.convert` with `argv` (default sys.argv[1:]); returns the
    exit code: 0, or 2 for a user error (printed as `error: ...`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return errors.run(lambda: _main(argv), debug=errors.debug_requested(argv),
                      user=(ConversionError,))


def _main(argv: list[str]) -> int:
    parser = _Parser(prog="python -m d2v_jax.convert", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of errors (also {errors.DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-jax", help="HF Data2Vec*Model folder -> our checkpoint")
    p.add_argument("--model", required=True, help="folder written by save_pretrained")
    p.add_argument("--out", required=True, help="work dir for the converted checkpoint")
    p = sub.add_parser("jax-to-hf", help="our checkpoint -> HF folder (save_pretrained)")
    p.add_argument("--workdir", required=True, help="run dir or its checkpoints/ dir")
    p.add_argument("--step", type=int, default=None, help="default: newest")
    p.add_argument("--teacher", action="store_true", help="export the EMA teacher")
    p.add_argument("--out", required=True, help="output folder")
    p = sub.add_parser("fairseq-to-jax", help="fairseq data2vec .pt (1.0 / 2.0, image / audio / "
                                             "text) -> our checkpoint")
    p.add_argument("--checkpoint", required=True, help="fairseq checkpoint (.pt)")
    p.add_argument("--num_heads", type=int, default=None,
                   help="attention heads, if the checkpoint has no cfg")
    p.add_argument("--trust_pickle", action="store_true",
                   help="torch.load with weights_only=False (needed for fairseq's saved cfg; "
                        "only for files you trust)")
    p.add_argument("--out", required=True, help="work dir for the converted checkpoint")
    args = parser.parse_args(argv)
    run = {"hf-to-jax": _hf_to_jax, "jax-to-hf": _jax_to_hf,
           "fairseq-to-jax": _fairseq_to_jax}[args.command]
    n = jax.device_count()
    print(f"convert {args.command}: {n} {jax.default_backend()} device{'s' if n != 1 else ''} "
          "(the conversion runs on the host)", file=sys.stderr, flush=True)
    with errors.undo_additions(args.out):  # a failed conversion leaves --out as it was
        print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
