"""Training checkpoints with orbax: the train state, the data position and the rng, resumable exactly.

:class:`TrainCheckpointer` wraps ``orbax.checkpoint.CheckpointManager`` (async saves, keep the last
N, save every k steps, restore the latest). What one checkpoint holds:

* ``state``: every array leaf of the train state (params, optimizer state, step, rng), saved as a
  flat ``{"000000": leaf, ...}`` dict in the order ``jax.tree_util`` flattens the state. A flat
  dict keeps orbax away from custom pytree nodes (nnx.State, optax named tuples, dataclasses):
  the live state's own tree structure is used to rebuild it, and the leaf paths saved alongside
  are checked against it, so a changed model or optimizer is a clear error, not a silent mix-up.
  Typed PRNG keys are saved as their raw key data; numpy and Python scalars as 0-d arrays (orbax
  rejects numpy scalars).
* ``meta`` (JSON): the data position (epoch and step within the epoch of the next batch), the leaf
  paths and whatever else the caller adds.

Restoring takes the live state (or its abstract ``jax.ShapeDtypeStruct`` version) as the target:
each array comes back with the target leaf's sharding (orbax ``StandardRestore`` with an abstract
target carrying shardings), so FSDP/tensor-sharded states restore straight into place.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

_KEY_DATA = "key_data"
_ARRAY = "array"
_HOST = "host"


def _leaf_kind(leaf: Any) -> str:
  if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return _KEY_DATA
    return _ARRAY
  return _HOST


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [jax.tree_util.keystr(path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def _to_saveable(leaf: Any) -> Any:
  kind = _leaf_kind(leaf)
  if kind == _KEY_DATA:
    return jax.random.key_data(leaf)
  if kind == _ARRAY:
    return leaf
  return np.asarray(leaf)  # numpy/Python scalars -> 0-d arrays


def _abstract(leaf: Any) -> Any:
  """The restore target of one live (or abstract) leaf: shape, dtype and sharding."""
  kind = _leaf_kind(leaf)
  if kind == _KEY_DATA:
    data = jax.eval_shape(jax.random.key_data, leaf)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      spec = tuple(sharding.spec) + (None,) * (len(data.shape) - len(sharding.spec))
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    elif sharding is not None:
      sharding = jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  if kind == _ARRAY:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))
  return np.asarray(leaf)


def _from_saved(saved: Any, target: Any) -> Any:
  kind = _leaf_kind(target)
  if kind == _KEY_DATA:
    impl = (jax.random.key_impl(target) if isinstance(target, jax.Array)
            else target.dtype._impl)  # abstract key: the impl lives on its dtype
    return jax.random.wrap_key_data(saved, impl=impl)
  if kind == _ARRAY:
    return saved
  array = np.asarray(saved)
  if isinstance(target, np.ndarray):
    return array.astype(target.dtype)
  if isinstance(target, np.generic):
    return target.dtype.type(array.item())
  return type(target)(array.item())  # Python scalar


class TrainCheckpointer:
  """Periodic, async, keep-N checkpoints of a train state and the data position.

  Args:
    directory: where the step directories go (created).
    save_every: save when ``step % save_every == 0`` (``save(..., force=True)`` saves any step).
    keep: number of most recent checkpoints kept (None: all).
    async_save: write in a background thread; the device-to-host copy is synchronous, so the
      arrays may be donated or updated as soon as ``save`` returns.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int | None = 2,
               async_save: bool = True):
    if not isinstance(save_every, (int, np.integer)) or save_every < 1:
      raise ValueError(f"save_every must be an int >= 1, got {save_every!r}")
    if keep is not None and (not isinstance(keep, (int, np.integer)) or keep < 1):
      raise ValueError(f"keep must be an int >= 1 or None, got {keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = int(save_every)
    # The save decision is ours (step % save_every == 0, or forced): orbax's default policy would
    # also save the first step it sees.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether ``step`` is a periodic save step (a multiple of ``save_every``, not yet saved)."""
    return step % self.save_every == 0 and step not in self._manager.all_steps()

  def save(self, step: int, state: Any, position: Mapping[str, Any], *, force: bool = False,
           extra: Mapping[str, Any] | None = None) -> bool:
    """Saves ``state`` and ``position`` as step ``step`` if it is a save step (or ``force``).

    Returns whether a save started. ``position``: JSON-serialisable, e.g. ``dict(epoch=1,
    step_in_epoch=3)``, where the data pipeline resumes.
    """
    if step in self._manager.all_steps():
      return False  # already saved (e.g. a periodic save that is also the final step)
    if not force and step % self.save_every:
      return False
    paths, leaves, _ = _paths_and_leaves(state)
    tree = {f"{i:06d}": _to_saveable(leaf) for i, leaf in enumerate(leaves)}
    meta = {"position": dict(position), "paths": paths,
            "kinds": [_leaf_kind(leaf) for leaf in leaves], **dict(extra or {})}
    return self._manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                           meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """``(state, meta)`` of ``step`` (default: the latest), shaped and sharded like ``target``.

    ``target``: the live state, or its abstract version (``jax.ShapeDtypeStruct`` leaves with
    shardings). ``meta["position"]`` is the data position saved with it.
    """
    self._manager.wait_until_finished()
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have "
                              f"{self.all_steps()}")
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    paths, leaves, treedef = _paths_and_leaves(target)
    if meta["paths"] != paths:
      saved = meta["paths"]
      first = next((i for i, (a, b) in enumerate(zip(saved, paths)) if a != b),
                   min(len(saved), len(paths)))
      raise ValueError(
          f"checkpoint step {step} in {self.directory} holds a different state: {len(saved)} leaves"
          f" vs {len(paths)} in the target; first difference at leaf {first}: saved "
          f"{saved[first] if first < len(saved) else None!r}, target "
          f"{paths[first] if first < len(paths) else None!r}")
    abstract = {f"{i:06d}": _abstract(leaf) for i, leaf in enumerate(leaves)}
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    values = [_from_saved(restored[f"{i:06d}"], leaf) for i, leaf in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, values), meta

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
