"""Training progress: a tqdm bar (loss, tokens/s, ETA) and a metrics log (JSON lines, TensorBoard).

:class:`MetricsWriter` appends one JSON object per step to ``metrics.jsonl``; a resumed run first
cuts the file back to the checkpoint it resumed from, so the file always describes one run without
duplicate steps. With ``tensorboard=True`` the same scalars also go to an
``events.out.tfevents.*`` file TensorBoard reads. That file is written here directly (TFRecord
framing with CRC32C, the ``Event``/``Summary`` protobuf encoded by hand) because neither
tensorboard nor tensorflow is a dependency; tests decode it with protobuf against the proto schema.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any, Iterable, Mapping

from tqdm.auto import tqdm

from subliminal_jax import jsonable

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (missing file: [])."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _jsonable(value: Any) -> Any:
  value = jsonable.to_jsonable(value)
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible rather than invalid
  return value


class MetricsWriter:
  """Per-step metrics to ``<workdir>/metrics.jsonl`` (and optionally TensorBoard events).

  Args:
    workdir: directory of the run (created).
    resume_step: the step a resumed run restarts from: records with ``step > resume_step`` (written
      after that checkpoint by the interrupted run) are dropped. None: a fresh run, the file is
      started anew.
    tensorboard: also write TensorBoard event files under ``<workdir>/tensorboard``.
    filename: the JSON-lines file in ``workdir``.
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
               tensorboard: bool = False, filename: str = METRICS_FILE):
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, filename)
    kept = ([r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            if resume_step is not None else [])
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      for record in kept:
        f.write(json.dumps(record) + "\n")
    os.replace(tmp, self.path)
    self.records: list[dict[str, Any]] = kept
    self._file = open(self.path, "a")
    self._events = EventFileWriter(os.path.join(workdir, "tensorboard")) if tensorboard else None

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record (must hold an int ``step``) and flushes it."""
    if "step" not in record:
      raise ValueError(f"a metrics record needs a 'step', got keys {sorted(record)}")
    record = {k: _jsonable(v) for k, v in record.items()}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    self.records.append(record)
    if self._events is not None:
      self._events.scalars(int(record["step"]), {k: v for k, v in record.items()
                                                 if k != "step" and isinstance(v, (int, float))})

  def close(self) -> None:
    self._file.close()
    if self._events is not None:
      self._events.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class ProgressBar:
  """tqdm over optimizer steps showing loss, tokens/s and (from tqdm) rate and ETA."""

  def __init__(self, total_steps: int, *, start_step: int = 0, desc: str = "training",
               enabled: bool = True):
    self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                     disable=not enabled, dynamic_ncols=True)

  def update(self, loss: float, tokens_per_s: float | None, epoch: int) -> None:
    postfix = {"epoch": epoch, "loss": f"{loss:.4f}"}
    if tokens_per_s is not None:
      postfix["tok/s"] = f"{tokens_per_s:,.0f}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(1)

  def close(self) -> None:
    self._bar.close()


# ---------------------------------------------------------------------------------------------
# TensorBoard event files without tensorboard


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum TFRecord framing uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  """A tensorflow ``Event`` protobuf: wall_time (1, double), step (2, int64), file_version (3) or
  summary (5) with one ``Summary.Value`` (tag 1, simple_value 2 as float) per scalar."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + _varint(2 << 3 | 5)
                          + struct.pack("<f", float(value)))
        for tag, value in scalars.items())
    out += _length_delimited(5, values)
  return out


class EventFileWriter:
  """Appends scalar summaries to ``events.out.tfevents.<time>.<host>`` in ``directory``."""

  def __init__(self, directory: str | os.PathLike):
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    now = time.time()
    self.path = os.path.join(directory, f"events.out.tfevents.{int(now)}.{socket.gethostname()}")
    self._file = open(self.path, "ab")
    self._file.write(tfrecord(encode_event(now, 0, file_version="brain.Event:2")))
    self._file.flush()

  def scalars(self, step: int, values: Mapping[str, float] | Iterable[tuple[str, float]]) -> None:
    values = dict(values)
    if values:
      self._file.write(tfrecord(encode_event(time.time(), step, scalars=values)))
      self._file.flush()

  def close(self) -> None:
    self._file.close()
