"""A model seen as a function of a chosen subset of its parameters (all weights, or LoRA adapters).

The mechanism tools differentiate scalars (a trait log-probability, a token's loss) with respect to
the parameters a student trains: every ``nnx.Param`` for full finetuning, or only the
``nnx.LoRAParam`` adapters after :func:`subliminal_jax.lora.apply_lora`. ``split_params`` cuts the
model into a static graph, the differentiated state and the rest; ``merge_params`` puts a (possibly
displaced) state back. The state is an ``nnx.State`` pytree, so ``jax.grad``, ``jax.jvp``, optax
and :mod:`subliminal_jax.mechanism.alignment`'s tree algebra apply to it unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

ParamFilter = Any  # an nnx filter: nnx.Param, nnx.LoRAParam, a path predicate, ...


def split_params(model: nnx.Module, wrt: ParamFilter = nnx.Param
                 ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """``(graphdef, params, rest)``: ``params`` are the variables ``wrt`` selects.

  ``wrt=nnx.LoRAParam`` selects only the adapters (``nnx.LoRAParam`` subclasses ``nnx.Param``, so
  ``wrt=nnx.Param`` on an adapted model selects the base weights AND the adapters).
  """
  graphdef, params, rest = nnx.split(model, wrt, ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"the filter {wrt!r} selects no parameters of {type(model).__name__}; for LoRA "
                     "call subliminal_jax.lora.apply_lora first, for full finetuning use nnx.Param")
  return graphdef, params, rest


def merge_params(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State) -> nnx.Module:
  """The model with ``params`` in place of the selected variables (a new module; no mutation)."""
  return nnx.merge(graphdef, params, rest)


def num_parameters(params: nnx.State) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def random_direction(params: nnx.State, seed: int, *, unit_norm: bool = True) -> nnx.State:
  """A Gaussian direction shaped like ``params`` (float32), of global norm 1 by default."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noise = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  if unit_norm:
    norm = jnp.sqrt(sum(jnp.sum(n * n) for n in noise))
    noise = [n / norm for n in noise]
  return jax.tree.unflatten(treedef, noise)


def displaced(params: nnx.State, direction: nnx.State, epsilon: float | jax.Array) -> nnx.State:
  """``params + epsilon * direction``, keeping each leaf's dtype."""
  return jax.tree.map(lambda p, d: (p.astype(jnp.float32) + epsilon * d.astype(jnp.float32)
                                    ).astype(p.dtype), params, direction)
