"""Imitation losses: a student matching a teacher's outputs, optionally on a subset of logits.

These are the losses the paper's theorem covers (softmax cross-entropy / KL and squared error): each
is minimised, with zero gradient, where the student's logits equal the teacher's, and its Hessian
in the student's logits there is positive semidefinite. ``logit_mask`` selects the logits that are
imitated (the MNIST experiment's "auxiliary logits only"); ``weights`` lets padded examples count
zero, so a partial last batch averages over its real examples only.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from subliminal_jax.training import losses

ImitationLoss = Callable[..., jax.Array]


def _weighted_mean(per_example: jax.Array, weights: jax.Array | None) -> jax.Array:
  if weights is None:
    return per_example.mean()
  weights = weights.astype(jnp.float32)
  return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1e-12)


def kl_imitation(student_logits: jax.Array, teacher_logits: jax.Array,
                 logit_mask: jax.Array | None = None, weights: jax.Array | None = None) -> jax.Array:
  """Mean over examples of KL(softmax(teacher) || softmax(student)) over the masked logits.

  Logits are ``[..., C]``; ``logit_mask`` is ``[C]`` (or broadcastable); ``weights`` ``[...]``.
  The teacher side is a constant (stop_gradient): only the student learns. The KL is
  :func:`subliminal_jax.training.losses.masked_kl` (masked logits add exactly 0).
  """
  kl = losses.masked_kl(jax.lax.stop_gradient(teacher_logits), student_logits, logit_mask)
  return _weighted_mean(kl, weights)


def squared_error_imitation(student_logits: jax.Array, teacher_logits: jax.Array,
                            logit_mask: jax.Array | None = None,
                            weights: jax.Array | None = None) -> jax.Array:
  """Mean squared difference of the masked logits (torch's ``mse_loss`` over those logits)."""
  diff = student_logits.astype(jnp.float32) - jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  squares = diff * diff
  if logit_mask is None:
    per_example = squares.mean(-1)
  else:
    mask = jnp.broadcast_to(logit_mask, squares.shape)
    per_example = jnp.where(mask, squares, 0.0).sum(-1) / jnp.maximum(mask.sum(-1), 1)
  return _weighted_mean(per_example, weights)


IMITATION_LOSSES: dict[str, ImitationLoss] = {"kl": kl_imitation, "mse": squared_error_imitation}


def get_imitation_loss(name: str) -> ImitationLoss:
  if name not in IMITATION_LOSSES:
    raise ValueError(f"unknown imitation loss {name!r}; expected one of {sorted(IMITATION_LOSSES)}")
  return IMITATION_LOSSES[name]
