"""Ensembles: K models of one architecture (different seeds) trained together in one jitted step.

The K train states are stacked on a leading ``ensemble`` axis (added to every variable's
``logical_axes``, so ``sharding.state_shardings`` places them; DEFAULT_RULES replicate it, a rule
``("ensemble", "data")`` spreads the members over devices) and the plain train step of
:mod:`subliminal_jax.training.train_step` runs under ``jax.vmap``. Nothing here knows about
language models: any ``nnx.Module`` and any objective ``loss_fn(model, batch, rng, aux)`` work, from
LoRA students of one base model to the small MLPs of the MNIST experiment.

Members may share their frozen state (``share_frozen=True``: LoRA students on one base model keep a
single unstacked copy of it) and may all see one batch (``shared_batch=True``) or each its own
(``[K, B, ...]``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from subliminal_jax import sharding
from subliminal_jax.training import train_step as train_step_lib
from subliminal_jax.training.losses import LossFn, next_token_loss
from subliminal_jax.training.train_step import TrainState

ENSEMBLE_AXIS = "ensemble"


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def stack_states(states: Sequence[Any]) -> Any:
  """Stacks same-structured NNX States on a new leading axis named ``ensemble`` in the metadata."""
  def stack(*leaves):
    if _is_variable(leaves[0]):
      value = jnp.stack([v.get_value() for v in leaves])
      axes = leaves[0].get_metadata().get("logical_axes")
      if axes is None:  # remembered so that unstack_state gives back the original metadata
        return leaves[0].replace(value, logical_axes=(ENSEMBLE_AXIS,) + (None,) * (value.ndim - 1),
                                 ensemble_added_axes=True)
      return leaves[0].replace(value, logical_axes=(ENSEMBLE_AXIS,) + tuple(axes))
    return jnp.stack([jnp.asarray(x) for x in leaves])
  return jax.tree.map(stack, *states, is_leaf=_is_variable)


def unstack_state(state: Any, index: int) -> Any:
  """Member ``index`` of a stacked State, with the ``ensemble`` axis gone from its metadata."""
  def take(x):
    if _is_variable(x):
      metadata = x.get_metadata()
      member = x.replace(x.get_value()[index], logical_axes=tuple(metadata["logical_axes"][1:]))
      if metadata.get("ensemble_added_axes"):
        member.del_metadata("logical_axes")
        member.del_metadata("ensemble_added_axes")
      return member
    return x[index]
  return jax.tree.map(take, state, is_leaf=_is_variable)


def _is_stacked(state: Any) -> bool:
  variables = [v for v in jax.tree.leaves(state, is_leaf=_is_variable) if _is_variable(v)]
  return bool(variables) and (variables[0].get_metadata().get("logical_axes") or (None,))[0] == ENSEMBLE_AXIS


def ensemble_size(state: TrainState) -> int:
  return int(state.step.shape[0])


def create_ensemble_state(models: Sequence[nnx.Module], optimizer: optax.GradientTransformation, *,
                          trainable: Any = nnx.Param, seeds: Sequence[int] | None = None,
                          mesh: Mesh | None = None, share_frozen: bool = False
                          ) -> tuple[nnx.GraphDef, TrainState]:
  """One stacked TrainState for ``models`` (same architecture; typically different init seeds).

  ``seeds`` seed each member's step rng (default 0..K-1). ``share_frozen`` keeps one copy of the
  frozen state, which must then be identical across members (e.g. LoRA students of one base).
  """
  if len(models) < 1:
    raise ValueError("an ensemble needs at least one model")
  seeds = list(range(len(models))) if seeds is None else list(seeds)
  if len(seeds) != len(models):
    raise ValueError(f"got {len(seeds)} seeds for {len(models)} models")
  graphdefs, trainables, frozens = zip(*(nnx.split(m, trainable, ...) for m in models))
  for i, g in enumerate(graphdefs[1:], 1):
    if g != graphdefs[0]:
      raise ValueError(f"model {i} has a different structure than model 0; an ensemble needs one "
                       "architecture (and the same LoRA targets/rank)")
  if not jax.tree.leaves(trainables[0]):
    raise ValueError(f"the models have no variables matching trainable={trainable!r}")
  params = stack_states(trainables)
  if share_frozen:
    for i, f in enumerate(frozens[1:], 1):
      same = jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), frozens[0], f))
      if not same:
        raise ValueError(f"share_frozen=True but model {i}'s frozen state differs from model 0's")
    frozen = frozens[0]
  else:
    frozen = stack_states(frozens)
  rng = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
  step = jnp.zeros((len(models),), jnp.int32)
  init = jax.vmap(optimizer.init)
  if mesh is not None:
    params = train_step_lib.place_state(params, mesh)
    frozen = train_step_lib.place_state(frozen, mesh)
    opt_shardings = sharding.state_shardings(jax.eval_shape(init, params), mesh)
    opt_state = jax.jit(init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    step, rng = jax.device_put(step, replicated), jax.device_put(rng, replicated)
  else:
    opt_state = jax.jit(init)(params)
  return graphdefs[0], TrainState(step=step, trainable=params, frozen=frozen, opt_state=opt_state,
                                  rng=rng)


def model_from_ensemble(graphdef: nnx.GraphDef, state: TrainState, index: int) -> nnx.Module:
  """Member ``index`` as a plain model."""
  frozen = unstack_state(state.frozen, index) if _is_stacked(state.frozen) else state.frozen
  return nnx.merge(graphdef, unstack_state(state.trainable, index), frozen)


def make_ensemble_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                       loss_fn: LossFn = next_token_loss, mesh: Mesh | None = None,
                       grad_accum_steps: int = 1, schedule: optax.Schedule | None = None,
                       shared_batch: bool = True
                       ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """``step(state, batch, aux=None) -> (state, metrics)`` for a stacked state: every member takes
  one step of :func:`train_step.train_step_fn` in one vmapped, jitted program; metrics are [K].

  ``batch`` leaves are [B, ...] seen by all members (``shared_batch``) or [K, B, ...]; ``aux`` is
  shared. The mutable state is donated as in the single-model step.
  """
  if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")
  # The inner step gets no mesh: its intermediate constraints are written for unstacked states;
  # shardings come from the jit boundary and propagate.
  step_fn = train_step_lib.train_step_fn(graphdef, optimizer, loss_fn=loss_fn,
                                         grad_accum_steps=grad_accum_steps, schedule=schedule)
  batch_axis = None if shared_batch else 0
  compiled: dict[Any, Callable] = {}

  def split_step(mutable, frozen, batch, aux):
    step, trainable, opt_state, rng = mutable
    frozen_axis = 0 if _is_stacked(frozen) else None

    def one(step, trainable, opt_state, rng, frozen, batch):
      state = TrainState(step=step, trainable=trainable, frozen=frozen, opt_state=opt_state, rng=rng)
      new, metrics = step_fn(state, batch, aux)
      return (new.step, new.trainable, new.opt_state, new.rng), metrics

    return jax.vmap(one, in_axes=(0, 0, 0, 0, frozen_axis, batch_axis))(
        step, trainable, opt_state, rng, frozen, batch)

  def batch_shardings(batch):
    lead = () if shared_batch else (ENSEMBLE_AXIS,)
    return {k: NamedSharding(mesh, sharding.logical_to_spec(
        lead + ("batch",) + (None,) * (np.ndim(v) - 1 - len(lead)), mesh=mesh))
        for k, v in batch.items()}

  def jitted_for(state, batch, aux):
    key = (jax.tree.structure(state), jax.tree.structure(aux), tuple(sorted(batch)),
           tuple(np.ndim(v) for _, v in sorted(batch.items())))
    if key not in compiled:
      if mesh is None:
        compiled[key] = jax.jit(split_step, donate_argnums=0), None
      else:
        s = train_step_lib.train_state_shardings(state, mesh)
        mutable = (s.step, s.trainable, s.opt_state, s.rng)
        expected = (mutable, s.frozen, batch_shardings(batch))
        compiled[key] = jax.jit(
            split_step, donate_argnums=0,
            in_shardings=expected + (train_step_lib.aux_shardings(aux, mesh),),
            out_shardings=(mutable, NamedSharding(mesh, PartitionSpec()))), expected
    return compiled[key]

  def step(state: TrainState, batch, aux: Any = None):
    k = ensemble_size(state)
    if not shared_batch:
      bad = {name: np.shape(v) for name, v in batch.items() if not np.ndim(v) or np.shape(v)[0] != k}
      if bad:
        raise ValueError(f"shared_batch=False needs batch arrays shaped [K={k}, B, ...], got {bad}")
      members = {name: v[0] for name, v in batch.items()}
    else:
      members = batch
    train_step_lib.check_batch(members, grad_accum_steps, mesh)
    if mesh is None:
      batch = {name: jnp.asarray(v) for name, v in batch.items()}
    fn, expected = jitted_for(state, batch, aux)
    mutable, frozen = (state.step, state.trainable, state.opt_state, state.rng), state.frozen
    if expected is not None:  # jit refuses committed arrays laid out otherwise: reshard them
      mutable, frozen, batch = (train_step_lib.conform(tree, shardings) for tree, shardings
                                in zip((mutable, frozen, dict(batch)), expected))
    (step_, trainable, opt_state, rng), metrics = fn(mutable, frozen, batch, aux)
    return TrainState(step=step_, trainable=trainable, frozen=frozen, opt_state=opt_state,
                      rng=rng), metrics

  return step
