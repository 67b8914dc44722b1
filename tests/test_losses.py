"""The masked KL divergence (training/losses.py) against a float64 numpy reference: values,
allowed sets (single tokens, empty rows, -inf entries), temperatures, dtypes and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

from subliminal_jax.training import losses

ROWS, VOCAB = 12, 40


def _reference_kl(p_logits, q_logits, allowed, temperature):
  """KL(P || Q) of the renormalised, tempered distributions in float64; also (P, Q)."""
  p = np.where(allowed, np.asarray(p_logits, np.float64) / temperature, -np.inf)
  q = np.where(allowed, np.asarray(q_logits, np.float64) / temperature, -np.inf)
  empty = ~np.isfinite(p).any(-1, keepdims=True)
  log_p = log_softmax(np.where(empty, 0.0, p), axis=-1)
  log_q = log_softmax(np.where(empty, 0.0, q), axis=-1)
  prob_p, prob_q = np.exp(log_p), np.exp(log_q)
  with np.errstate(invalid="ignore"):
    kl = np.where(prob_p > 0, prob_p * (log_p - log_q), 0.0).sum(-1)
  return np.where(empty[..., 0], 0.0, kl), prob_p, prob_q


def _cases(seed):
  """Random logits (scale 3) and allowed sets: about half the vocabulary allowed, row 0 a single
  token, row 1 nothing, row 2 everything; -inf logits at allowed tokens of rows 3 (both sides
  alike) and 4 (P's side only: P = 0 there while Q > 0)."""
  rng = np.random.default_rng(seed)
  p = rng.normal(size=(ROWS, VOCAB)) * 3
  q = rng.normal(size=(ROWS, VOCAB)) * 3
  allowed = rng.random((ROWS, VOCAB)) < 0.5
  allowed[0] = False
  allowed[0, 7] = True
  allowed[1] = False
  allowed[2] = True
  for row in (3, 4):
    allowed[row, :4] = True
    p[row, :3] = -np.inf
  q[3, :3] = -np.inf
  return p.astype(np.float32), q.astype(np.float32), allowed


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.8])
def test_masked_kl_matches_float64_numpy(temperature):
  p, q, allowed = _cases(0)
  got = losses.masked_kl(jnp.asarray(p), jnp.asarray(q), jnp.asarray(allowed),
                         temperature=temperature)
  assert got.dtype == jnp.float32 and got.shape == (ROWS,)
  expected, _, _ = _reference_kl(p, q, allowed, temperature)
  assert np.all(expected[3:] > 1e-2)  # non-trivial rows, so the relative tolerance means something
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6, atol=1e-7)
  assert float(got[0]) == 0.0 and float(got[1]) == 0.0  # one allowed token, and none

  unrestricted = losses.masked_kl(jnp.asarray(p[5:]), jnp.asarray(q[5:]), temperature=temperature)
  expected_all, _, _ = _reference_kl(p[5:], q[5:], np.ones_like(allowed[5:]), temperature)
  np.testing.assert_allclose(np.asarray(unrestricted), expected_all, rtol=2e-6)


def test_masked_kl_gradient_is_finite_and_exact():
  """d KL / d q_logits = (Q - P) / T on the allowed tokens and exactly 0 elsewhere (masked or
  -inf); the gradient into p_logits is finite and 0 at masked tokens too, at T < 1 as well (where
  masking before dividing by T would overflow to -inf and make it NaN)."""
  p, q, allowed = _cases(1)
  temperature = 0.6
  total = lambda a, b: losses.masked_kl(a, b, jnp.asarray(allowed), temperature=temperature).sum()
  grad_p, grad_q = jax.grad(total, argnums=(0, 1))(jnp.asarray(p), jnp.asarray(q))
  grad_p, grad_q = np.asarray(grad_p), np.asarray(grad_q)
  assert np.isfinite(grad_p).all() and np.isfinite(grad_q).all()
  blocked = ~allowed | np.isneginf(p) | np.isneginf(q)
  assert np.all(grad_q[~allowed] == 0.0) and np.all(grad_p[blocked] == 0.0)
  _, prob_p, prob_q = _reference_kl(p, q, allowed, temperature)
  expected = np.where(allowed, (prob_q - prob_p) / temperature, 0.0)
  np.testing.assert_allclose(grad_q, expected, rtol=1e-6, atol=1e-7)


def test_masked_kl_dtypes_and_broadcast_mask():
  """bfloat16 logits are computed in float32, float64 ones (x64) in float64 to ~1e-12; an
  allowed mask over the last axis only broadcasts over the rows."""
  p, q, _ = _cases(2)
  mask = np.arange(VOCAB) % 3 != 0
  expected, _, _ = _reference_kl(p, q, np.broadcast_to(mask, p.shape), 1.3)
  got = losses.masked_kl(jnp.asarray(p), jnp.asarray(q), jnp.asarray(mask), temperature=1.3)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6)
  half = losses.masked_kl(jnp.asarray(p, jnp.bfloat16), jnp.asarray(q, jnp.bfloat16))
  assert half.dtype == jnp.float32
  with jax.enable_x64(True):
    wide = losses.masked_kl(jnp.asarray(p, jnp.float64), jnp.asarray(q, jnp.float64),
                            jnp.asarray(mask), temperature=1.3)
    assert wide.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(wide), expected, rtol=1e-12)


def test_masked_kl_q_zero_where_p_positive_is_huge_not_inf():
  """A -inf in q_logits alone at a token P gives mass: KL is finite but about P * 3.4e38."""
  p = jnp.zeros((1, 4))
  q = jnp.array([[0.0, 0.0, 0.0, -jnp.inf]])
  kl = float(losses.masked_kl(p, q)[0])
  assert np.isfinite(kl) and kl > 1e37


def test_masked_kl_rejects_different_vocabularies():
  with pytest.raises(ValueError, match="vocabularies differ: 4 vs 5"):
    losses.masked_kl(jnp.zeros((2, 4)), jnp.zeros((2, 5)))
