"""Preemption notices: a checkpoint at the next step boundary, on every host, then a clean exit.

Spot and preemptible capacity sends SIGTERM about 30 s before the machine goes (GCE, SLURM,
Kubernetes); a TPU VM's maintenance event reaches jax the same way. The training loops ask
:func:`reached` after every step. With several processes that is jax's preemption sync point
(``multihost_utils.reached_preemption_sync_point``: the notice one host gets is propagated, and
every host answers True at the same step, so all save that step); with one process it is whether
this process has received SIGTERM since :func:`install`. The loop then saves a checkpoint and raises
:class:`Preempted`; ``main`` exits with :data:`EXIT_CODE`, and the same command resumes from that
checkpoint.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", what a scheduler's retry policy can key on
_notice = threading.Event()


class Preempted(Exception):
  """Raised by a training loop once the checkpoint of the preemption step is on disk."""

  def __init__(self, step: int, where: str):
    saved = (f"saved a checkpoint of step {step} in {where}" if step >= 0
             else f"stopped before {where}; every finished stage is kept")
    super().__init__(f"preempted: {saved}; run the same command again to resume")
    self.step = step


def _multi_process() -> bool:
  return jax.process_count() > 1


def install() -> None:
  """Turns SIGTERM into a preemption notice for a one-process run (a multi-process run's notices
  are jax's own, set up by ``jax.distributed.initialize``). Call from the main thread."""
  if _multi_process():
    return
  signal.signal(signal.SIGTERM, lambda signum, frame: _notice.set())


def reached(step: int) -> bool:
  """Whether to save and stop after ``step``: every host gives the same answer at the same step.
  Call it after every step, on every host."""
  if _multi_process():
    return multihost_utils.reached_preemption_sync_point(step)
  return _notice.is_set()


def check_between_stages(where: str) -> None:
  """Raises :class:`Preempted` if this process got a notice: called before a stage starts, so a
  notice during a stage without steps (sampling, evaluation) ends the job once that stage is
  committed instead of leaving it running. (One process: several agree through :func:`reached`.)"""
  if not _multi_process() and _notice.is_set():
    raise Preempted(-1, where)


def clear() -> None:
  """Forgets a notice (tests, and a run that resumes in the same process)."""
  _notice.clear()
