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
sit next to next-token cross-entropy and share its target alignment. So does the one masked KL
divergence (:func:`masked_kl`) that logit distillation, the MNIST imitation losses and the
sampler's reference-divergence filter all use, with its one masking convention
(:func:`mask_logits`).
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


# ---------------------------------------------------------------------------------------------
# Distributions restricted to allowed tokens, and the KL between them


def _at_least_float32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def mask_logits(logits: jax.Array, allowed: jax.Array | None = None) -> jax.Array:
  """``logits`` in at least float32 with every entry outside ``allowed``, and every -inf, set to
  the dtype's most negative finite value: the one masking convention of the divergences here.

  Why that value and not -inf: its softmax weight is still exactly 0 (the exponential underflows),
  but log-probabilities stay finite, so a masked entry's ``log p - log q`` is a finite number
  instead of -inf - (-inf) = NaN, and no NaN reaches a gradient (not even through the branch a
  ``jnp.where`` discards). Why not a constant such as -1e9: this value is below every finite logit
  by construction, a constant only by assumption. A row with nothing allowed comes out uniform
  rather than NaN. ``allowed``: bool, broadcast against ``logits``; None keeps every finite entry.
  Masked entries get gradient 0.
  """
  logits = _at_least_float32(logits)
  keep = ~jnp.isneginf(logits)
  if allowed is not None:
    keep = keep & allowed
  return jnp.where(keep, logits, jnp.finfo(logits.dtype).min)


def masked_log_softmax(logits: jax.Array, allowed: jax.Array | None = None, *,
                       temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature) over the last axis, renormalised over ``allowed``.

  Masked entries (see :func:`mask_logits`) get a finite log-probability of about -3.4e38 in
  float32, i.e. probability exactly 0. Computed in float32 (float64 for float64 logits).
  """
  # Divide before masking: the most negative finite value divided by a temperature below 1
  # would overflow to -inf.
  return jax.nn.log_softmax(mask_logits(_at_least_float32(logits) / temperature, allowed), axis=-1)


def relative_entropy_terms(p: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Elementwise ``p * (log p - log q)``, exactly 0 where p == 0 (0 log 0 = 0, whatever q)."""
  return jnp.where(p > 0, p * (log_p - log_q), 0.0)


def masked_kl(p_logits: jax.Array, q_logits: jax.Array, allowed: jax.Array | None = None, *,
              temperature: float = 1.0) -> jax.Array:
  """KL(P || Q) per position, P = softmax(p_logits / T) and Q = softmax(q_logits / T), both
  restricted to ``allowed`` and renormalised there.

  Args:
    p_logits, q_logits: [..., V], any float dtype; -inf marks a token of probability 0.
    allowed: bool, broadcastable to [..., V]; None: the whole vocabulary.
    temperature: T of both softmaxes (the KL is not scaled by T^2).

  Returns [...], in float32 (float64 for float64 logits). Masking is :func:`mask_logits`'s, so a
  token outside ``allowed`` adds exactly 0 and gets gradient exactly 0, a row with nothing allowed
  has KL 0, and where P > 0 but Q = 0 (a -inf in q_logits alone) the KL is huge (about
  P * 3.4e38 in float32) rather than +inf. Gradients reach both arguments: a caller whose P is a
  fixed target stops its gradient.
  """
  if p_logits.shape[-1] != q_logits.shape[-1]:
    raise ValueError(f"the two distributions' vocabularies differ: {p_logits.shape[-1]} vs "
                     f"{q_logits.shape[-1]} logits")
  log_p = masked_log_softmax(p_logits, allowed, temperature=temperature)
  log_q = masked_log_softmax(q_logits, allowed, temperature=temperature)
  return relative_entropy_terms(jnp.exp(log_p), log_p, log_q).sum(-1)
