"""One optimisation step, jitted and sharded: the core every training loop here calls.

The model lives as NNX's functional triple: a static ``graphdef``, the ``trainable`` state (what
the optimizer updates: ``nnx.Param`` for full finetuning, ``nnx.LoRAParam`` for LoRA; LoRAParam is
a subclass of Param, so full finetuning of an adapted model trains the adapters too) and the
``frozen`` rest. :class:`TrainState` bundles them with the optimizer state, the step counter and an
rng.

The step is one ``jax.jit`` (:func:`jit_state_update`, which the ensembles of
:mod:`subliminal_jax.training.ensemble` share) whose in/out shardings are the state's layout, from
each variable's logical axes (``sharding.state_shardings``), as :func:`create_train_state` placed
it; the batch's leading axis goes over the data-parallel mesh axes. The mutable part of the state
is donated, the frozen part (a LoRA student's whole base model) is passed through untouched and
never copied.

Normalisation is exact: the objective returns a SUM of per-target losses and a target COUNT; the
step adds both over micro-batches (``lax.scan``) and, being a global computation under jit, over
devices and hosts, and divides once. So padding, micro-batching and sharding change nothing but
float rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from subliminal_jax import sharding
from subliminal_jax.training.losses import LossFn, next_token_loss

Batch = Mapping[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Everything a step reads and writes. ``rng`` is raw uint32 key data (checkpoint-friendly)."""

  step: jax.Array  # int32 [], updates applied so far
  trainable: nnx.State
  frozen: nnx.State
  opt_state: Any
  rng: jax.Array  # uint32 [2]: jax.random.key_data of the step rng


# ---------------------------------------------------------------------------------------------
# Placement helpers


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def place_array(value: Any, target: NamedSharding) -> jax.Array:
  """``value`` (a host or device array) laid out as ``target``, on every process."""
  if isinstance(value, jax.Array) and value.sharding == target:
    return value
  if target.is_fully_addressable or (isinstance(value, jax.Array) and not value.is_fully_addressable):
    return jax.device_put(value, target)
  # Several processes: every process holds the same host value and hands each of its devices
  # its own shard (jax.device_put cannot send a process-local array to other hosts' devices).
  return sharding.put_host_array(np.asarray(value), target)


def place_state(state: Any, mesh: Mesh) -> Any:
  """Puts every Variable of an NNX State (or optimizer state) on ``mesh`` by its logical axes."""
  def place(target, leaf):
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(place_array(leaf.get_value(), target))
    return place_array(leaf, target)
  # The shardings tree is a prefix of the state (one sharding per Variable), so it leads.
  return jax.tree.map(place, sharding.state_shardings(state, mesh), state)


def init_sharded(constructor: Callable[[], nnx.Module], mesh: Mesh | None = None) -> nnx.Module:
  """Builds ``constructor()`` directly into its shardings: shapes via ``nnx.eval_shape``, then a
  jitted init whose ``out_shardings`` come from the logical axes, so no device ever holds the
  whole model unsharded. Without a mesh, just ``constructor()``."""
  if mesh is None:
    return constructor()
  abstract = nnx.eval_shape(constructor)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = sharding.state_shardings(abstract_state, mesh)
  state = jax.jit(lambda: nnx.split(constructor())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def global_batch(batch: Batch, mesh: Mesh | None,
                 leading_axes: tuple[str, ...] = ("batch",)) -> dict[str, jax.Array]:
  """The global batch as jax Arrays sharded over the data-parallel axes.

  Numpy leaves are this PROCESS's rows: with several processes each passes its own slice and
  ``jax.make_array_from_process_local_data`` assembles the global array (one process: the whole
  batch). jax Arrays are taken as already global (and resharded if they are laid out otherwise).
  ``leading_axes``: the logical names of the leading dimensions (an ensemble's per-member batches
  are ``("ensemble", "batch")``).
  """
  def target(ndim: int) -> NamedSharding:
    names = leading_axes + (None,) * (ndim - len(leading_axes))
    return NamedSharding(mesh, sharding.logical_to_spec(names, mesh=mesh))

  out = {}
  for key, value in batch.items():
    if mesh is None:
      out[key] = value if isinstance(value, jax.Array) else jnp.asarray(value)
    elif isinstance(value, jax.Array):
      placed = target(value.ndim)
      out[key] = value if value.sharding == placed else jax.device_put(value, placed)
    else:
      value = np.asarray(value)
      out[key] = jax.make_array_from_process_local_data(target(value.ndim), value)
  return out


# ---------------------------------------------------------------------------------------------
# State


def _copy_arrays(state: Any) -> Any:
  # The step donates the trainable state; copy it so the caller's model keeps valid buffers.
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else jnp.asarray(x), state)


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                       trainable: Any = nnx.Param, seed: int = 0, mesh: Mesh | None = None
                       ) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` into (graphdef, TrainState). ``trainable`` is an NNX filter: ``nnx.Param``
  (full finetuning) or ``nnx.LoRAParam`` (adapters only). The model passed in is not modified and
  stays usable; read the trained model back with :func:`model_from_state`."""
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  if not jax.tree.leaves(params):
    hint = " (call lora.apply_lora first)" if trainable is nnx.LoRAParam else ""
    raise ValueError(f"the model has no variables matching trainable={trainable!r}{hint}")
  params = _copy_arrays(params)
  if mesh is not None:
    params = place_state(params, mesh)
    frozen = place_state(frozen, mesh)
    opt_shardings = sharding.state_shardings(jax.eval_shape(optimizer.init, params), mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    step = place_array(np.zeros((), np.int32), _replicated(mesh))
    rng = place_array(np.asarray(jax.random.key_data(jax.random.key(seed))), _replicated(mesh))
  else:
    opt_state = jax.jit(optimizer.init)(params)
    step = jnp.zeros((), jnp.int32)
    rng = jax.random.key_data(jax.random.key(seed))
  return graphdef, TrainState(step=step, trainable=params, frozen=frozen, opt_state=opt_state, rng=rng)


def model_from_state(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The model with the state's current parameters."""
  return nnx.merge(graphdef, state.trainable, state.frozen)


def train_state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """NamedShardings for every leaf of ``state`` (a prefix tree of it)."""
  replicated = _replicated(mesh)
  return TrainState(step=replicated, trainable=sharding.state_shardings(state.trainable, mesh),
                    frozen=sharding.state_shardings(state.frozen, mesh),
                    opt_state=sharding.state_shardings(state.opt_state, mesh), rng=replicated)


# ---------------------------------------------------------------------------------------------
# The step


def _micro_batches(batch: Batch, grad_accum_steps: int, mesh: Mesh | None) -> dict[str, jax.Array]:
  """[B, ...] -> [G, B/G, ...] taking rows i, i+G, ... into micro-batch i, so that every device's
  shard of the batch feeds every micro-batch (no resharding, all devices busy)."""
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // grad_accum_steps, grad_accum_steps) + x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      x = sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
    return x
  return {k: split(v) for k, v in batch.items()}


def train_step_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                  loss_fn: LossFn = next_token_loss, grad_accum_steps: int = 1,
                  schedule: optax.Schedule | None = None, mesh: Mesh | None = None,
                  mean_loss: bool = False
                  ) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict[str, jax.Array]]]:
  """The pure (un-jitted) step ``(state, batch, aux) -> (state, metrics)``: for jit, vmap (see
  training.ensemble) or scan. ``mesh`` only adds sharding constraints on intermediates.

  ``mean_loss``: the objective returns its batch's mean (and metrics), not sums: the step uses it
  as it is instead of dividing by the count. Only without micro-batches (a sum of means would
  weigh them wrongly).
  """
  if mean_loss and grad_accum_steps != 1:
    raise ValueError(f"mean_loss=True needs grad_accum_steps=1, got {grad_accum_steps}")

  def step_fn(state: TrainState, batch: Batch, aux: Any = None):
    params = state.trainable
    param_shardings = sharding.state_shardings(params, mesh) if mesh is not None else None
    rng = jax.random.wrap_key_data(state.rng)
    rng, step_rng = jax.random.split(rng)

    def loss_sum(p, micro, key):
      model = nnx.merge(graphdef, p, state.frozen)
      total, count, extra = loss_fn(model, micro, key, aux)
      return total.astype(jnp.float32), (count.astype(jnp.int32),
                                         jax.tree.map(lambda m: m.astype(jnp.float32), extra))

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    if grad_accum_steps == 1:
      (total, (count, extra)), grads = grad_fn(params, batch, step_rng)
      grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    else:
      micro = _micro_batches(batch, grad_accum_steps, mesh)
      first = jax.tree.map(lambda x: x[0], micro)
      extra_shape = jax.eval_shape(lambda: grad_fn(params, first, step_rng)[0][1][1])

      def accumulate(carry, xs):
        micro_batch, index = xs
        (t, (c, e)), g = grad_fn(params, micro_batch, jax.random.fold_in(step_rng, index))
        acc_t, acc_c, acc_e, acc_g = carry
        acc_g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)
        if param_shardings is not None:
          acc_g = jax.lax.with_sharding_constraint(acc_g, param_shardings)
        return (acc_t + t, acc_c + c, jax.tree.map(jnp.add, acc_e, e), acc_g), None

      zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      if param_shardings is not None:
        zeros_g = jax.lax.with_sharding_constraint(zeros_g, param_shardings)
      init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), extra_shape), zeros_g)
      (total, count, extra, grads), _ = jax.lax.scan(
          accumulate, init, (micro, jnp.arange(grad_accum_steps)))

    # One division of the global sums: every real target weighs the same.
    denominator = jnp.maximum(count, 1).astype(jnp.float32)
    normalize = (lambda x: x) if mean_loss else (lambda x: x / denominator)
    grads = jax.tree.map(lambda g, p: normalize(g).astype(p.dtype), grads, params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics = {"loss": normalize(total), "num_targets": count, "grad_norm": grad_norm,
               "update_norm": optax.global_norm(updates), "param_norm": optax.global_norm(new_params)}
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    for name, value in extra.items():
      metrics[name] = normalize(value)
    new_state = TrainState(step=state.step + 1, trainable=new_params, frozen=state.frozen,
                           opt_state=opt_state, rng=jax.random.key_data(rng))
    return new_state, metrics

  return step_fn


def check_batch(batch: Batch, grad_accum_steps: int, mesh: Mesh | None) -> int:
  """Raises a ValueError naming the problem when ``batch`` cannot be split as asked; returns the
  global batch size B (numpy leaves are one process's rows, as in :func:`global_batch`)."""
  if not batch:
    raise ValueError("the batch is empty (no arrays)")
  processes = jax.process_count() if mesh is not None else 1
  sizes = {k: (np.shape(v)[0] * (1 if isinstance(v, jax.Array) else processes)
               if np.ndim(v) else None) for k, v in batch.items()}
  if None in sizes.values() or len(set(sizes.values())) != 1:
    raise ValueError(f"every batch array needs the same leading (batch) size, got {sizes}")
  b = next(iter(sizes.values()))
  if b % grad_accum_steps:
    raise ValueError(f"global batch size {b} is not divisible by grad_accum_steps={grad_accum_steps}")
  if mesh is not None:
    dp = sharding.data_parallel_size(mesh)
    if (b // grad_accum_steps) % dp:
      raise ValueError(
          f"micro-batch size {b // grad_accum_steps} (global batch {b} / grad_accum_steps "
          f"{grad_accum_steps}) is not divisible by the data-parallel size {dp} "
          f"(mesh {dict(mesh.shape)}): each micro-batch must split evenly over the data and fsdp axes")
  return b


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    loss_fn: LossFn = next_token_loss, mesh: Mesh | None = None,
                    grad_accum_steps: int = 1, schedule: optax.Schedule | None = None
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """``step(state, batch, aux=None) -> (state, metrics)``, jitted (and sharded on ``mesh``).

  The input state's trainable, optimizer state, step and rng are donated (do not reuse them);
  its frozen state is passed through. ``batch`` leaves may be numpy (this process's rows) or global
  jax Arrays. ``schedule`` (the optimizer's learning-rate schedule) adds ``learning_rate`` to the
  metrics. Metrics are float32/int32 scalars: loss (mean over all targets of the global batch),
  num_targets, grad_norm (before clipping), update_norm, param_norm, and the objective's extras.
  """
  check_grad_accum_steps(grad_accum_steps)
  jitted = jit_state_update(
      train_step_fn(graphdef, optimizer, loss_fn=loss_fn, grad_accum_steps=grad_accum_steps,
                    schedule=schedule, mesh=mesh), mesh)

  def step(state: TrainState, batch: Batch, aux: Any = None):
    check_batch(batch, grad_accum_steps, mesh)
    return jitted(state, global_batch(batch, mesh), place_replicated(aux, mesh))

  return step


def check_grad_accum_steps(grad_accum_steps: Any) -> None:
  if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")


def place_replicated(tree: Any, mesh: Mesh | None) -> Any:
  """``tree`` (e.g. a step's aux: a teacher's parameters) with every leaf that is not already on
  ``mesh`` replicated over it; leaves already there keep their layout."""
  if mesh is None:
    return tree
  def place(x):
    on_mesh = isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
    return x if on_mesh else place_array(x, _replicated(mesh))
  return jax.tree.map(place, tree)


def conform(tree: Any, shardings: Any) -> Any:
  """``tree`` with every array laid out as ``shardings`` (a prefix tree, one sharding per
  Variable) says: jit refuses committed arguments sharded otherwise, e.g. a state restored from a
  checkpoint with another layout. Returns ``tree`` itself when everything already matches."""
  def value(leaf):
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
  pairs = []
  jax.tree.map(lambda s, leaf: pairs.append((s, value(leaf))), shardings, tree)
  if all(not isinstance(x, jax.Array) or x.sharding == s for s, x in pairs):
    return tree
  def fix(target, leaf):
    x = value(leaf)
    if isinstance(x, jax.Array) and x.sharding != target:
      x = jax.device_put(x, target)
    return leaf.replace(x) if isinstance(leaf, nnx.Variable) else x
  return jax.tree.map(fix, shardings, tree)


def jit_state_update(update: Callable[..., tuple[TrainState, Any]], mesh: Mesh | None, *,
                     state_shardings: Callable[[TrainState, Mesh], TrainState] | None = None
                     ) -> Callable[..., tuple[TrainState, Any]]:
  """``update(state, *args) -> (state, outputs)`` (a step, or an epoch of steps) as ONE jitted
  program that donates the state's buffers.

  What a step changes (trainable, optimizer state, step, rng) is donated; the frozen part (a LoRA
  student's whole base model) is passed through, never copied. On ``mesh`` the program is built at
  the first call with the state's layout, ``state_shardings(state, mesh)`` (default
  :func:`train_state_shardings`, the one :func:`create_train_state` placed it in), as its input
  and output shardings, so every call runs the same program and hands back the state in that
  layout; a state laid out otherwise (restored from elsewhere) is moved into it first. The other
  arguments keep their own layouts (the caller places them).
  """
  state_shardings = state_shardings or train_state_shardings
  def split_update(mutable, frozen, *args):
    step, trainable, opt_state, rng = mutable
    state = TrainState(step=step, trainable=trainable, frozen=frozen, opt_state=opt_state, rng=rng)
    new, outputs = update(state, *args)
    return (new.step, new.trainable, new.opt_state, new.rng), outputs

  if mesh is None:
    jitted = jax.jit(split_update, donate_argnums=0)
  program: dict[str, Any] = {}  # on a mesh: the jitted program and the layout it was built for

  def call(state: TrainState, *args):
    mutable, frozen = (state.step, state.trainable, state.opt_state, state.rng), state.frozen
    if mesh is None:
      (step, trainable, opt_state, rng), outputs = jitted(mutable, frozen, *args)
    else:
      if not program:
        s = state_shardings(state, mesh)
        layout = ((s.step, s.trainable, s.opt_state, s.rng), s.frozen)
        program.update(structure=jax.tree.structure(state), layout=layout, jitted=jax.jit(
            split_update, donate_argnums=0, in_shardings=layout + (None,) * len(args),
            out_shardings=(layout[0], None)))
      elif jax.tree.structure(state) != program["structure"]:
        raise ValueError("this step was built for a train state of another structure (other "
                         "parameters, optimizer or frozen part); make a step for this state")
      mutable, frozen = (conform(tree, shardings)
                         for tree, shardings in zip((mutable, frozen), program["layout"]))
      with jax.set_mesh(mesh):
        (step, trainable, opt_state, rng), outputs = program["jitted"](mutable, frozen, *args)
    return TrainState(step=step, trainable=trainable, frozen=frozen, opt_state=opt_state,
                      rng=rng), outputs

  return call
