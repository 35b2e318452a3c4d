"""TensorBoard scalar event files, written without TensorFlow.

An event file is a sequence of TFRecords, each ``uint64 length | uint32 masked_crc32c(length) |
data | uint32 masked_crc32c(data)`` (little-endian), whose ``data`` is a serialized
``tensorflow.Event``. Only the fields scalars need are encoded, by hand:

  Event      { double wall_time = 1; int64 step = 2; string file_version = 3;
               Summary summary = 5; SessionLog session_log = 7; }
  Summary    { repeated Value value = 1; }
  Value      { string tag = 1; float simple_value = 2; }
  SessionLog { Status status = 1; }                       (START = 1)

The first record of a file is ``file_version: "brain.Event:2"``. ``restart(step)`` writes a
``SessionLog.START`` at ``step``: TensorBoard then drops the events of earlier files at steps
``>= step`` (those logged after the checkpoint a run resumed from).

Example:
  writer = EventWriter("runs/lm/hope_tiny")       # then: tensorboard --logdir runs
  writer.scalars(10, {"train/loss": 2.5, "train/lr": 1e-3})
  writer.close()
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

__all__ = ["EventWriter", "crc32c", "masked_crc32c"]


def _crc_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``, the checksum of TFRecords."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: ``crc32c`` rotated right by 15 bits plus ``0xA282EAD8`` (mod 2^32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while value > 0x7F:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire_type) + payload


def _message(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


class EventWriter:
  """Appends events to a new ``events.out.tfevents.<time_ns>.<host>`` file in ``logdir``.

  Every write is flushed, so a running TensorBoard sees each log interval as it happens.
  """

  def __init__(self, logdir: str | os.PathLike[str]):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{time.time_ns()}.{socket.gethostname()}"
    self.path = os.path.join(os.fspath(logdir), name)
    self._file = open(self.path, "xb")  # pylint: disable=consider-using-with
    self._write(0, _message(3, b"brain.Event:2"))

  def _write(self, step: int, body: bytes) -> None:
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    data = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step)) + body
    length = struct.pack("<Q", len(data))
    self._file.write(length + struct.pack("<I", masked_crc32c(length)) + data
                     + struct.pack("<I", masked_crc32c(data)))
    self._file.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event at ``step`` with a ``simple_value`` (float32) summary per ``tag: value``."""
    summary = b"".join(_message(1, _message(1, tag.encode()) + _field(2, 5, struct.pack(
        "<f", float(value)))) for tag, value in values.items())
    self._write(step, _message(5, summary))

  def restart(self, step: int) -> None:
    """Mark a (re)start at ``step``: TensorBoard drops earlier files' events at steps >= it."""
    self._write(step, _message(7, _field(1, 0, _varint(1))))

  def close(self) -> None:
    """Close the file."""
    self._file.close()
