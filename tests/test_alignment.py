"""Alignment measures and the first-order theorem (subliminal_jax.mechanism.alignment)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from subliminal_jax.mechanism import alignment, imitation
from subliminal_jax.models import mlp


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.normal(size=(3, 4)) * scale, jnp.float32),
          "b": [jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32)]}


def test_tree_dot_and_cosine_match_numpy():
  a, b = _tree(0), _tree(1)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  np.testing.assert_allclose(alignment.tree_dot(a, b), flat(a) @ flat(b), rtol=1e-5)
  cos = flat(a) @ flat(b) / np.linalg.norm(flat(a)) / np.linalg.norm(flat(b))
  np.testing.assert_allclose(alignment.tree_cosine(a, b), cos, rtol=1e-5)
  zero = jax.tree.map(jnp.zeros_like, a)
  assert float(alignment.tree_cosine(zero, b)) == 0.0
  result = alignment.displacement_alignment(b, a, b, a)
  np.testing.assert_allclose(result["cosine"], 1.0, rtol=1e-6)


def test_share_nonnegative():
  assert alignment.share_nonnegative([0.0, 1.0, -1.0, 2.0]) == 0.75
  assert alignment.share_nonnegative([1.0, np.nan]) == 0.5
  with pytest.raises(ValueError):
    alignment.share_nonnegative([])


def _linear(params, x):
  return x @ params["w"] + params["c"]


def test_one_step_update_of_a_linear_model_is_the_closed_form():
  """Squared error on a linear model: update = lr * eps * (2 / (B*C)) X^T X D exactly."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  theta0 = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), "c": jnp.zeros((3,))}
  direction = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), "c": jnp.zeros((3,))}
  eps, lr = 0.1, 0.5
  teacher = alignment.tree_axpy(eps, direction, theta0)
  update = alignment.one_step_update(_linear, imitation.squared_error_imitation, theta0,
                                     _linear(teacher, x), x, learning_rate=lr)
  expected = lr * eps * 2.0 / (32 * 3) * (np.asarray(x).T @ np.asarray(x) @ np.asarray(direction["w"]))
  np.testing.assert_allclose(update["w"], expected, rtol=1e-4, atol=1e-7)
  # For a linear model the first-order statement is exact: the dot is a PSD quadratic form.
  result = alignment.one_step_alignment(_linear, imitation.squared_error_imitation, theta0,
                                        direction, eps, x, learning_rate=lr)
  coefficient = alignment.first_order_alignment(_linear, imitation.squared_error_imitation,
                                                theta0, direction, x)
  np.testing.assert_allclose(result["dot_per_lr_eps"], coefficient, rtol=1e-4)
  assert float(result["dot"]) > 0


def test_kl_hessian_is_diag_q_minus_qqT_and_psd():
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(size=(13,)), jnp.float32)
  mask = jnp.arange(13) >= 10
  loss = lambda s: imitation.kl_imitation(s[None], z[None], mask)
  hessian = np.asarray(jax.hessian(loss)(z))
  q = np.asarray(jax.nn.softmax(z[10:]))
  expected = np.zeros((13, 13))
  expected[10:, 10:] = np.diag(q) - np.outer(q, q)
  np.testing.assert_allclose(hessian, expected, atol=1e-6)
  assert np.linalg.eigvalsh(hessian).min() > -1e-6
  assert np.abs(np.asarray(jax.grad(loss)(z))).max() < 1e-7  # minimum at the teacher's logits


@pytest.fixture(scope="module")
def tiny_mlp():
  cfg = mlp.MLPConfig(input_size=16, hidden_sizes=(24, 24), num_classes=4, num_aux=3)
  graphdef, params = mlp.init_ensemble(cfg, mlp.model_keys(0, 6))
  return cfg, graphdef, params


def _draws(cfg, graphdef, params, epsilons, optimizers, learning_rate=0.1):
  """Every (model, random direction, input kind, loss) draw: dot of the first update with the
  teacher's displacement, per optimizer and eps; also the JVP first-order coefficient. One
  compiled program per loss, vmapped over draws and epsilons."""
  apply_fn = functools.partial(mlp.apply, graphdef)
  aux = jnp.arange(cfg.num_outputs) >= cfg.num_classes
  losses = {"kl_aux": functools.partial(imitation.kl_imitation, logit_mask=aux),
            "kl_all": imitation.kl_imitation,
            "mse_aux": functools.partial(imitation.squared_error_imitation, logit_mask=aux)}
  n = mlp.ensemble_size(params)
  thetas, directions, inputs = [], [], []
  for seed in range(2):
    key = jax.random.key(seed)
    leaves, treedef = jax.tree.flatten(params)
    direction = jax.tree.unflatten(treedef, [
        jax.random.normal(k, leaf.shape) for k, leaf in
        zip(jax.random.split(key, len(leaves)), leaves)])
    draws = {"uniform": jax.random.uniform(key, (n, 32, 16), minval=-1, maxval=1),
             "gaussian": jax.random.normal(key, (n, 32, 16)),
             "positive": jax.random.uniform(key, (n, 32, 16))}
    for x in draws.values():
      thetas.append(params)
      directions.append(direction)
      inputs.append(x)
  stack = lambda trees: jax.tree.map(lambda *a: jnp.concatenate(a), *trees)
  thetas, directions, inputs = stack(thetas), stack(directions), jnp.concatenate(inputs)
  out = {name: [] for name in optimizers}
  coefficients, ratios = [], []
  for loss in losses.values():
    def one(theta0, direction, x, eps, loss=loss):
      return alignment.one_step_alignments(apply_fn, loss, theta0, direction, eps, x, optimizers,
                                           learning_rate=learning_rate)
    fn = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, None, None, 0)), in_axes=(0, 0, 0, None)))
    result = fn(thetas, directions, inputs, jnp.asarray(epsilons, jnp.float32))
    first_order = jax.jit(jax.vmap(
        lambda t, d, x, loss=loss: alignment.first_order_alignment(apply_fn, loss, t, d, x)))
    coefficient = np.asarray(first_order(thetas, directions, inputs))
    for name in optimizers:
      out[name].append(np.asarray(result[name]["dot"]))
    coefficients.append(coefficient)
    ratios.append(np.asarray(result["sgd"]["dot_per_lr_eps"]) / coefficient[:, None])
  return ({k: np.concatenate(v) for k, v in out.items()}, np.concatenate(coefficients),
          np.concatenate(ratios))


def test_theorem_on_a_tiny_mlp(tiny_mlp):
  """Small eps: every plain-gradient draw has update . (theta_T - theta0) >= 0, and the update
  divided by lr*eps approaches the independently computed first-order coefficient."""
  cfg, graphdef, params = tiny_mlp
  epsilons = (1e-3, 1e-2, 3.0)
  optimizers = {"sgd": None, "adam": optax.adam(1e-3)}
  dots, coefficients, ratios = _draws(cfg, graphdef, params, epsilons, optimizers)
  assert dots["sgd"].shape == (6 * 2 * 3 * 3, 3)
  assert (coefficients >= 0).all() and np.median(coefficients) > 0
  assert alignment.share_nonnegative(dots["sgd"][:, 0]) == 1.0
  assert alignment.share_nonnegative(dots["sgd"][:, 1]) == 1.0
  np.testing.assert_allclose(np.median(ratios[:, 0]), 1.0, atol=0.01)
  # Far from the init the first-order term no longer rules: the ratio moves away from 1.
  assert abs(np.median(ratios[:, 2]) - 1.0) > 0.05
  # A wrong-signed update rule would fail the check (the test can fail).
  assert alignment.share_nonnegative(-dots["sgd"][:, 0]) == 0.0


def test_adam_first_step_is_a_sign_step(tiny_mlp):
  cfg, graphdef, params = tiny_mlp
  theta0 = mlp.take_models(params, 0)
  x = jax.random.uniform(jax.random.key(3), (32, 16), minval=-1, maxval=1)
  teacher = jax.tree.map(lambda p: p + 0.1, theta0)
  apply_fn = functools.partial(mlp.apply, graphdef)
  outputs = apply_fn(teacher, x)
  adam = alignment.one_step_update(apply_fn, imitation.kl_imitation, theta0, outputs, x,
                                   optimizer=optax.adam(1e-3, eps=1e-20))
  gd = alignment.one_step_update(apply_fn, imitation.kl_imitation, theta0, outputs, x,
                                 learning_rate=1.0)
  for a, g in zip(jax.tree.leaves(adam), jax.tree.leaves(gd)):
    nonzero = np.abs(np.asarray(g)) > 1e-12
    np.testing.assert_allclose(np.asarray(a)[nonzero], 1e-3 * np.sign(np.asarray(g))[nonzero],
                               rtol=1e-3)
