"""Optimizers and learning-rate schedules, built from a config.

Mechanism studies compare optimizers (Blank et al. find Adam transmits traits where SGD does not),
so AdamW, plain SGD and sign-SGD are first-class and share schedule and clipping.
"""

from __future__ import annotations

from typing import Any

import optax

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


def optimizer_from_config(config: Any, total_steps: int) -> optax.GradientTransformation:
  """From a ConfigDict with optimizer, learning_rate, warmup_steps, schedule, weight_decay,
  max_grad_norm (missing keys take the defaults of the paper's student recipe)."""
  get = lambda key, default: config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  schedule = make_schedule(get("learning_rate", 2e-4), total_steps, get("warmup_steps", 5),
                           get("schedule", "linear"))
  return make_optimizer(get("optimizer", "adamw"), schedule, weight_decay=get("weight_decay", 0.0),
                        max_grad_norm=get("max_grad_norm", 1.0))
