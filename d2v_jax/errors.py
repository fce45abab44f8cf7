"""User errors and how the command lines report them.

A *user error* is bad input the user can fix: a config value or key, a data
file or folder, a checkpoint that does not fit. The library raises a subclass
of `UserError` for each; its message is one line naming the field, file or
shape, and `hint` (optional) says what to do. The subclasses also derive from
the builtin a caller would catch (ValueError, KeyError, FileNotFoundError), so
`except ValueError` keeps working.

Every command line (`python -m d2v_jax.train`, `.finetune`, `.convert`, the
benchmarks) runs its work through `run`: a user error prints

    error: <message>
    hint: <hint>            (only when there is one)

to stderr, no traceback, and exits with `EXIT_USER_ERROR`; any other exception
is a programming error and keeps its traceback. `--debug` (or D2V_DEBUG=1)
shows the traceback of user errors too. Exit codes (docs/checkpoints.md):

    0   done
    1   a programming error (Python's traceback)
    2   a user error: bad config, data, checkpoint or flag; the run changed nothing
    3   the run stopped itself: non-finite loss, representation collapse, too
        many unreadable samples
    42  preempted (SIGTERM): saved, requeue it (guards.PREEMPTED_EXIT_CODE)
    43  a process of a multi-process run was lost: the others stopped; relaunch
        to resume from the last checkpoint (guards.PEER_LOST_EXIT_CODE)
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shutil
import sys
from typing import Any, Callable, Iterable, Sequence

EXIT_USER_ERROR = 2
EXIT_RUN_STOPPED = 3
DEBUG_ENV = "D2V_DEBUG"


class UserError(Exception):
    """Bad input the user can fix. `str(e)` is the message as written (a
    KeyError subclass does not repr-quote it); `hint` says what to do."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError, ValueError):
    """An impossible config value; the message starts with `config.<field>:`."""


class ConfigKeyError(ConfigError, KeyError):
    """A config key that does not exist (a misspelt override)."""


class ConfigFileError(ConfigError, FileNotFoundError):
    """An experiment file that does not exist."""


class DataError(UserError, ValueError):
    """Data that cannot be read: a missing or empty folder, a file that does
    not decode, a column that is not there. The message names the file."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data path (file, folder, glob) that matches nothing."""


class BadSampleError(DataError):
    """One sample that cannot be read (a corrupt or truncated file); `path`
    names it. `data.on_bad_sample='skip'` replaces such samples during
    training (d2v_jax/data/bad_samples.py); otherwise it is a DataError."""

    def __init__(self, message: str, *, path: str = "", hint: str | None = None):
        super().__init__(message, hint=hint)
        self.path = str(path)  # pickled with the instance's __dict__ (grain's workers)


class CheckpointError(UserError):
    """A checkpoint that cannot be used: absent, or not of the current model."""


class RunStopped(UserError):
    """Base for a run that stopped itself (not bad input): exit code 3."""

    exit_code = EXIT_RUN_STOPPED


def check_field(cond: bool, field: str, msg: str, hint: str | None = None) -> None:
    """Raises ConfigError(`config.<field>: <msg>`) unless `cond`."""
    if not cond:
        raise ConfigError(f"config.{field}: {msg}", hint=hint)


@contextlib.contextmanager
def config_errors():
    """Inside: a ValueError is a ConfigError. For building a run's pieces from
    its config alone (the optimizer, the mesh), whose checks name the field."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(one_line(str(e))) from e


def check_workdir(path: str) -> None:
    """A work dir must be a folder or not exist yet (checked before a run writes)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--workdir {path!r} is a file, not a folder",
                        hint="pass a folder (a new one is created)")


def make_workdir(path: str) -> None:
    """os.makedirs(path, exist_ok=True), an OSError (permissions, a full disk)
    as a one-line UserError."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --workdir {path!r}: {e.strerror or e}") from e


class undo_additions:
    """On an exception inside: removes what was added under `workdir` (and
    `workdir` itself if it did not exist), so that a refused run leaves it as
    it was. Only additions are undone: the code inside must rewrite nothing
    (a run checks inside, then writes its files after). `primary`: whether
    this process does the file work (process 0 of a multi-host run)."""

    def __init__(self, workdir: str, primary: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.primary = primary

    def _paths(self) -> set[str]:
        out = set()
        for d, dirs, files in os.walk(self.workdir):
            out.update(os.path.join(d, n) for n in dirs + files)
        return out

    def __enter__(self):
        self.existed = os.path.isdir(self.workdir)
        self.before = self._paths() if self.existed else set()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not self.primary or not os.path.isdir(self.workdir):
            return False
        if not self.existed:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return False
        for path in sorted(self._paths() - self.before, key=len, reverse=True):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        return False


# --- config keys ---------------------------------------------------------------------
def config_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) ConfigDict: the sections and their fields."""
    out = []
    for name in config.keys():
        key = f"{prefix}{name}"
        out.append(key)
        child = config[name]
        if hasattr(child, "keys") and hasattr(child, "unlocked"):  # a nested ConfigDict
            out += config_keys(child, key + ".")
    return out


def nearest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The closest `n` dotted candidates to `word` (difflib), best first: the
    fields of the same section when one is close (`model.dimm` -> `model.dim`),
    else the closest keys anywhere (`modle.dim` -> `model.dim`, `data.holdout`
    -> `data.holdout_fraction`)."""
    candidates = list(candidates)
    parent, _, leaf = word.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=n, cutoff=0.6)
    if close:
        return [siblings[c] for c in close]
    return difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)


def missing_key_error(config: Any, key: str) -> ConfigKeyError | None:
    """ConfigKeyError for `key` (dotted) if `config` has no such field, else None."""
    node, parts = config, key.split(".")
    for i, name in enumerate(parts):
        if not (hasattr(node, "keys") and name in node.keys()):
            close = nearest(key, config_keys(config))
            where = ".".join(parts[:i])
            fields = sorted(node.keys()) if hasattr(node, "keys") else []
            kind = f" of this {config['modality']} config" if "modality" in config.keys() else ""
            hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close else
                    f"the fields under {where or 'config'}{kind}: {', '.join(fields)}")
            return ConfigKeyError(f"config has no field {key!r}", hint=hint)
        node = node[name]
    return None


# --- reporting ------------------------------------------------------------------------
def one_line(text: str) -> str:
    """A message folded onto one line (lines joined by '; ', spaces collapsed)."""
    lines = [re.sub(r"\s+", " ", line).strip() for line in str(text).splitlines()]
    return "; ".join(line for line in lines if line)


def find_user_error(exc: BaseException, stopped: Sequence[type] = ()) -> BaseException | None:
    """The UserError (or an instance of `stopped`) that `exc` is or wraps
    (through `raise ... from`), else None. Data-loader threads and workers
    re-raise the reader's exception, possibly wrapped (grain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError) or isinstance(exc, tuple(stopped)):
            return exc
        exc = exc.__cause__
    return None


def report(exc: BaseException, stream=None) -> None:
    """Prints `error: <message>` and, if the error has one, `hint: <hint>`."""
    stream = stream or sys.stderr
    text = str(exc)
    if getattr(exc, "details", None):  # a listing after the first line: the line alone
        text = text.splitlines()[0]
    print(f"error: {one_line(text)}", file=stream)
    hint = getattr(exc, "hint", None)
    if hint:
        print(f"hint: {one_line(hint)}", file=stream)
    stream.flush()


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """--debug on the command line or D2V_DEBUG=1 in the environment."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return "--debug" in argv or env not in ("", "0", "false", "no")


def run(fn: Callable[[], int | None], *, debug: bool = False, user: Sequence[type] = (),
        stopped: Sequence[type] = ()) -> int:
    """Calls `fn` and returns its exit code (None = 0). A user error (a
    UserError or one of `user`: exit code 2; one of `stopped`: 3) is printed
    by `report` and its exit code returned; with `debug` it propagates with its
    traceback, as does any other error."""
    try:
        return int(fn() or 0)
    except Exception as e:  # noqa: BLE001  (anything else is re-raised)
        found = find_user_error(e, tuple(user) + tuple(stopped))
        if found is None or debug:
            raise
        report(found)
        if isinstance(found, tuple(stopped)):
            return EXIT_RUN_STOPPED
        return getattr(found, "exit_code", EXIT_USER_ERROR)


# --- absl flags -----------------------------------------------------------------------
def parse_flags(flag_values, argv: Sequence[str], config_flags: Sequence[str] = ("config",)):
    """`flag_values(argv)` with its errors as UserErrors: a flag error (unknown
    flag, bad value, missing required flag) and a misspelt config override
    (`--config.model.dimm=3`, which ml_collections reports as a chained
    AttributeError) become one line naming the flag or key and the nearest
    valid keys. Returns the remaining argv.

    ml_collections reads the overrides from sys.argv, so it is set to `argv`
    while parsing (an in-process call parses its own arguments)."""
    from absl import flags

    saved, sys.argv = sys.argv, list(argv)
    try:
        rest = flag_values(list(argv))
        for name in config_flags:  # config_flags defers a load failure to the first use
            _check_config_loaded(flag_values, argv, name)
        return rest
    except flags.Error as e:
        bad = _bad_override(flag_values, argv, config_flags)
        if bad is not None:
            raise bad from e
        # The experiment file's own error (e.g. an unknown arg) without the traceback
        # that ml_collections pastes into the message.
        text = re.sub(r"Traceback \(most recent call last\):.*?(?=\n\S)", "", str(e), flags=re.S)
        text = re.sub(r"Error whilst parsing config file:\s*(\w+Error: )?", "", text)
        raise UserError(one_line(text), hint="--help lists the flags") from e
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        bad = _bad_override(flag_values, argv, config_flags)
        if bad is not None:
            raise bad from e
        if isinstance(e, OSError):  # config_flags: the --config file does not load
            raise UserError(one_line(str(e))) from e
        raise
    finally:
        sys.argv = saved


def _check_config_loaded(flag_values, argv: Sequence[str], name: str) -> None:
    if name not in flag_values:
        return
    try:
        value = flag_values[name].value
        if value is not None:
            value.keys()
    except OSError as e:
        spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), "")
        path = spec.partition(":")[0]
        if path and not os.path.isfile(path):
            raise ConfigFileError(f"--{name}={spec}: config file {path!r} does not exist") from None
        raise ConfigError(f"--{name}={spec}: {one_line(str(e))}") from None


def _bad_override(flag_values, argv: Sequence[str], names: Sequence[str]) -> UserError | None:
    """The first `--<config flag>.<key>` override whose key the loaded config
    lacks, or an error for a config file that did not load; else None."""
    for name in names:
        overrides = [m.group(1) for a in argv
                     for m in [re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", a)] if m]
        if not overrides:
            continue
        config = _load_config_arg(argv, name)
        if config is None:
            return None
        for key in overrides:
            err = missing_key_error(config, key)
            if err is not None:
                return err
    return None


def _load_config_arg(argv: Sequence[str], name: str):
    """The ConfigDict that `--<name>=<file>[:arg]` in `argv` names (loaded
    again: a failed override leaves the flag without a value), or None."""
    from ml_collections.config_flags import config_flags

    for i, a in enumerate(argv):
        m = re.match(rf"^--?{re.escape(name)}(?:=(.*))?$", a)
        if m:
            spec = m.group(1)
            if spec is None and i + 1 < len(argv):  # `--config file.py` (two arguments)
                spec = argv[i + 1]
            if spec is None:
                return None
            try:
                return config_flags.ConfigFileFlagParser(name=name).parse(spec)
            except Exception:  # noqa: BLE001  (the file itself fails: reported as it is)
                return None
    return None


def absl_main(define_flags: Callable | None, body: Callable, argv: Sequence[str] | None, *,
              doc: str = "", stopped: Sequence[type] = (), flag_values=None) -> int:
    """A command line on absl flags, run through `run`: `define_flags(fv, argv)`
    defines its flags on a fresh FlagValues (so several CLIs can run in one
    process, and a test can call `main(argv)` repeatedly), `body(fv)` does the
    work and returns an exit code. Adds `--debug`; `--help` prints `doc` and
    the flags. Returns the exit code. A script whose flags are defined at
    import passes `flag_values=flags.FLAGS` and no `define_flags`."""
    from absl import flags
    from absl import logging as absl_logging

    argv = list(sys.argv if argv is None else argv)

    def go() -> int | None:
        fv = flags.FlagValues() if flag_values is None else flag_values
        if define_flags is not None:
            define_flags(fv, argv)
        if "debug" not in fv:
            flags.DEFINE_bool("debug", False, f"Show the traceback of user errors too (also "
                              f"{DEBUG_ENV}=1).", flag_values=fv)
        if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
            print(doc.strip() + "\n\nflags:\n" + fv.get_help(include_special_flags=False))
            return 0
        rest = parse_flags(fv, argv)
        if len(rest) > 1:
            raise UserError(f"unexpected arguments: {' '.join(rest[1:])}",
                            hint="--help lists the flags")
        # The libraries (absl logging, grain) read the global flags: their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        absl_logging.use_absl_handler()
        return body(fv)

    return run(go, debug=debug_requested(argv), stopped=stopped)
