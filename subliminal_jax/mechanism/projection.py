"""Gradient-projection defense: train the student with the trait direction projected out.

Kitkana & Arora (arXiv 2604.25779) suppress transfer by removing the trait-aligned component of the
student's updates. :func:`project_out` is an optax ``GradientTransformation`` that maps each update
``u`` to ``u - sum_i <u, q_i> q_i`` for orthonormal directions ``q_i`` (the trait direction of
:mod:`subliminal_jax.mechanism.trait_direction`, or several). Placed LAST in an optax chain
(``optax.chain(optax.adamw(...), project_out(d))``) the applied step is orthogonal to ``d``, so the
trait ``T`` cannot move to first order in that step; placed first it only cleans the gradient and
an adaptive optimizer may rotate the result back toward ``d``.

The trait gradient changes as the student moves. With ``reestimate`` (a traceable function of the
parameters returning a new direction, e.g. ``jax.grad(trait_objective_fn(graphdef, rest, queries))``)
the direction is recomputed every ``every`` steps inside the update (``optax``'s ``params`` argument
must then be passed), at the cost of one trait-gradient evaluation per re-estimate.

``one_sided=True`` removes a component only when it points toward the trait (``<u, q> > 0``), so
movement away from the trait is left alone.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from subliminal_jax.mechanism import alignment

PyTree = Any


class ProjectionState(NamedTuple):
  directions: PyTree  # every leaf stacked over the k orthonormal directions: [k, *leaf.shape]
  count: jax.Array  # updates seen
  removed: jax.Array  # [k] the coefficient <u, q_i> removed at the last update (for logging)


def _orthonormal(directions: Sequence[PyTree], tolerance: float = 1e-4) -> list[PyTree]:
  """Gram-Schmidt in float32 over whole pytrees. A zero direction, or one whose part orthogonal to
  the earlier ones is below ``tolerance`` of its norm, is an error (eager) or gives a zero direction
  (traced: the norm is guarded, so nothing is removed along it)."""
  basis = []
  for i, d in enumerate(directions):
    v = jax.tree.map(lambda x: x.astype(jnp.float32), d)
    original = alignment.tree_norm(v)
    for q in basis:
      v = alignment.tree_axpy(-alignment.tree_dot(v, q), q, v)
    norm = alignment.tree_norm(v)
    if not isinstance(norm, jax.core.Tracer) and float(norm) <= tolerance * float(original):
      raise ValueError(f"direction {i} is zero or a combination of the earlier ones (norm "
                       f"{float(norm):.3g} of {float(original):.3g} left)")
    v = jax.tree.map(lambda x: x / jnp.maximum(norm, 1e-30), v)
    basis.append(v)
  return basis


def _stack(basis: Sequence[PyTree]) -> PyTree:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *basis)


def project_onto_complement(updates: PyTree, stacked: PyTree, one_sided: bool = False
                            ) -> tuple[PyTree, jax.Array]:
  """``u - sum_i c_i q_i`` with ``c_i = <u, q_i>`` (clipped at 0 when ``one_sided``); returns the
  projected updates and ``c``. The ``q_i`` must be orthonormal (stacked on a leading axis)."""
  def coefficient_terms(u, q):
    return jnp.einsum("k...,...->k", q, u.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  coeffs = sum(jax.tree.leaves(jax.tree.map(coefficient_terms, updates, stacked)))
  if one_sided:
    coeffs = jnp.maximum(coeffs, 0.0)
  projected = jax.tree.map(
      lambda u, q: (u.astype(jnp.float32) - jnp.einsum("k,k...->...", coeffs, q,
                                                       precision=jax.lax.Precision.HIGHEST)
                    ).astype(u.dtype), updates, stacked)
  return projected, coeffs


def project_out(directions: PyTree | Sequence[PyTree], *,
                reestimate: Callable[[PyTree], PyTree] | None = None, every: int = 1,
                one_sided: bool = False) -> optax.GradientTransformation:
  """Removes the components of each update along ``directions`` (one pytree shaped like the
  updates, or a list of them; orthonormalised here).

  ``reestimate(params) -> direction`` (one direction) replaces the direction at steps 0, every,
  2 * every, ... before projecting; it needs ``params`` in ``update``.
  """
  if isinstance(directions, (list, tuple)):
    directions = list(directions)
  else:
    directions = [directions]
  if not directions:
    raise ValueError("project_out needs at least one direction")
  if reestimate is not None and len(directions) != 1:
    raise ValueError(f"reestimate replaces one direction, but {len(directions)} were given")
  if every < 1:
    raise ValueError(f"every must be >= 1, got {every}")
  initial = _stack(_orthonormal(directions))

  def init_fn(params):
    structure, direction_structure = jax.tree.structure(params), jax.tree.structure(directions[0])
    if structure != direction_structure:
      raise ValueError("the direction is not shaped like the parameters:\n  parameters: "
                       f"{structure}\n  direction:  {direction_structure}")
    return ProjectionState(initial, jnp.zeros((), jnp.int32), jnp.zeros((len(directions),), jnp.float32))

  def update_fn(updates, state, params=None):
    stacked = state.directions
    if reestimate is not None:
      if params is None:
        raise ValueError("project_out(reestimate=...) needs the params argument in update()")
      def fresh(_):
        return _stack(_orthonormal([reestimate(params)]))
      stacked = jax.lax.cond(state.count % every == 0, fresh, lambda s: s, stacked)
    projected, coeffs = project_onto_complement(updates, stacked, one_sided)
    return projected, ProjectionState(stacked, state.count + 1, coeffs)

  return optax.GradientTransformation(init_fn, update_fn)
