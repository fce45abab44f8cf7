"""TensorBoard scalar event files, written without a TensorBoard library.

An event file is a sequence of TFRecords: the payload's length (uint64 LE), the
masked CRC32C of those 8 bytes, the payload, the masked CRC32C of the payload.
Each payload is a serialized `tensorflow.Event` protocol buffer (TensorFlow's
`core/util/event.proto`, `core/framework/summary.proto`):

  Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
            Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }

Scalars need only these fields, so they are encoded here by hand. The library
this replaces (tensorboardX) imports torch whenever torch is installed, which
cost every run 2-3 s of start-up for nothing a scalar log uses.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

FILE_VERSION = b"brain.Event:2"  # what TensorBoard expects in a file's first event


def _crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli, reflected
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord frames use."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return (header + struct.pack("<I", masked_crc32c(header)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 on the wire: negatives as 10-byte two's complement
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def event(wall_time: float, *, step: int = 0, scalars: Mapping[str, float] | None = None,
          file_version: bytes | None = None) -> bytes:
    """A serialized `Event`: a file-version header, or one step's scalars."""
    out = _field(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _field(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version)
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5)
                         + struct.pack("<f", float(value)))
            for tag, value in scalars.items())
        out += _bytes_field(5, summary)
    return out


class EventWriter:
    """Appends scalar events to `<logdir>/events.out.tfevents.<time>.<host>.<pid>`
    (a new file per writer, as TensorBoard expects), flushed at every write so a
    crash loses nothing already logged."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        self.path = os.path.join(
            logdir, f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}")
        self._file = open(self.path, "wb")
        self._file.write(tfrecord(event(now, file_version=FILE_VERSION)))
        self._file.flush()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self._file.write(tfrecord(event(time.time(), step=step, scalars=scalars)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
