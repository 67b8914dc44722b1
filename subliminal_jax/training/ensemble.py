"""Ensembles: K models of one architecture trained together, a step or a whole epoch per program.

The K train states are stacked on a leading ``ensemble`` axis (named in every variable's
``logical_axes``, so ``sharding.state_shardings`` places them: :func:`ensemble_rules` splits the
members over the devices, or the batch) and the one train step of
:mod:`subliminal_jax.training.train_step` runs under ``jax.vmap``. Nothing here knows about
language models: any ``nnx.Module`` and any objective ``loss_fn(model, batch, rng, aux)`` work, from
LoRA students of one base model to the small MLPs of the MNIST experiment.

Two drivers share that step and its jit (``train_step.jit_state_update``):

* :func:`make_ensemble_step`: one step per call on a batch from the host, seen by every member
  (``shared_batch=True``) or one per member (``[K, B, ...]``).
* :func:`make_ensemble_epoch`: a whole epoch per call, a ``lax.scan`` over steps whose batches are
  built inside the program from the epoch's inputs (example indices into arrays already on the
  device, noise keys), so hundreds of small models train without a round trip per step.

Members may share their frozen state (``share_frozen=True``: LoRA students on one base model keep a
single unstacked copy of it).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from subliminal_jax import sharding
from subliminal_jax.training import train_step as train_step_lib
from subliminal_jax.training.losses import LossFn, next_token_loss
from subliminal_jax.training.train_step import TrainState

ENSEMBLE_AXIS = sharding.ENSEMBLE_AXIS

# (context, inputs of one step) -> that step's batch, built inside the epoch's program.
MakeBatch = Callable[[Any, Any], Mapping[str, jax.Array]]


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def stack_states(states: Sequence[Any]) -> Any:
  """Stacks same-structured NNX States on a new leading axis named ``ensemble`` in the metadata."""
  def stack(*leaves):
    if _is_variable(leaves[0]):
      return leaves[0].replace(jnp.stack([v.get_value() for v in leaves]))
    return jnp.stack([jnp.asarray(x) for x in leaves])
  stacked = jax.tree.map(stack, *states, is_leaf=_is_variable)
  return sharding.add_leading_axis(stacked, ENSEMBLE_AXIS)


def unstack_state(state: Any, index: int) -> Any:
  """Member ``index`` of a stacked State, with the ``ensemble`` axis gone from its metadata."""
  return sharding.drop_leading_axis(state, lambda a: a[index])


def _is_stacked(state: Any) -> bool:
  variables = [v for v in jax.tree.leaves(state, is_leaf=_is_variable) if _is_variable(v)]
  return bool(variables) and (variables[0].get_metadata().get("logical_axes") or (None,))[0] == ENSEMBLE_AXIS


def ensemble_size(state: TrainState) -> int:
  return int(state.step.shape[0])


def ensemble_rules(num_members: int, batch_size: int, mesh: Mesh
                   ) -> tuple[tuple[str, Any], ...]:
  """Sharding rules for ``num_members`` models trained on batches of ``batch_size`` on ``mesh``.

  The members go over the data-parallel devices when their number divides the device count (each
  device trains whole models: no communication); otherwise the batch does when its size divides
  it (data parallel, gradients reduced by XLA); otherwise everything is replicated.
  """
  rules = dict(sharding.DEFAULT_RULES)
  devices = sharding.data_parallel_size(mesh)
  if devices > 1 and num_members % devices == 0:
    rules.update({ENSEMBLE_AXIS: rules["batch"], "batch": None})
  elif devices == 1 or batch_size % devices:
    rules.update({"batch": None})
  return tuple(rules.items())


def ensemble_state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """:func:`train_step.train_state_shardings` of a stacked state: the members' arrays that have no
  logical axes (step, rng, the optimizer's counters, all ``[K, ...]``) follow the ensemble axis
  too, so each member's whole state lives where its parameters do."""
  def members(tree):
    def one(x):
      if isinstance(x, nnx.Variable):
        return NamedSharding(mesh, sharding.variable_spec(x, mesh))
      names = (ENSEMBLE_AXIS,) + (None,) * (len(x.shape) - 1) if x.shape else ()
      return NamedSharding(mesh, sharding.logical_to_spec(names, x.shape, mesh))
    return jax.tree.map(one, tree, is_leaf=_is_variable)
  return TrainState(step=members(state.step), trainable=members(state.trainable),
                    frozen=sharding.state_shardings(state.frozen, mesh),
                    opt_state=members(state.opt_state), rng=members(state.rng))


def stacked_train_state(trainable: nnx.State, optimizer: optax.GradientTransformation, *,
                        frozen: nnx.State | None = None, seeds: Sequence[int] | None = None,
                        mesh: Mesh | None = None) -> TrainState:
  """The TrainState of an ensemble from its trainable state already stacked on a leading
  ``ensemble`` axis (:func:`stack_states`, or ``models.mlp.init_ensemble``).

  ``frozen``: stacked too, or one copy shared by every member (default: nothing frozen). ``seeds``
  seed each member's step rng (default 0..K-1). On ``mesh`` everything is placed by its logical
  axes under the active sharding rules. The arrays passed in are copied, not donated.
  """
  frozen = nnx.State({}) if frozen is None else frozen
  num = jax.tree.leaves(trainable)[0].shape[0]
  seeds = list(range(num)) if seeds is None else list(seeds)
  if len(seeds) != num:
    raise ValueError(f"got {len(seeds)} seeds for {num} members")
  trainable = jax.tree.map(jnp.copy, trainable)
  rng = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
  step = jnp.zeros((num,), jnp.int32)
  init = jax.vmap(optimizer.init)
  if mesh is None:
    return TrainState(step=step, trainable=trainable, frozen=frozen,
                      opt_state=jax.jit(init)(trainable), rng=rng)
  abstract = TrainState(step=step, trainable=trainable, frozen=frozen,
                        opt_state=jax.eval_shape(init, trainable), rng=rng)
  shardings = ensemble_state_shardings(abstract, mesh)
  trainable = train_step_lib.place_state(trainable, mesh)
  return TrainState(step=train_step_lib.place_array(step, shardings.step), trainable=trainable,
                    frozen=train_step_lib.place_state(frozen, mesh),
                    opt_state=jax.jit(init, out_shardings=shardings.opt_state)(trainable),
                    rng=train_step_lib.place_array(rng, shardings.rng))


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
  if seeds is not None and len(seeds) != len(models):
    raise ValueError(f"got {len(seeds)} seeds for {len(models)} models")
  graphdefs, trainables, frozens = zip(*(nnx.split(m, trainable, ...) for m in models))
  for i, g in enumerate(graphdefs[1:], 1):
    if g != graphdefs[0]:
      raise ValueError(f"model {i} has a different structure than model 0; an ensemble needs one "
                       "architecture (and the same LoRA targets/rank)")
  if not jax.tree.leaves(trainables[0]):
    raise ValueError(f"the models have no variables matching trainable={trainable!r}")
  if share_frozen:
    for i, f in enumerate(frozens[1:], 1):
      same = jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), frozens[0], f))
      if not same:
        raise ValueError(f"share_frozen=True but model {i}'s frozen state differs from model 0's")
    frozen = frozens[0]
  else:
    frozen = stack_states(frozens)
  return graphdefs[0], stacked_train_state(stack_states(trainables), optimizer, frozen=frozen,
                                           seeds=seeds, mesh=mesh)


def model_from_ensemble(graphdef: nnx.GraphDef, state: TrainState, index: int) -> nnx.Module:
  """Member ``index`` as a plain model."""
  frozen = unstack_state(state.frozen, index) if _is_stacked(state.frozen) else state.frozen
  return nnx.merge(graphdef, unstack_state(state.trainable, index), frozen)


def ensemble_step_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                     loss_fn: LossFn = next_token_loss, grad_accum_steps: int = 1,
                     schedule: optax.Schedule | None = None, batch_axes: Any = None,
                     mean_loss: bool = False
                     ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """The pure (un-jitted) ensemble step ``(state, batch, aux=None) -> (state, metrics [K])``: every
  member takes one step of :func:`train_step.train_step_fn` under ``jax.vmap``.

  ``batch_axes``: the batch's ``vmap`` axes, ``None`` (every member sees the whole batch), ``0``
  (``[K, B, ...]``, one batch per member) or a dict of those per batch key. ``aux`` is shared.
  ``mean_loss`` as in :func:`train_step.train_step_fn`.
  """
  # The inner step gets no mesh: its intermediate constraints are written for unstacked states;
  # shardings come from the stacked state and propagate.
  step_fn = train_step_lib.train_step_fn(graphdef, optimizer, loss_fn=loss_fn,
                                         grad_accum_steps=grad_accum_steps, schedule=schedule,
                                         mean_loss=mean_loss)

  def ensemble_step(state: TrainState, batch: Any, aux: Any = None):
    def member_step(mutable, frozen, member_batch):
      step, trainable, opt_state, rng = mutable
      new, metrics = step_fn(TrainState(step=step, trainable=trainable, frozen=frozen,
                                        opt_state=opt_state, rng=rng), member_batch, aux)
      return (new.step, new.trainable, new.opt_state, new.rng), metrics

    frozen_axis = 0 if _is_stacked(state.frozen) else None
    (step, trainable, opt_state, rng), metrics = jax.vmap(
        member_step, in_axes=(0, frozen_axis, batch_axes))(
            (state.step, state.trainable, state.opt_state, state.rng), state.frozen, batch)
    return TrainState(step=step, trainable=trainable, frozen=state.frozen, opt_state=opt_state,
                      rng=rng), metrics

  return ensemble_step


def _rules_context(rules: Sequence[tuple[str, Any]] | None):
  return sharding.use_rules(rules) if rules is not None else contextlib.nullcontext()


def make_ensemble_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                       loss_fn: LossFn = next_token_loss, mesh: Mesh | None = None,
                       grad_accum_steps: int = 1, schedule: optax.Schedule | None = None,
                       shared_batch: bool = True, rules: Sequence[tuple[str, Any]] | None = None
                       ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """``step(state, batch, aux=None) -> (state, metrics)`` for a stacked state: every member takes
  one step in one vmapped, jitted program; metrics are [K].

  ``batch`` leaves are [B, ...] seen by all members (``shared_batch``) or [K, B, ...]; ``aux`` is
  shared. The mutable state is donated as in the single-model step. ``rules``: the sharding rules
  the state was placed under (default: the active ones).
  """
  train_step_lib.check_grad_accum_steps(grad_accum_steps)
  jitted = train_step_lib.jit_state_update(
      ensemble_step_fn(graphdef, optimizer, loss_fn=loss_fn, grad_accum_steps=grad_accum_steps,
                       schedule=schedule, batch_axes=None if shared_batch else 0), mesh,
      state_shardings=ensemble_state_shardings)
  leading_axes = ("batch",) if shared_batch else (ENSEMBLE_AXIS, "batch")

  def step(state: TrainState, batch, aux: Any = None):
    k = ensemble_size(state)
    if not shared_batch:
      bad = {name: np.shape(v) for name, v in batch.items() if not np.ndim(v) or np.shape(v)[0] != k}
      if bad:
        raise ValueError(f"shared_batch=False needs batch arrays shaped [K={k}, B, ...], got {bad}")
    members = batch if shared_batch else {name: v[0] for name, v in batch.items()}
    train_step_lib.check_batch(members, grad_accum_steps, mesh)
    with _rules_context(rules):
      return jitted(state, train_step_lib.global_batch(batch, mesh, leading_axes),
                    train_step_lib.place_replicated(aux, mesh))

  return step


def make_ensemble_epoch(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                        loss_fn: LossFn, epoch_inputs: Callable[[Any], Any], make_batch: MakeBatch,
                        batch_axes: Any = None, record: Callable[[TrainState, Any, Any], Any] | None
                        = None, mean_loss: bool = False,
                        metrics: Sequence[str] | None = None, mesh: Mesh | None = None,
                        rules: Sequence[tuple[str, Any]] | None = None
                        ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array], Any]]:
  """``epoch(state, context) -> (state, metrics [steps, K], records [steps, ...])``: one epoch of
  ensemble steps (:func:`ensemble_step_fn`) as one jitted ``lax.scan``.

  ``epoch_inputs(context)`` gives the epoch's per-step inputs (a pytree with a leading steps axis,
  e.g. shuffled example indices); step t trains on ``make_batch(context, inputs[t])`` (whose
  ``vmap`` axes are ``batch_axes``), then ``record(state, context, inputs[t])``, if given, measures
  the new state. Everything runs inside the program; ``context`` (arrays, parameters of other
  models) is placed by the caller. ``metrics``: the names of the step's metrics to return (default
  all; XLA then drops the work of the others, e.g. the norms). The state is donated; ``mean_loss``
  as in :func:`train_step.train_step_fn`, ``rules`` as in :func:`make_ensemble_step`.
  """
  step_fn = ensemble_step_fn(graphdef, optimizer, loss_fn=loss_fn, batch_axes=batch_axes,
                             mean_loss=mean_loss)

  def epoch(state: TrainState, context: Any):
    def body(state, inputs):
      state, step_metrics = step_fn(state, make_batch(context, inputs))
      if metrics is not None:
        step_metrics = {name: step_metrics[name] for name in metrics}
      return state, (step_metrics, None if record is None else record(state, context, inputs))
    return jax.lax.scan(body, state, epoch_inputs(context))

  jitted = train_step_lib.jit_state_update(epoch, mesh, state_shardings=ensemble_state_shardings)

  def run(state: TrainState, context: Any):
    with _rules_context(rules):
      state, (metrics, records) = jitted(state, context)
    return state, metrics, records

  return run
