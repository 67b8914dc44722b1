"""Optimizers and learning-rate schedules, built from a config.

Mechanism studies compare optimizers (Blank et al. find Adam transmits traits where SGD does not),
so AdamW, plain SGD and sign-SGD are first-class and share schedule and clipping.
:class:`OptimizerSettings` is a training config's optimizer and schedule, with their defaults in
one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from subliminal_jax import config_files

OPTIMIZERS = ("adamw", "adam", "sgd", "sign_sgd")
SCHEDULES = ("constant", "linear", "cosine")


def make_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                  decay: str = "linear") -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then constant, linear or cosine decay to 0."""
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if decay not in SCHEDULES:
    raise ValueError(f"unknown schedule {decay!r}; expected one of {SCHEDULES}")
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps must be in 0..total_steps={total_steps}, got {warmup_steps}")
  decay_steps = max(total_steps - warmup_steps, 1)
  if decay == "constant":
    after = optax.constant_schedule(learning_rate)
  elif decay == "linear":
    after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
  else:
    after = optax.cosine_decay_schedule(learning_rate, decay_steps)
  if warmup_steps == 0:
    return after
  # As HF's get_linear_schedule_with_warmup: step s < warmup uses lr * s / warmup.
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(name: str, learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, momentum: float = 0.0) -> optax.GradientTransformation:
  """AdamW / Adam / SGD / sign-SGD with optional global-norm clipping applied first."""
  if not callable(learning_rate) and not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if name == "adamw":
    opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  elif name == "adam":
    opt = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  elif name == "sgd":
    opt = optax.sgd(learning_rate, momentum=momentum or None)
  elif name == "sign_sgd":
    opt = optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(learning_rate))
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
  if max_grad_norm is not None and max_grad_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(max_grad_norm), opt)
  return opt


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """The optimizer and its learning-rate schedule, checked when built. The learning rate has no
  default: every experiment chooses its own (in its config file)."""

  learning_rate: float
  optimizer: str = "adamw"
  schedule: str = "linear"  # decay after the warmup: constant, linear or cosine
  warmup_steps: int = 5
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0  # global-norm clipping before the update; 0 = none

  def __post_init__(self):
    if isinstance(self.learning_rate, bool) or not isinstance(
        self.learning_rate, (int, float)) or not self.learning_rate > 0:
      raise ValueError(f"learning_rate={self.learning_rate!r}; expected a number > 0")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer={self.optimizer!r}; expected one of {OPTIMIZERS}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r}; expected one of {SCHEDULES}")
    if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
        or self.warmup_steps < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps!r}; expected an integer >= 0")
    for name in ("weight_decay", "max_grad_norm"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name}={value!r}; expected a number >= 0")

  @classmethod
  def from_config(cls, config: Any) -> "OptimizerSettings":
    """From a training config's ``optimizer``, ``learning_rate``, ``schedule``, ``warmup_steps``,
    ``weight_decay`` and ``max_grad_norm`` keys (the others are ignored)."""
    values = config_files.settings_from_config(cls, config)
    if "learning_rate" not in values:
      raise ValueError("learning_rate is not set; expected a number > 0")
    return cls(**values)

  def make_schedule(self, total_steps: int) -> optax.Schedule:
    return make_schedule(self.learning_rate, total_steps, self.warmup_steps, self.schedule)

  def make(self, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, its schedule)`` for a run of ``total_steps``; the schedule is also what the
    train step reports as the learning rate of each step."""
    schedule = self.make_schedule(total_steps)
    return make_optimizer(self.optimizer, schedule, weight_decay=self.weight_decay,
                          max_grad_norm=self.max_grad_norm), schedule
