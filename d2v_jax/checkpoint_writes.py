"""A checkpoint that cannot be written (a full disk, an unwritable or read-only
work dir): `checkpoint.save` and `checkpoint.wait` run inside `writing`, which
turns orbax's failure into one `CheckpointWriteError` line naming the
directory, the step, the OS's reason and the last complete step kept."""

from __future__ import annotations

import contextlib
import logging as logging_std
import re
from typing import Any

from d2v_jax.errors import RunStopped


def error_chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from (cause, else context), outermost first."""
    chain, e = [], error
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written (a full disk, an unwritable or
    read-only work dir). The step being written is left as an orbax temporary
    directory, never restored (and removed by the next run's manager); the
    steps written before it are kept."""


# Errors of a failed write: OSError from Python's writes, tensorstore's
# status codes (the arrays) with the OS error text inside.
_WRITE_FAILURE = re.compile(r"RESOURCE_EXHAUSTED|PERMISSION_DENIED|No space left|Read-only file "
                            r"system|Permission denied|Disk quota|os_error_code")
_OS_REASON = re.compile(r"Failed to write [^:]*: ([^\[\]\n]+?)\s*\[os_error_code|"
                        r"\[Errno \d+\] ([^:\n]+)")


def write_failure(error: BaseException, manager: Any, step: int
                  ) -> CheckpointWriteError | None:
    """`error` as a one-line CheckpointWriteError naming the checkpoints dir,
    the step, the OS's reason and the last complete step kept, when it is a
    failed write (else None). An async save's error surfaces at the next save
    or wait; the step it belongs to is read from orbax's temporary path."""
    chain = error_chain(error)
    text = " ".join(str(x) for x in chain)
    if not (any(isinstance(x, OSError) for x in chain) or _WRITE_FAILURE.search(text)):
        return None
    found = re.search(r"/(\d+)\.orbax-checkpoint-tmp", text)
    failed = int(found.group(1)) if found else int(step)
    reason = next((m.group(1) or m.group(2) for m in [_OS_REASON.search(text)] if m), None)
    if reason is None:
        os_errors = [x for x in chain if isinstance(x, OSError)]
        reason = (os_errors[0].strerror if os_errors and os_errors[0].strerror
                  else str(chain[0]).splitlines()[0][:200])
    try:
        kept = [s for s in manager.all_steps(read=True) if s != failed]
    except Exception:  # noqa: BLE001 - the directory itself may be unreadable
        kept = []
    last = (f"the last complete checkpoint, {manager.directory}/{max(kept)}, is kept and "
            "restorable" if kept else "no earlier checkpoint was written")
    return CheckpointWriteError(
        f"cannot write checkpoint step {failed} to {manager.directory}: {reason.strip()}; {last}",
        hint="free space or fix the work dir's permissions, then run the same command again")


class _DropReportedWriteFailures(logging_std.Filter):
    """orbax's write tasks log each failed write ("Task exception was never
    retrieved") before the error reaches the loop, which reports it as one
    `CheckpointWriteError` line: those log records are noise."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = f"{record.getMessage()} {exc or ''}"
        return not ("never retrieved" in text and _WRITE_FAILURE.search(text))


logging_std.getLogger("asyncio").addFilter(_DropReportedWriteFailures())


@contextlib.contextmanager
def writing(manager: Any, step: int):
    """Turns a failed checkpoint write met inside (a save, or waiting for one)
    into `CheckpointWriteError`; other errors pass as they are."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except Exception as e:
        failure = write_failure(e, manager, step)
        if failure is None:
            raise
        raise failure from e
