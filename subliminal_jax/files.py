"""Result files written atomically, and read back with errors that name the file.

A report or marker file written in place is, while it is written (and after a kill or a full disk
in the middle), a torn file that a reader takes for the whole. Every result file is therefore
written to a temporary file in the same directory and renamed over the target (``os.replace`` is
atomic on POSIX file systems): a reader sees the old content or the new, never a mixture.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable

from absl import logging


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file renamed into place."""
  write_atomic(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` through a temporary file renamed into place."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2,
               sort_keys: bool = False, default: Callable[[Any], Any] | None = None) -> None:
  """``value`` as JSON (and a final newline) at ``path``, written atomically."""
  text = json.dumps(value, indent=indent, sort_keys=sort_keys, default=default)
  write_text_atomic(path, text + "\n")


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
  """Calls ``write(tmp_path)`` and renames the file it wrote onto ``path``.

  For writers that take a file name (matplotlib's savefig, safetensors' save_file). The temporary
  file keeps ``path``'s suffix, so writers that pick a format from it pick the right one. On any
  error the temporary file is removed and ``path`` is left as it was.
  """
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
  os.close(fd)
  try:
    write(tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())  # the data is on disk before the name points at it
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a result file is as readable as any other
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in ``path``; a missing or malformed file is an error naming the file."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it was damaged or cut short. Delete it "
                     "(or the artifact directory holding it) to rebuild it") from e


def read_jsonl(path: str | os.PathLike, *, drop_torn_last_line: bool = False) -> list[Any]:
  """The records of a JSON-lines file; a malformed line is an error naming the file and line.

  ``drop_torn_last_line``: a last line without its newline that does not parse was cut by a kill
  in the middle of an append; it is dropped (with a warning) instead.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if drop_torn_last_line and number == len(lines) and not line.endswith("\n"):
        logging.warning("%s: dropped its torn last line (%d bytes, a kill during a write)", path,
                        len(line))
        break
      raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from e
  return records


def read_safetensors(path: str | os.PathLike) -> dict[str, Any]:
  """The numpy arrays of a safetensors file; an unreadable file is an error naming it."""
  from safetensors.numpy import load_file
  path = os.fspath(path)
  try:
    return load_file(path)
  except FileNotFoundError:
    raise
  except Exception as e:  # SafetensorError on a truncated or corrupt file
    raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}. "
                     "Delete it (or the artifact directory holding it) to rebuild it") from e
