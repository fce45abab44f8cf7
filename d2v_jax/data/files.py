"""Reading user files: comma-separated glob lists and strict UTF-8 lines."""

from __future__ import annotations

import glob
import os

from d2v_jax.errors import ConfigError, DataError, DataNotFoundError


def paths(spec: str, what: str) -> list[str]:
    if not spec:
        raise ConfigError(f"config.data.path is empty; data.source={what!r} needs files")
    out = []
    for part in (p.strip() for p in spec.split(",")):
        matches = sorted(glob.glob(part))
        if not matches:
            raise DataNotFoundError(f"config.data.path: no file matches {part!r}")
        out.extend(m for m in matches if os.path.isfile(m))
    return out


def lines(path: str):
    """(line number, text) of a file, decoding each line strictly as UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte "
                                f"{e.start} of the line)") from None
