"""The train step: exact loss normalisation, sharded = single device, gradient accumulation,
optimizer updates against torch's gradients, schedules, ensembles, and clear errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from subliminal_jax import sharding
from subliminal_jax.models.mlp import MLP, MLPConfig
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.training import ensemble, optimizers
from subliminal_jax.training import train_step as ts
from subliminal_jax.weights import hf_layout

VOCAB = 64


def tiny_config(**changes) -> TransformerConfig:
  # Every sharded dimension is divisible by 4 (fsdp) and 2 (tensor).
  fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, tie_embeddings=True)
  fields.update(changes)
  return TransformerConfig(**fields)


def tiny_model(seed: int = 0, **changes) -> Transformer:
  return Transformer(tiny_config(**changes), rngs=nnx.Rngs(seed))


def padded_batch(seed: int = 0, batch: int = 8, length: int = 12) -> dict[str, np.ndarray]:
  """Rows of different lengths, left- and right-padded, with answers of very different lengths
  (one row has no target at all), as the chat data produces them."""
  rs = np.random.RandomState(seed)
  ids = rs.randint(0, VOCAB, (batch, length)).astype(np.int32)
  attention = np.zeros((batch, length), bool)
  loss = np.zeros((batch, length), bool)
  for b in range(batch):
    n = rs.randint(4, length + 1)
    start = 0 if b % 2 else length - n  # odd rows right-padded, even rows left-padded
    attention[b, start:start + n] = True
    answer = 0 if b == 3 else (n - 1 if b % 2 == 0 else rs.randint(1, 3))
    loss[b, start + n - answer:start + n] = True
  ids[~attention] = 0
  return dict(input_ids=ids, attention_mask=attention, loss_mask=loss)


def reference_mean_nll(logits: np.ndarray, batch: dict[str, np.ndarray]) -> tuple[float, int]:
  """Mean over targets of -log softmax(logits[b, t-1])[ids[b, t]], directly in float64."""
  logits = logits.astype(np.float64)
  total, count = 0.0, 0
  for b, t in zip(*np.nonzero(batch["loss_mask"] & batch["attention_mask"])):
    if t == 0:
      continue
    row = logits[b, t - 1]
    log_z = row.max() + np.log(np.exp(row - row.max()).sum())
    total += log_z - row[batch["input_ids"][b, t]]
    count += 1
  return total / count, count


def flat_params(state: nnx.State) -> dict[str, np.ndarray]:
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def max_relative_error(got: nnx.State, expected: nnx.State) -> float:
  got, expected = flat_params(got), flat_params(expected)
  assert got.keys() == expected.keys()
  return max(float(np.abs(got[k] - expected[k]).max() / np.abs(expected[k]).max()) for k in got)


def run_steps(model, optimizer, batches, *, mesh=None, grad_accum_steps=1, schedule=None,
              trainable=nnx.Param):
  graphdef, state = ts.create_train_state(model, optimizer, trainable=trainable, mesh=mesh)
  step = ts.make_train_step(graphdef, optimizer, mesh=mesh, grad_accum_steps=grad_accum_steps,
                            schedule=schedule)
  history = []
  for batch in batches:
    state, metrics = step(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  return graphdef, state, history


# ---------------------------------------------------------------------------------------------
# Normalisation and sharding

LR = 3e-3
SCHEDULE = optimizers.make_schedule(LR, total_steps=10, warmup_steps=2, decay="linear")


def adamw():
  return optimizers.make_optimizer("adamw", SCHEDULE, weight_decay=0.01, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def single_device_run():
  batches = [padded_batch(seed) for seed in range(3)]
  _, state, history = run_steps(tiny_model(), adamw(), batches, schedule=SCHEDULE)
  return batches, state, history


def test_loss_is_the_mean_over_real_targets_in_float64(single_device_run):
  batches, _, history = single_device_run
  logits = np.asarray(tiny_model()(jnp.asarray(batches[0]["input_ids"]),
                                   jnp.asarray(batches[0]["attention_mask"])))
  expected, count = reference_mean_nll(logits, batches[0])
  assert history[0]["num_targets"] == count
  assert history[0]["loss"] == pytest.approx(expected, rel=1e-6)
  # Warmup 2 of 10 steps: lr(s) = LR * s / 2 while s < 2, then linear decay over 8 steps.
  assert [h["learning_rate"] for h in history] == pytest.approx([0.0, LR / 2, LR])
  # With lr 0 the first AdamW update is zero: weight decay is scaled by the lr too.
  assert history[0]["update_norm"] == 0.0 and history[1]["update_norm"] > 0


@pytest.mark.parametrize("data,fsdp,tensor,grad_accum", [
    (8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 2)])
def test_sharded_step_equals_single_device(single_device_run, data, fsdp, tensor, grad_accum):
  batches, expected_state, expected_history = single_device_run
  mesh = sharding.make_mesh(data, fsdp, tensor)
  _, state, history = run_steps(tiny_model(), adamw(), batches, mesh=mesh,
                                grad_accum_steps=grad_accum, schedule=SCHEDULE)
  assert max_relative_error(state.trainable, expected_state.trainable) <= 1e-5
  for got, expected in zip(history, expected_history):
    assert got["num_targets"] == expected["num_targets"]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
  # Parameters and Adam moments stay where their logical axes put them.
  kernel = state.trainable["layers"]["gate_proj"]["kernel"].get_value()
  mu = state.opt_state[1][0].mu["layers"]["gate_proj"]["kernel"].get_value()
  expected_spec = sharding.logical_to_spec(("layers", "embed", "mlp"), kernel.shape, mesh)
  assert kernel.sharding.spec == expected_spec == mu.sharding.spec


def test_gradient_accumulation_is_padding_aware():
  batch = padded_batch(5)
  sgd = optimizers.make_optimizer("sgd", 0.5, max_grad_norm=None)
  # Micro-batch i takes rows i, i+G, ...: with G=2, even rows (long answers) and odd rows (short).
  counts = [int((batch["loss_mask"][i::2, 1:] & batch["attention_mask"][i::2, 1:]).sum())
            for i in range(2)]
  assert counts[0] > 2 * counts[1]  # so a mean of per-micro-batch means would be visibly off
  _, full, full_history = run_steps(tiny_model(), sgd, [batch])
  _, accumulated, history = run_steps(tiny_model(), sgd, [batch], grad_accum_steps=2)
  assert max_relative_error(accumulated.trainable, full.trainable) <= 1e-5
  assert history[0]["loss"] == pytest.approx(full_history[0]["loss"], rel=1e-6)
  assert history[0]["grad_norm"] == pytest.approx(full_history[0]["grad_norm"], rel=1e-5)
  # The mean of the two micro-batch means is not the answer: the check above can fail.
  logits = np.asarray(tiny_model()(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))
  halves = [reference_mean_nll(logits[i::2], {k: v[i::2] for k, v in batch.items()})[0] for i in range(2)]
  assert abs(np.mean(halves) - full_history[0]["loss"]) > 1e-3


# ---------------------------------------------------------------------------------------------
# Optimizer updates against gradients computed by PyTorch


def torch_reference(model: Transformer, batch: dict[str, np.ndarray]):
  """(mean NLL, {hf name: grad}) from transformers' Llama holding the same weights."""
  tensors = hf_layout.hf_tensors_from_model(model)
  reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf())).float()
  reference.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()}, strict=False)
  reference.tie_weights()
  mask = torch.tensor(batch["attention_mask"].astype(np.int64))
  positions = torch.clamp(torch.cumsum(mask, 1) - 1, min=0)
  logits = reference(input_ids=torch.tensor(batch["input_ids"].astype(np.int64)), attention_mask=mask,
                     position_ids=positions).logits[:, :-1].double()
  targets = torch.tensor(batch["input_ids"][:, 1:].astype(np.int64))
  weight = torch.tensor((batch["loss_mask"] & batch["attention_mask"])[:, 1:].astype(np.float64))
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          reduction="none").reshape(targets.shape)
  loss = (nll * weight).sum() / weight.sum()
  loss.backward()
  grads = {name: p.grad.numpy().astype(np.float64) for name, p in reference.named_parameters()}
  return loss.item(), {name: grads.get(name, grads.get("model.embed_tokens.weight")) for name in tensors}


@pytest.mark.parametrize("name", ["sgd", "sign_sgd"])
def test_sgd_and_sign_sgd_updates_match_hand_computed(name):
  model, batch, lr, clip = tiny_model(3), padded_batch(7), 0.05, 0.5
  before = hf_layout.hf_tensors_from_model(model)
  loss, grads = torch_reference(model, batch)
  grad_norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
  assert grad_norm > clip  # the clipping branch is exercised
  optimizer = optimizers.make_optimizer(name, lr, max_grad_norm=clip)
  graphdef, state, history = run_steps(model, optimizer, [batch])
  after = hf_layout.hf_tensors_from_model(ts.model_from_state(graphdef, state))
  assert history[0]["loss"] == pytest.approx(loss, rel=1e-5)
  assert history[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
  for key, g in grads.items():
    if name == "sgd":
      expected = before[key] - lr * g * min(1.0, clip / grad_norm)
      np.testing.assert_allclose(after[key], expected, rtol=0, atol=1e-6, err_msg=key)
    else:
      # Clipping rescales by a positive number, so sign-SGD ignores it; entries whose gradient is
      # at float32 noise level may legitimately take either sign.
      clear = np.abs(g) > 1e-6 * np.abs(g).max()
      step = (before[key] - after[key]) / lr
      np.testing.assert_allclose(step[clear], np.sign(g[clear]), atol=1e-4, err_msg=key)


# ---------------------------------------------------------------------------------------------
# State handling


def test_caller_model_survives_donation_and_init_sharded_places_variables():
  model = tiny_model()
  original = flat_params(nnx.state(model, nnx.Param))
  mesh = sharding.make_mesh(2, 2, 2)
  run_steps(model, optimizers.make_optimizer("sgd", 0.1), [padded_batch(1)] * 2, mesh=mesh)
  # The trained state is separate: the model passed in still works and is unchanged.
  assert all(np.array_equal(original[k], v) for k, v in flat_params(nnx.state(model, nnx.Param)).items())
  model(jnp.asarray(padded_batch(1)["input_ids"]))

  built = ts.init_sharded(lambda: Transformer(tiny_config(), rngs=nnx.Rngs(0)), mesh)
  for key, value in nnx.to_flat_state(nnx.state(built, nnx.Param)):
    array = value.get_value()
    path = "/".join(map(str, key))
    # Same draws as the eager constructor (jit may fuse the init scale differently: 1 ulp).
    np.testing.assert_allclose(np.asarray(array), original[path], rtol=1e-6, atol=1e-7)
    assert array.sharding.spec == sharding.variable_spec(value, mesh), path
  assert built.layers.q_proj.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")


# ---------------------------------------------------------------------------------------------
# Ensembles


def mlp_loss(model, batch, rng, aux):
  logp = jax.nn.log_softmax(model(batch["x"]))
  nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]
  return (nll * batch["w"]).sum(), batch["w"].sum().astype(jnp.int32), {}


@pytest.mark.parametrize("mesh_shape", [None, (8, 1, 1)])
def test_mlp_ensemble_step_equals_separate_steps(mesh_shape):
  config = MLPConfig(input_size=12, hidden_sizes=(16,), num_classes=4, num_aux=2)
  rs = np.random.RandomState(0)
  batch = dict(x=rs.randn(8, 12).astype(np.float32), y=rs.randint(0, 4, 8).astype(np.int32),
               w=(np.arange(8) < 6).astype(np.float32))
  models = [MLP(config, rngs=nnx.Rngs(seed)) for seed in (0, 1, 2)]
  optimizer = optimizers.make_optimizer("adam", 1e-2)
  mesh = sharding.make_mesh(*mesh_shape) if mesh_shape else None
  graphdef, state = ensemble.create_ensemble_state(models, optimizer, mesh=mesh)
  step = ensemble.make_ensemble_step(graphdef, optimizer, loss_fn=mlp_loss, mesh=mesh)
  for _ in range(3):
    state, metrics = step(state, batch)
  assert metrics["loss"].shape == (3,) and set(np.asarray(metrics["num_targets"])) == {6}
  for k, model in enumerate(models):
    g, single = ts.create_train_state(model, optimizer)
    single_step = ts.make_train_step(g, optimizer, loss_fn=mlp_loss)
    for _ in range(3):
      single, single_metrics = single_step(single, batch)
    member = nnx.state(ensemble.model_from_ensemble(graphdef, state, k), nnx.Param)
    assert max_relative_error(member, single.trainable) <= 1e-5
    assert float(metrics["loss"][k]) == pytest.approx(float(single_metrics["loss"]), rel=1e-5)


def test_lora_student_ensemble_shares_the_base_and_sees_own_batches():
  from subliminal_jax import lora
  base = tiny_model()
  students = [lora.apply_lora(nnx.clone(base), rank=2, alpha=4.0, targets=("q_proj", "down_proj"),
                              seed=s) for s in (0, 1)]
  optimizer = optimizers.make_optimizer("adamw", 1e-2)
  graphdef, state = ensemble.create_ensemble_state(students, optimizer, trainable=nnx.LoRAParam,
                                                   share_frozen=True)
  assert state.frozen["layers"]["q_proj"]["kernel"].get_value().ndim == 3  # one unstacked base
  batches = [padded_batch(1), padded_batch(2)]
  stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  step = ensemble.make_ensemble_step(graphdef, optimizer, shared_batch=False)
  state, metrics = step(state, stacked)
  for k, student in enumerate(students):
    _, single, history = run_steps(student, optimizer, [batches[k]], trainable=nnx.LoRAParam)
    member = nnx.state(ensemble.model_from_ensemble(graphdef, state, k), nnx.LoRAParam)
    assert max_relative_error(member, single.trainable) <= 1e-5
    assert float(metrics["loss"][k]) == pytest.approx(history[0]["loss"], rel=1e-6)
  different = nnx.clone(base)
  different.embed.set_value(different.embed.get_value() + 1.0)
  lora.apply_lora(different, rank=2, alpha=4.0, targets=("q_proj", "down_proj"))
  with pytest.raises(ValueError, match="share_frozen=True but model 1's frozen state differs"):
    ensemble.create_ensemble_state([students[0], different], optimizer, trainable=nnx.LoRAParam,
                                   share_frozen=True)


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_configurations_raise_clear_errors():
  with pytest.raises(ValueError, match="data=3 fsdp=1 tensor=1 multiply to 3, but there are 8 devices"):
    sharding.make_mesh(3)
  with pytest.raises(ValueError, match="do not divide the 8 devices"):
    sharding.make_mesh(-1, 3)
  with pytest.raises(ValueError, match="learning_rate must be > 0, got 0"):
    optimizers.make_optimizer("adamw", 0.0)
  with pytest.raises(ValueError, match="learning_rate must be > 0, got -0.1"):
    optimizers.make_schedule(-0.1, 10)
  with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
    optimizers.make_optimizer("lion", 0.1)
  model = tiny_model()
  sgd = optimizers.make_optimizer("sgd", 0.1)
  with pytest.raises(ValueError, match="no variables matching trainable=.*LoRAParam.*apply_lora first"):
    ts.create_train_state(model, sgd, trainable=nnx.LoRAParam)
  graphdef, state = ts.create_train_state(model, sgd)
  with pytest.raises(ValueError, match="grad_accum_steps must be a positive integer, got 0"):
    ts.make_train_step(graphdef, sgd, grad_accum_steps=0)
  mesh = sharding.make_mesh(4, 2, 1)
  batch6 = padded_batch(0, batch=6)
  with pytest.raises(ValueError, match=r"micro-batch size 6 .* not divisible by the data-parallel size 8"):
    ts.make_train_step(graphdef, sgd, mesh=mesh)(state, batch6)
  with pytest.raises(ValueError, match="global batch size 6 is not divisible by grad_accum_steps=4"):
    ts.make_train_step(graphdef, sgd, grad_accum_steps=4)(state, batch6)
  with pytest.raises(ValueError, match=r"micro-batch size 4 \(global batch 8 / grad_accum_steps 2\)"):
    ts.make_train_step(graphdef, sgd, mesh=mesh, grad_accum_steps=2)(state, padded_batch(0))
  ragged = dict(padded_batch(0), loss_mask=np.ones((4, 12), bool))
  with pytest.raises(ValueError, match="same leading \\(batch\\) size"):
    ts.make_train_step(graphdef, sgd)(state, ragged)


# ---------------------------------------------------------------------------------------------
# aux, rng and inputs laid out differently


def imitation_loss(model, batch, rng, aux):
  """Squared error to a teacher MLP given as aux (its nnx.State), plus one uniform draw per call
  (reported per target, so the metric is the mean draw of the step's micro-batches)."""
  target = jax.lax.stop_gradient(apply_teacher(aux, batch["x"]))
  squares = ((model(batch["x"]) - target) ** 2).sum(-1)
  count = jnp.asarray(squares.shape[0], jnp.int32)
  return squares.sum(), count, {"draw": jax.random.uniform(rng) * count}


MLP_CONFIG = MLPConfig(input_size=12, hidden_sizes=(16,), num_classes=4, num_aux=4)
MLP_GRAPHDEF = nnx.graphdef(MLP(MLP_CONFIG, rngs=nnx.Rngs(0)))


def apply_teacher(params, x):
  return nnx.merge(MLP_GRAPHDEF, params)(x)


def test_aux_teacher_rng_and_relaid_inputs_on_a_mesh():
  rs = np.random.RandomState(0)
  batch = dict(x=rs.randn(16, 12).astype(np.float32))
  teacher = nnx.state(MLP(MLP_CONFIG, rngs=nnx.Rngs(9)), nnx.Param)
  optimizer = optimizers.make_optimizer("adam", 1e-2)

  def run(mesh, aux, relay=False):
    graphdef, state = ts.create_train_state(MLP(MLP_CONFIG, rngs=nnx.Rngs(0)), optimizer, mesh=mesh,
                                            seed=4)
    if relay:  # e.g. restored from a checkpoint with another layout: the step reshards it
      def elsewhere(x):
        sharded = x.ndim and x.shape[0] % 4 == 0
        spec = jax.sharding.PartitionSpec("data") if sharded else jax.sharding.PartitionSpec()
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
      state = jax.tree.map(elsewhere, state)
      assert state.trainable["layers"][0]["kernel"].get_value().sharding.spec[0] == "data"
    step = ts.make_train_step(graphdef, optimizer, mesh=mesh, loss_fn=imitation_loss,
                              grad_accum_steps=2)
    draws = []
    for _ in range(2):
      b = batch if mesh is None else {"x": jax.device_put(batch["x"])}  # a single-device jax Array
      state, metrics = step(state, b, aux)
      draws.append(float(metrics["draw"]))
    return state, draws, float(metrics["loss"])

  plain, draws, loss = run(None, teacher)
  assert draws[0] != draws[1] and 0 < min(draws) and max(draws) < 1
  mesh = sharding.make_mesh(4, 2, 1)
  sharded_teacher = ts.place_state(teacher, mesh)
  for relay in (False, True):
    state, mesh_draws, mesh_loss = run(mesh, sharded_teacher, relay)
    assert mesh_draws == pytest.approx(draws, rel=1e-6)  # same rng stream with or without a mesh
    assert mesh_loss == pytest.approx(loss, rel=1e-5)
    assert max_relative_error(state.trainable, plain.trainable) <= 1e-5
