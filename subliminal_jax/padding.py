"""Fixed shapes from ragged rows: sizes rounded up to a multiple, token rows padded to a width.

Jitted programs compile once per shape, so batches are padded to a few fixed widths (lengths
rounded up to a bucket) and row counts (rounded up to the data-parallel size). Rows are padded on
the right for training (positions stay 0-based) and on the left for prompts (the last real token
sits in the last column, where decoding continues).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PADDING_SIDES = ("left", "right")


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``n``."""
  if multiple < 1:
    raise ValueError(f"multiple must be a positive int, got {multiple!r}")
  return -(-n // multiple) * multiple


def pad_rows(rows: Sequence[Sequence[int]], *, pad_value: int | bool = 0, side: str = "right",
             width: int | None = None, multiple: int = 1, num_rows: int | None = None,
             dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
  """``(values [R, W], mask bool [R, W])``: each row placed at one end of a row of ``pad_value``.

  ``W`` is ``width``, or the longest row rounded up to ``multiple``; ``R`` is ``num_rows`` (the
  missing rows are all padding) or ``len(rows)``. ``mask`` marks the real entries.
  """
  if side not in PADDING_SIDES:
    raise ValueError(f"side must be one of {PADDING_SIDES}, got {side!r}")
  num_rows = len(rows) if num_rows is None else num_rows
  if len(rows) > num_rows:
    raise ValueError(f"{len(rows)} rows do not fit {num_rows}")
  if width is None:
    width = round_up(max((len(r) for r in rows), default=0), multiple)
  values = np.full((num_rows, width), pad_value, dtype)
  mask = np.zeros((num_rows, width), np.bool_)
  for index, row in enumerate(rows):
    if len(row) > width:
      raise ValueError(f"row {index} has {len(row)} entries, more than the width {width}")
    span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
    values[index, span] = row
    mask[index, span] = True
  return values, mask
