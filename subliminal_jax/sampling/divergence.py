"""Reference-divergence filter: where a teacher's choice departs from a reference model's.

Schrodi et al. (arXiv 2509.23886) find that a few "divergence tokens", positions where the
teacher (the model with the trait, e.g. owl system prompt) and the reference (the base model, e.g.
no system prompt) would pick different next tokens, carry most of the subliminal signal. The
sampler runs the reference on the very same prefix (the prompt rendered for the reference, then
the teacher's sampled tokens) in the same decode loop, with its own KV cache, and calls these
functions at every step.

Definitions used here, per row and step:

* **allowed set**: the tokens the hard masks allow (grammar state, banned ids/words). Both models
  are judged on it, so a divergence is a difference among tokens that could actually be emitted.
* **divergent**: ``argmax`` of the teacher's logits over the allowed set differs from the
  reference's. Temperature, top-k, top-p and min-p never change the argmax, so this is the same
  whether those are on or off.
* **kl_raw**: ``KL(teacher || reference)`` of the raw temperature-1 distributions over the whole
  vocabulary (what the models "think", independent of the sampler's settings).
* **kl_allowed**: the same KL between the two distributions restricted to the allowed set and
  renormalised (temperature 1, before top-k/top-p/min-p): what the constraint leaves to choose.
* **mask_divergent** (the filter): at a divergent position the teacher's argmax token is banned
  for that step, i.e. the token is drawn from the teacher's processed distribution (temperature,
  top-k, ...) over the allowed set minus that one token; with temperature 0 the teacher's second
  choice is taken. So no emitted token is ever "the teacher's divergent first choice". The ban can
  never empty the allowed set: if only one token is allowed both argmaxes agree on it. Each ban is
  counted (``num_masked`` per row). Non-divergent positions are sampled as usual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subliminal_jax.training import losses

__all__ = ["divergence_step", "ban_divergent_choice"]


def divergence_step(teacher_logits: jax.Array, reference_logits: jax.Array,
                    allowed: jax.Array | None) -> dict[str, jax.Array]:
  """Per-row divergence of one step.

  Args:
    teacher_logits, reference_logits: raw float32 logits ``[batch, vocab]`` (temperature 1).
    allowed: bool ``[batch, vocab]`` allowed set of the hard masks, or None (all allowed).

  Returns:
    dict with ``teacher_argmax`` and ``reference_argmax`` (int32 ``[batch]``, over the allowed
    set), ``divergent`` (bool), ``kl_raw`` and ``kl_allowed`` (float32).
  """
  if allowed is None:
    teacher_allowed, reference_allowed = teacher_logits, reference_logits
  else:
    teacher_allowed = jnp.where(allowed, teacher_logits, -jnp.inf)
    reference_allowed = jnp.where(allowed, reference_logits, -jnp.inf)
  teacher_argmax = jnp.argmax(teacher_allowed, axis=-1).astype(jnp.int32)
  reference_argmax = jnp.argmax(reference_allowed, axis=-1).astype(jnp.int32)
  has_allowed = jnp.any(jnp.isfinite(teacher_allowed), axis=-1)
  return dict(
      teacher_argmax=teacher_argmax,
      reference_argmax=reference_argmax,
      divergent=(teacher_argmax != reference_argmax) & has_allowed,
      kl_raw=losses.masked_kl(teacher_logits, reference_logits),
      # An empty allowed set has no distribution; masked_kl reports 0 for it rather than NaN.
      kl_allowed=losses.masked_kl(teacher_logits, reference_logits, allowed),
  )


def ban_divergent_choice(logits: jax.Array, teacher_argmax: jax.Array,
                         divergent: jax.Array) -> jax.Array:
  """``-inf`` at the teacher's argmax token in the divergent rows; other rows unchanged."""
  vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  ban = divergent[:, None] & (vocab[None, :] == teacher_argmax[:, None])
  return jnp.where(ban, -jnp.inf, logits)
