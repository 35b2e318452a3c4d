"""An independent reader of TensorBoard event files, to check ``nlj.train.tensorboard``.

It shares no code with the writer: a bitwise (table-free) CRC-32C and a generic protobuf
wire-format decoder.
"""

from __future__ import annotations

import struct
from pathlib import Path


def crc32c_bitwise(data: bytes) -> int:
  """CRC-32C, one bit at a time."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = crc32c_bitwise(data)
  return ((crc >> 15 | crc << 17) + 0xA282EAD8) % 2**32


def _varint(data: bytes, i: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = data[i]
    value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
    if not byte & 0x80:
      return value, i


def _fields(data: bytes) -> dict[int, list]:
  """Protobuf wire format -> ``{field number: [values]}``: varints as ints, fixed64 as doubles,
  fixed32 as floats, length-delimited fields as bytes."""
  fields: dict[int, list] = {}
  i = 0
  while i < len(data):
    key, i = _varint(data, i)
    wire = key & 7
    if wire == 0:
      value, i = _varint(data, i)
    elif wire == 1:
      value, i = struct.unpack_from("<d", data, i)[0], i + 8
    elif wire == 5:
      value, i = struct.unpack_from("<f", data, i)[0], i + 4
    elif wire == 2:
      size, i = _varint(data, i)
      value, i = data[i:i + size], i + size
    else:
      raise ValueError(f"unexpected wire type {wire}")
    fields.setdefault(key >> 3, []).append(value)
  return fields


def read_events(path: str | Path) -> list[dict]:
  """The events of one file, checking both CRCs of every record.

  Each event is ``{"wall_time", "step"}`` plus ``"file_version"`` (str), ``"scalars"``
  (``{tag: float}``) or ``"session_log"`` (the status int) when present.
  """
  data, i, events = Path(path).read_bytes(), 0, []
  while i < len(data):
    header = data[i:i + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack_from("<I", data, i + 8)[0] == _masked(header), "length CRC"
    body = data[i + 12:i + 12 + length]
    assert struct.unpack_from("<I", data, i + 12 + length)[0] == _masked(body), "data CRC"
    i += 16 + length
    fields = _fields(body)
    event = {"wall_time": fields[1][0], "step": fields.get(2, [0])[0]}
    if 3 in fields:
      event["file_version"] = fields[3][0].decode()
    if 5 in fields:
      values = [_fields(v) for v in _fields(fields[5][0]).get(1, [])]
      event["scalars"] = {v[1][0].decode(): v[2][0] for v in values}
    if 7 in fields:
      event["session_log"] = _fields(fields[7][0])[1][0]
    events.append(event)
  assert i == len(data), "trailing bytes"
  return events


def event_files(directory: str | Path) -> list[Path]:
  """The event files of ``directory``, oldest first."""
  return sorted(Path(directory).glob("events.out.tfevents.*"))
