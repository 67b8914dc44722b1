"""The training metrics log: one JSON line per step (``metrics.jsonl``), and TensorBoard events.

:class:`MetricsWriter` appends one JSON object per step to ``metrics.jsonl``; a resumed run first
cuts the file back to the checkpoint it resumed from, so the file always describes one run without
duplicate steps. A kill can leave the last line half written: that line is dropped on resume (the
step it described is redone), any other malformed line is an error naming the file and line.
With ``tensorboard=True`` the same scalars also go to TensorBoard event files, written by
tensorboardX (TensorBoard's own file format, without tensorflow).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from subliminal_jax import files, jsonable

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (missing file: []).

  A last line without its newline that does not parse was torn by a kill mid-write: it is
  dropped. Any other line that does not parse is an error naming the file and line.
  """
  if not os.path.exists(path):
    return []
  return files.read_jsonl(path, drop_torn_last_line=True)


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
    self._events = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # only runs that ask for TensorBoard need it
      self._events = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record (must hold an int ``step``) and flushes it."""
    if "step" not in record:
      raise ValueError(f"a metrics record needs a 'step', got keys {sorted(record)}")
    record = {k: _jsonable(v) for k, v in record.items()}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    self.records.append(record)
    if self._events is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._events.add_scalar(key, value, int(record["step"]))
      self._events.flush()

  def close(self) -> None:
    self._file.close()
    if self._events is not None:
      self._events.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
