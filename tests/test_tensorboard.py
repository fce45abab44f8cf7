"""The TensorBoard event files we write by hand decode with the protobuf
definitions of TensorFlow's Event (as tensorboardX ships them), carry valid
TFRecord CRCs, and hold what tensorboardX itself writes for the same scalars."""

import glob
import os
import struct

import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

from d2v_jax import tensorboard
from d2v_jax.metrics import MetricWriter


def test_crc32c_matches_published_check_values():
    # The CRC catalogue's check value, and RFC 3720 (iSCSI) appendix B.4.
    assert tensorboard.crc32c(b"123456789") == 0xE3069283
    assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA
    assert tensorboard.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tensorboard.crc32c(bytes(range(32))) == 0x46DD794E


def read_records(path):
    """TFRecord frames, checking both masked CRCs of each."""
    with open(path, "rb") as f:
        data = f.read()
    records, at = [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[at + 8:at + 12])
        payload = data[at + 12:at + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert header_crc == tensorboard.masked_crc32c(header)
        assert payload_crc == tensorboard.masked_crc32c(payload)
        records.append(payload)
        at += 16 + length
    return records


def scalars_of(path):
    """{(step, tag): value} and the first event's file_version."""
    events = [event_pb2.Event.FromString(r) for r in read_records(path)]
    out = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
    return out, events[0].file_version, events


def test_metric_writer_events_decode_like_tensorboardx(tmp_path):
    logged = {1: {"loss": 3.25, "lr": 1e-4, "target_pos_share": 0.5},
              7: {"loss": -0.125, "grad_norm": 12345.678}, 2**40: {"loss": 1.0}}
    w = MetricWriter(str(tmp_path / "ours"))
    ref = SummaryWriter(str(tmp_path / "ref"))
    for step, scalars in logged.items():
        w.write(step, scalars)
        for k, v in scalars.items():
            ref.add_scalar(k, v, step)
    w.close()
    ref.close()
    (ours,) = glob.glob(str(tmp_path / "ours" / "tb" / "events.out.tfevents.*"))
    (theirs,) = glob.glob(str(tmp_path / "ref" / "events.out.tfevents.*"))
    got, version, events = scalars_of(ours)
    want, want_version, _ = scalars_of(theirs)
    assert version == want_version == "brain.Event:2"
    assert got == want and len(got) == 6
    np.testing.assert_allclose(got[7, "grad_norm"], np.float32(12345.678))
    assert all(e.wall_time > 1.7e9 for e in events)
    assert os.path.basename(ours).split(".")[3].isdigit()  # events.out.tfevents.<time>.<host>...


def test_negative_step_and_empty_scalars_encode():
    e = event_pb2.Event.FromString(tensorboard.event(5.5, step=-3, scalars={}))
    assert (e.step, e.wall_time, len(e.summary.value)) == (-3, 5.5, 0)
