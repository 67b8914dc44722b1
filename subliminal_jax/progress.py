"""Progress bars named after the running experiment stage.

While an experiment stage runs (:func:`in_stage`, entered by ``artifacts.Workdir.run_stage``),
:func:`describe` prefixes every bar's description with the stage and its place in the pipeline
(``sampling_owl (stage 3 of 8): sampling``), so a long run says where it is. Training, sampling,
evaluation and distillation name their bars here and ``artifacts`` sets the stage, so this module
sits at the bottom of the package's layers and imports none of it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from tqdm.auto import tqdm

_STAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("stage", default=None)


@contextlib.contextmanager
def in_stage(label: str) -> Iterator[None]:
  """Progress bars created inside are named after ``label`` (see :func:`describe`)."""
  token = _STAGE.set(label)
  try:
    yield
  finally:
    _STAGE.reset(token)


def describe(desc: str) -> str:
  """A bar's description, prefixed with the running stage when there is one."""
  stage = _STAGE.get()
  return f"{stage}: {desc}" if stage else desc


class ProgressBar:
  """tqdm over optimizer steps showing loss, tokens/s and (from tqdm) rate and ETA."""

  def __init__(self, total_steps: int, *, start_step: int = 0, desc: str = "training",
               enabled: bool = True):
    self._bar = tqdm(total=total_steps, initial=start_step, desc=describe(desc), unit="step",
                     disable=not enabled, dynamic_ncols=True)

  def update(self, loss: float, tokens_per_s: float | None, epoch: int) -> None:
    postfix = {"epoch": epoch, "loss": f"{loss:.4f}"}
    if tokens_per_s is not None:
      postfix["tok/s"] = f"{tokens_per_s:,.0f}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(1)

  def close(self) -> None:
    self._bar.close()
