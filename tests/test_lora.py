"""LoRA: peft's initialisation and scaling, seeded adapter init, adapter-only training, merging
(checked against transformers' PyTorch Llama holding the merged weights), sharding, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from subliminal_jax import lora, sharding
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.training import optimizers
from subliminal_jax.training import train_step as ts
from subliminal_jax.weights import hf_layout

VOCAB = 64


def tiny_model(seed: int = 0, **changes) -> Transformer:
  fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, tie_embeddings=False)
  fields.update(changes)
  return Transformer(TransformerConfig(**fields), rngs=nnx.Rngs(seed))


def batch(seed: int = 0, size: int = 8, length: int = 10) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(seed)
  ids = rs.randint(0, VOCAB, (size, length)).astype(np.int32)
  attention = np.ones((size, length), bool)
  attention[::2, :3] = False  # left padding on even rows
  loss = attention.copy()
  loss[:, :5] = False
  return dict(input_ids=ids, attention_mask=attention, loss_mask=loss)


def logits(model, b) -> np.ndarray:
  return np.asarray(model(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])))


def test_initialisation_and_scaling_follow_peft():
  model = tiny_model()
  b = batch()
  base = logits(model, b)
  lora.apply_lora(model, rank=4, alpha=8.0)
  assert lora.lora_targets(model) == lora.LORA_TARGETS
  for name in lora.LORA_TARGETS:
    linear = getattr(model.layers, name)
    layers, d_in, d_out = linear.kernel.get_value().shape
    a, bb = np.asarray(linear.lora_a.get_value()), np.asarray(linear.lora_b.get_value())
    assert a.shape == (layers, d_in, 4) and bb.shape == (layers, 4, d_out)
    # peft: kaiming_uniform_(a=sqrt(5)) on A [r, in] = U(-1/sqrt(in), 1/sqrt(in)); B = 0.
    bound = 1 / math.sqrt(d_in)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.12)
    assert not bb.any()
    assert linear.lora_scale == 8.0 / 4
    axes = linear.kernel.get_metadata()["logical_axes"]
    assert linear.lora_a.get_metadata()["logical_axes"] == (axes[0], axes[1], "lora_rank")
    assert linear.lora_b.get_metadata()["logical_axes"] == (axes[0], "lora_rank", axes[2])
  # B = 0: the adapted model starts exactly at the base model.
  np.testing.assert_array_equal(logits(model, b), base)
  rs_model = lora.apply_lora(tiny_model(), rank=4, alpha=8.0, rslora=True, targets=("v_proj",))
  assert rs_model.layers.v_proj.lora_scale == 8.0 / 2  # alpha / sqrt(r)


def test_seed_alone_determines_the_adapter_init():
  def a_of(seed, targets, name="q_proj"):
    model = lora.apply_lora(tiny_model(seed=123), rank=2, alpha=2.0, targets=targets, seed=seed)
    return np.asarray(getattr(model.layers, name).lora_a.get_value())
  np.testing.assert_array_equal(a_of(7, ("q_proj",)), a_of(7, lora.LORA_TARGETS))
  np.testing.assert_array_equal(a_of(7, ("q_proj", "v_proj")), a_of(7, ("v_proj", "q_proj")))
  assert not np.allclose(a_of(7, ("q_proj",)), a_of(8, ("q_proj",)))
  # Independent of the base model's init: teacher and student share A whatever their weights.
  model = lora.apply_lora(tiny_model(seed=5), rank=2, alpha=2.0, targets=("q_proj",), seed=7)
  np.testing.assert_array_equal(np.asarray(model.layers.q_proj.lora_a.get_value()), a_of(7, ("q_proj",)))


def test_lora_branch_is_x_w_plus_scaled_x_a_b():
  model = lora.apply_lora(tiny_model(), rank=3, alpha=6.0, targets=("gate_proj",), seed=1)
  linear = model.layers.gate_proj
  rs = np.random.RandomState(0)
  linear.lora_b.set_value(jnp.asarray(rs.randn(*linear.lora_b.get_value().shape), jnp.float32))
  layer = 1
  w, a, b = (np.asarray(v.get_value()[layer], np.float64)
             for v in (linear.kernel, linear.lora_a, linear.lora_b))
  x = rs.randn(5, w.shape[0]).astype(np.float32)
  one_layer = nnx.merge(*nnx.split(linear))  # a copy to slice
  for var in ("kernel", "lora_a", "lora_b"):
    v = getattr(one_layer, var)
    v.set_value(v.get_value()[layer])
  expected = x @ w + 2.0 * (x @ a) @ b
  np.testing.assert_allclose(np.asarray(one_layer(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def hf_logits(model: Transformer, b) -> np.ndarray:
  tensors = hf_layout.hf_tensors_from_model(model)
  reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf())).float()
  reference.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()})
  mask = torch.tensor(b["attention_mask"].astype(np.int64))
  with torch.no_grad():
    return reference(input_ids=torch.tensor(b["input_ids"].astype(np.int64)), attention_mask=mask,
                     position_ids=torch.clamp(torch.cumsum(mask, 1) - 1, min=0)).logits.numpy()


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_training_moves_only_adapters_and_merge_reproduces_them(mesh_shape):
  mesh = sharding.make_mesh(*mesh_shape) if mesh_shape else None
  model = tiny_model()
  if mesh is not None:
    sharding.shard_module(model, mesh)
  base_params = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  lora.apply_lora(model, rank=4, alpha=8.0, seed=3)
  if mesh is not None:
    a = model.layers.up_proj.lora_a.get_value()
    assert a.sharding.spec == sharding.logical_to_spec(("layers", "embed", "lora_rank"), a.shape, mesh)
  initial_adapters = {k: np.asarray(v.get_value())
                      for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  optimizer = optimizers.make_optimizer("adamw", 1e-2)
  graphdef, state = ts.create_train_state(model, optimizer, trainable=nnx.LoRAParam, mesh=mesh)
  step = ts.make_train_step(graphdef, optimizer, mesh=mesh)
  losses = []
  for seed in range(3):
    state, metrics = step(state, batch(seed % 2))
    losses.append(float(metrics["loss"]))
  assert losses[2] < losses[0]
  trained = ts.model_from_state(graphdef, state)
  # Frozen weights bit-identical; every adapter moved.
  for key, value in nnx.to_flat_state(nnx.state(trained, nnx.Not(nnx.LoRAParam))):
    path = tuple(key)
    if path in base_params:
      np.testing.assert_array_equal(np.asarray(value.get_value()), base_params[path])
  for key, value in nnx.to_flat_state(nnx.state(trained, nnx.LoRAParam)):
    assert not np.array_equal(np.asarray(value.get_value()), initial_adapters[tuple(key)]), key
  b = batch(5)
  adapted = logits(trained, b)
  assert np.abs(adapted - logits(tiny_model(), b)).max() > 1e-3  # the adapters do something
  merged = lora.merge_lora(trained)
  assert lora.lora_targets(merged) == () and not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  mask = b["attention_mask"]
  np.testing.assert_allclose(logits(merged, b)[mask], adapted[mask], rtol=1e-5, atol=1e-5)
  # An independent forward (transformers' Llama) of the exported merged weights.
  np.testing.assert_allclose(hf_logits(merged, b)[mask], adapted[mask], rtol=1e-4, atol=1e-4)
  if mesh is not None:
    kernel = merged.layers.o_proj.kernel.get_value()
    assert kernel.sharding.spec == sharding.logical_to_spec(("layers", "q_heads", "embed"),
                                                            kernel.shape, mesh)


def test_bad_lora_configurations_raise_clear_errors():
  with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qkv'\]; valid targets: "
                                       r"\['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', "
                                       r"'up_proj', 'down_proj'\]"):
    lora.apply_lora(tiny_model(), rank=4, alpha=8.0, targets=("q_proj", "qkv"))
  with pytest.raises(ValueError, match="targets must be a sequence of names, got the string 'q_proj'"):
    lora.apply_lora(tiny_model(), rank=4, alpha=8.0, targets="q_proj")
  with pytest.raises(ValueError, match="LoRA rank must be a positive integer, got 0"):
    lora.apply_lora(tiny_model(), rank=0, alpha=8.0)
  with pytest.raises(ValueError, match="LoRA alpha must be > 0, got -1"):
    lora.apply_lora(tiny_model(), rank=4, alpha=-1)
  with pytest.raises(ValueError, match="LoRA rank 64 exceeds min\\(in, out\\) = 16 of k_proj"):
    lora.apply_lora(tiny_model(), rank=64, alpha=8.0, targets=("k_proj",))
  model = lora.apply_lora(tiny_model(), rank=2, alpha=8.0, targets=("v_proj",))
  with pytest.raises(ValueError, match="v_proj already has LoRA adapters"):
    lora.apply_lora(model, rank=2, alpha=8.0, targets=("v_proj",))
  with pytest.raises(ValueError, match="still has LoRA adapters"):
    hf_layout.hf_tensors_from_model(model)
