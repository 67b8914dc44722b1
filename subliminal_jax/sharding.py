"""Device mesh and logical-axis sharding rules.

Parameters and activations are annotated with logical axis names ("embed", "mlp", "batch", ...).
A rules table maps each logical name to a mesh axis (or a tuple of them, or None = replicated), as
in big_vision and jax-llm-examples. The mesh has three axes: ``data`` (pure data parallelism),
``fsdp`` (data parallelism with parameters sharded over it) and ``tensor`` (model parallelism).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
ENSEMBLE_AXIS = "ensemble"  # the leading axis of stacked models (training.ensemble)

# Logical axis -> mesh axes. Parameters shard their "embed" dimension over fsdp (ZeRO-3 style) and
# their head / mlp / vocab dimensions over tensor; activations shard batch over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("lora_rank", None),
    (ENSEMBLE_AXIS, None),
)

_active_rules: list[tuple[tuple[str, Any], ...]] = [DEFAULT_RULES]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (all by default); one size may be -1 (the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"mesh size {name}={size} must be a positive integer or -1 (the rest)")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh size may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh sizes data={data} fsdp={fsdp} tensor={tensor} do not divide the "
                       f"{len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh sizes data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} multiply to "
                     f"{math.prod(sizes)}, but there are {len(devices)} devices")
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Sequence[tuple[str, Any]] | None = None
                    ) -> PartitionSpec:
  """The PartitionSpec for logical axis names under ``rules``.

  A mesh axis is used at most once per array (first come); with ``shape`` and ``mesh`` given, a
  dimension whose size the mesh axes do not divide stays replicated rather than failing.
  """
  table = dict(rules if rules is not None else _active_rules[-1])
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    if shape is not None and mesh is not None and axes:
      if shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


@contextlib.contextmanager
def use_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Makes ``rules`` the logical-axis rules for code (and traces) inside the block."""
  _active_rules.append(tuple(rules))
  try:
    yield
  finally:
    _active_rules.pop()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(logical_axes, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def variable_spec(variable: nnx.Variable, mesh: Mesh) -> PartitionSpec:
  axes = variable.get_metadata().get("logical_axes")
  value = variable.get_value()
  if axes is None:
    return PartitionSpec()
  if len(axes) != value.ndim:
    raise ValueError(f"logical_axes {axes} do not match an array of shape {value.shape}")
  return logical_to_spec(axes, value.shape, mesh)


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings for every Variable of an NNX State (or module), from its ``logical_axes``."""
  return jax.tree.map(
      lambda v: NamedSharding(mesh, variable_spec(v, mesh)) if isinstance(v, nnx.Variable)
      else NamedSharding(mesh, PartitionSpec()),
      state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def add_leading_axis(state: Any, name: str) -> Any:
  """``state`` (an NNX State whose arrays have gained a leading axis, e.g. stacked models) with
  ``name`` prepended to every Variable's logical axes. A Variable that had none gets ``(name, None,
  ...)`` and remembers it, so that :func:`drop_leading_axis` gives back its original metadata."""
  def add(v):
    if not isinstance(v, nnx.Variable):
      return v
    axes = v.get_metadata().get("logical_axes")
    if axes is None:
      ndim = v.get_value().ndim
      return v.replace(v.get_value(), logical_axes=(name,) + (None,) * (ndim - 1),
                       leading_axis_added=True)
    return v.replace(v.get_value(), logical_axes=(name,) + tuple(axes))
  return jax.tree.map(add, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def drop_leading_axis(state: Any, take: Any) -> Any:
  """``state`` with every array replaced by ``take(array)`` (which removes the leading axis, e.g.
  ``lambda a: a[i]``) and that axis's name removed from the Variables' logical axes."""
  def drop(v):
    if not isinstance(v, nnx.Variable):
      return take(v)
    metadata = v.get_metadata()
    member = v.replace(take(v.get_value()), logical_axes=tuple(metadata["logical_axes"][1:]))
    if metadata.get("leading_axis_added"):
      member.del_metadata("logical_axes")
      member.del_metadata("leading_axis_added")
    return member
  return jax.tree.map(drop, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Places every Variable of ``module`` on ``mesh`` by its logical axes, in place."""
  graphdef, state = nnx.split(module)
  shardings = state_shardings(state, mesh)
  state = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_value()
                                                             if isinstance(s, nnx.Variable) else s)),
                       state, shardings, is_leaf=lambda v: isinstance(v, nnx.Variable))
  nnx.update(module, state)
  return module


def put_host_array(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places a host array by transferring each device only its own shard (no full on-device copy)."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(tree: Any) -> Any:
  """Device arrays -> numpy arrays holding the global value, on every process.

  With several processes a batch-sharded result has rows on other hosts, which ``device_get``
  cannot read; those are gathered (a collective: every process must call this at the same point).
  """
  from jax.experimental import multihost_utils

  def one(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


def data_parallel_size(mesh: Mesh | None) -> int:
  """How many ways the batch dimension is split on ``mesh`` under the active rules (1 without a
  mesh): every batch's row count must be a multiple of it."""
  if mesh is None:
    return 1
  spec = batch_sharding(mesh).spec[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[a] for a in axes)
