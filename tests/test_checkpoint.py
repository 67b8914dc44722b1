"""TrainCheckpointer: exact round trips of a sharded TrainState, keep-N, save cadence, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from subliminal_jax import sharding
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.training import train_step
from subliminal_jax.training.checkpoint import TrainCheckpointer

TINY = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)


def leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def sharded_state(mesh, seed=0):
  model = sharding.shard_module(Transformer(TINY, rngs=nnx.Rngs(seed)), mesh)
  optimizer = optax.adamw(1e-3)
  _, state = train_step.create_train_state(model, optimizer, seed=seed, mesh=mesh)
  # Non-trivial optimizer moments, so a mix-up of mu and nu would show.
  state = dataclasses.replace(state, opt_state=jax.tree.map(
      lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 7, state.opt_state))
  return state


def test_train_state_round_trip_restores_values_and_target_shardings(tmp_path):
  mesh = sharding.make_mesh(data=2, fsdp=4)
  state = sharded_state(mesh, seed=1)
  with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.save(7, state, {"epoch": 1, "step_in_epoch": 2})
    ckpt.wait()
    other = sharded_state(mesh, seed=2)  # a different state of the same structure as the target
    restored, meta = ckpt.restore(other)
  assert meta["position"] == {"epoch": 1, "step_in_epoch": 2}
  leaves_equal(restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(other)):
    assert got.sharding == want.sharding
  kernel = restored.trainable["layers"]["q_proj"]["kernel"][...]
  assert kernel.sharding.spec[1] == "fsdp"  # [layers, embed, q_heads]: embed over fsdp


def test_restore_onto_abstract_target_with_another_sharding(tmp_path):
  """An abstract target (ShapeDtypeStruct + sharding) decides where arrays land: a state saved
  sharded over fsdp restores replicated."""
  mesh = sharding.make_mesh(data=2, fsdp=4)
  state = sharded_state(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          state)
  with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state, {"epoch": 0, "step_in_epoch": 1})
    restored, _ = ckpt.restore(abstract)
  leaves_equal(restored, state)
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(restored))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MixedState:
  step: jax.Array
  params: dict
  key: jax.Array
  host_scalar: np.float32
  host_array: np.ndarray
  count: int


def test_typed_keys_numpy_and_python_scalars_round_trip(tmp_path):
  state = MixedState(step=jnp.array(3, jnp.int32), params={"w": jnp.arange(6.0).reshape(2, 3)},
                     key=jax.random.key(42), host_scalar=np.float32(1.25),
                     host_array=np.arange(4, dtype=np.int64), count=5)
  target = MixedState(step=jnp.array(0, jnp.int32), params={"w": jnp.zeros((2, 3))},
                      key=jax.random.key(0), host_scalar=np.float32(0), host_array=np.zeros(4, np.int64),
                      count=0)
  with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state, {"epoch": 0, "step_in_epoch": 0})
    restored, _ = ckpt.restore(target)
  leaves_equal(restored, state)
  assert type(restored.host_scalar) is np.float32 and type(restored.count) is int
  assert jax.random.key_impl(restored.key) == jax.random.key_impl(state.key)
  np.testing.assert_array_equal(jax.random.uniform(restored.key, (3,)),
                                jax.random.uniform(state.key, (3,)))


def test_save_cadence_keep_n_and_latest(tmp_path):
  state = {"w": jnp.ones(3)}
  with TrainCheckpointer(tmp_path, save_every=2, keep=2) as ckpt:
    saved = [ckpt.save(step, {"w": state["w"] * step}, {"epoch": 0, "step_in_epoch": step})
             for step in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert ckpt.save(7, {"w": state["w"] * 7}, {"epoch": 0, "step_in_epoch": 7}, force=True)
    assert not ckpt.save(7, state, {"epoch": 0, "step_in_epoch": 7}, force=True)  # already saved
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    assert ckpt.latest_step() == 7
    restored, meta = ckpt.restore(state)
    np.testing.assert_array_equal(restored["w"], np.full(3, 7.0))
    restored6, meta6 = ckpt.restore(state, step=6)
    np.testing.assert_array_equal(restored6["w"], np.full(3, 6.0))
    assert meta6["position"]["step_in_epoch"] == 6
  # A new checkpointer on the same directory sees the same checkpoints (what a resumed run does).
  with TrainCheckpointer(tmp_path, save_every=2, keep=2) as again:
    assert again.latest_step() == 7


def test_errors_name_the_problem(tmp_path):
  with TrainCheckpointer(tmp_path / "empty", save_every=1) as ckpt:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore({"w": jnp.ones(2)})
  with TrainCheckpointer(tmp_path / "one", save_every=1) as ckpt:
    ckpt.save(1, {"w": jnp.ones(2), "b": jnp.zeros(1)}, {"epoch": 0, "step_in_epoch": 1})
    with pytest.raises(ValueError, match="different state"):
      ckpt.restore({"w": jnp.ones(2), "extra": jnp.zeros(1)})
    with pytest.raises(FileNotFoundError, match="step 5"):
      ckpt.restore({"w": jnp.ones(2), "b": jnp.zeros(1)}, step=5)
  with pytest.raises(ValueError, match="save_every"):
    TrainCheckpointer(tmp_path / "bad", save_every=0)
