"""Training objectives for language models, in the form the train step expects.

Every objective is ``loss_fn(model, batch, rng, aux) -> (sum_of_losses, num_targets, metrics)``:
a SUM over the target tokens of this (micro-)batch and how many targets there were, never a mean.
The train step adds sums and counts over micro-batches and devices and divides once, so a padded
token, a short micro-batch or an uneven shard never changes the weight of a real target. Extra
``metrics`` are per-target sums too (the step reports them divided by the global target count).
(An objective that already returns its batch's mean, as the MNIST ensembles' do, is run with the
step's ``mean_loss``.)

Batch layout (docs/training.md): ``input_ids`` int32 [B, T], ``attention_mask`` bool [B, T],
``loss_mask`` bool [B, T] where ``loss_mask[b, t]`` means token t is a target predicted from
position t - 1 (so t = 0 is never a target).

Objectives live here together so that others (logit distillation from a teacher passed as ``aux``)
sit next to next-token cross-entropy and share its target alignment.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

LossFn = Callable[[nnx.Module, dict, jax.Array, Any], tuple[jax.Array, jax.Array, dict]]


def shifted_targets(input_ids: jax.Array, loss_mask: jax.Array,
                    attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """For each position t: the token it predicts (t + 1) and whether that is a target.

  Shifting the targets left (rather than slicing the logits) keeps the [B, T, V] logits whole,
  which avoids a copy of the largest array in the step. The last position predicts nothing.
  """
  mask = loss_mask.astype(bool)
  if attention_mask is not None:
    mask = mask & attention_mask.astype(bool)  # a padding token is never a target
  targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
  target_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  return targets, target_mask


def token_cross_entropy(logits: jax.Array, targets: jax.Array, target_mask: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(target) over masked positions, number of masked positions), in float32."""
  logits = logits.astype(jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = log_normalizer - target_logits
  total = jnp.where(target_mask, nll, 0.0).sum()
  return total, target_mask.sum().astype(jnp.int32)


def next_token_loss(model: nnx.Module, batch: dict, rng: jax.Array | None = None, aux: Any = None
                    ) -> tuple[jax.Array, jax.Array, dict]:
  """Summed next-token cross-entropy over the ``loss_mask`` targets (the SFT objective)."""
  del rng, aux
  logits = model(batch["input_ids"], batch["attention_mask"])
  targets, target_mask = shifted_targets(batch["input_ids"], batch["loss_mask"],
                                         batch["attention_mask"])
  total, count = token_cross_entropy(logits, targets, target_mask)
  return total, count, {}
