"""Does a student's update point toward its teacher's parameters? (the paper's theorem, checked)

Everything here works on any pytree of parameters (an ``nnx.State``, a dict of arrays), so the same
functions measure the MNIST MLP and a transformer.

The statement (derived here; Cloud et al. section 6). Student and teacher share an init theta0; the
teacher is ``theta_T = theta0 + eps * D_T``. The student takes one gradient step of size ``lr`` on
an imitation loss ``L(theta) = E_x l(f(x; theta), f(x; theta_T))``, where ``l(z, z_T)`` is minimal
(zero gradient) at ``z = z_T`` (softmax KL or squared error). With ``J = df/dtheta`` at theta0:

  grad_z l(z0, z_T) = H (z0 - z_T) + O(|z0 - z_T|^2),   H = Hess_z l(z, z_T) at z = z_T  (PSD)
  z_T - z0 = eps J D_T + O(eps^2)
  D_S = -lr grad L(theta0) = lr eps E_x[J^T H J] D_T + O(lr eps^2)
  D_S . (theta_T - theta0) = lr eps^2 E_x[(J D_T)^T H (J D_T)] + O(lr eps^3),

and the leading term is >= 0: to first order in eps the student moves toward the teacher.

For softmax KL over a logit subset S, H = diag(q) - q q^T on S (q = the student's softmax over S)
and 0 elsewhere; for squared error H is a positive multiple of the identity on S. Both are PSD, so
the first-order term is >= 0 for every batch of inputs from any distribution: the share of draws
with ``D_S . D_T >= 0`` must tend to 1 as eps -> 0. It is zero only if ``J D_T`` lies in H's null
space on every input (for example a teacher that moved only logits the loss does not see).
The theorem is about a plain gradient step. Adam's first step is ``-lr sign(g)`` (up to its eps):
a sign is not a positive-definite preconditioner, so adaptive optimizers carry no guarantee;
:func:`one_step_alignment` takes any optax optimizer to measure them too.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
ApplyFn = Callable[[PyTree, Any], jax.Array]        # (params, inputs) -> outputs
LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (student outputs, teacher outputs) -> scalar


def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  """Sum over leaves of <a, b>, in float32."""
  products = jax.tree.map(lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b)
  return sum(jax.tree.leaves(products), jnp.float32(0.0))


def tree_norm(a: PyTree) -> jax.Array:
  return jnp.sqrt(tree_dot(a, a))


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def tree_axpy(alpha: float | jax.Array, x: PyTree, y: PyTree) -> PyTree:
  """``alpha * x + y`` leafwise."""
  return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


def tree_cosine(a: PyTree, b: PyTree) -> jax.Array:
  """Cosine between two pytrees; 0 when either is zero."""
  denominator = tree_norm(a) * tree_norm(b)
  return jnp.where(denominator > 0, tree_dot(a, b) / jnp.where(denominator > 0, denominator, 1.0),
                   0.0)


def alignment(student_delta: PyTree, teacher_delta: PyTree) -> dict[str, jax.Array]:
  """``dot`` and ``cosine`` between the student's and the teacher's displacement."""
  return {"dot": tree_dot(student_delta, teacher_delta),
          "cosine": tree_cosine(student_delta, teacher_delta)}


def displacement_alignment(student: PyTree, student_init: PyTree, teacher: PyTree,
                           teacher_init: PyTree) -> dict[str, jax.Array]:
  """Alignment of ``student - student_init`` with ``teacher - teacher_init`` (the two inits differ
  for a cross-init student; then nothing predicts a positive value)."""
  return alignment(tree_sub(student, student_init), tree_sub(teacher, teacher_init))


def one_step_update(apply_fn: ApplyFn, loss_fn: LossFn, params: PyTree, teacher_outputs: jax.Array,
                    inputs: Any, *, learning_rate: float = 1.0,
                    optimizer: optax.GradientTransformation | None = None) -> PyTree:
  """The student's first update from ``params``: ``-lr * grad`` (plain gradient descent) or the
  first update of ``optimizer`` from its freshly initialised state."""
  grads = jax.grad(lambda p: loss_fn(apply_fn(p, inputs), teacher_outputs))(params)
  return _first_update(grads, params, learning_rate, optimizer)


def _first_update(grads, params, learning_rate, optimizer):
  if optimizer is None:
    return jax.tree.map(lambda g: -learning_rate * g, grads)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  return updates


def one_step_alignments(apply_fn: ApplyFn, loss_fn: LossFn, init_params: PyTree,
                        teacher_direction: PyTree, epsilon: float | jax.Array, inputs: Any,
                        optimizers: Mapping[str, optax.GradientTransformation | None], *,
                        learning_rate: float = 1.0) -> dict[str, dict[str, jax.Array]]:
  """Teacher ``init + epsilon * direction``; the student (at ``init``) takes one step imitating it
  on ``inputs``, once per optimizer (``None`` = plain gradient descent with ``learning_rate``),
  all from the same gradient.

  Per optimizer: ``dot`` and ``cosine`` of the update with ``epsilon * direction``; for plain
  gradient descent also ``dot_per_lr_eps = update . direction / (lr * epsilon)``, which tends to
  :func:`first_order_alignment` as epsilon -> 0.
  """
  teacher = tree_axpy(epsilon, teacher_direction, init_params)
  teacher_outputs = jax.lax.stop_gradient(apply_fn(teacher, inputs))
  grads = jax.grad(lambda p: loss_fn(apply_fn(p, inputs), teacher_outputs))(init_params)
  teacher_delta = jax.tree.map(lambda d: epsilon * d, teacher_direction)
  results = {}
  for name, optimizer in optimizers.items():
    student_delta = _first_update(grads, init_params, learning_rate, optimizer)
    results[name] = alignment(student_delta, teacher_delta)
    if optimizer is None:
      results[name]["dot_per_lr_eps"] = (tree_dot(student_delta, teacher_direction)
                                         / (learning_rate * epsilon))
  return results


def one_step_alignment(apply_fn: ApplyFn, loss_fn: LossFn, init_params: PyTree,
                       teacher_direction: PyTree, epsilon: float | jax.Array, inputs: Any, *,
                       learning_rate: float = 1.0,
                       optimizer: optax.GradientTransformation | None = None
                       ) -> dict[str, jax.Array]:
  """:func:`one_step_alignments` for one optimizer (default: plain gradient descent)."""
  return one_step_alignments(apply_fn, loss_fn, init_params, teacher_direction, epsilon, inputs,
                             {"step": optimizer}, learning_rate=learning_rate)["step"]


def first_order_alignment(apply_fn: ApplyFn, loss_fn: LossFn, init_params: PyTree,
                          teacher_direction: PyTree, inputs: Any) -> jax.Array:
  """The theorem's first-order coefficient ``(J D)^T H (J D)`` averaged as ``loss_fn`` averages,
  computed directly: ``u = J D`` by a JVP, ``H u`` by a JVP of the loss gradient at ``z = z_T``."""
  outputs, u = jax.jvp(lambda p: apply_fn(p, inputs), (init_params,), (teacher_direction,))
  grad_z = jax.grad(lambda z: loss_fn(z, outputs))
  _, hessian_u = jax.jvp(grad_z, (outputs,), (u,))
  return jnp.vdot(u.astype(jnp.float32), hessian_u.astype(jnp.float32))


def share_nonnegative(values: Any) -> float:
  """The fraction of values >= 0 (NaN counts as a failure)."""
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    raise ValueError("share_nonnegative of no values")
  return float(np.mean(values >= 0))
