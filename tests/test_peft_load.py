"""Loading a PEFT LoRA adapter directory onto our model (weights.peft.load_peft, load(adapter=)):
the exact inverse of export_peft, peft's own PeftModel logits on tiny transformers Llama and Qwen2
models as the independent reference, and a named refusal of everything it does not compute."""

import json

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

from subliminal_jax import lora, sharding
from subliminal_jax.loading import load
from subliminal_jax.weights import peft as peft_io
from test_lora import tiny_model

HF_VOCAB = 97


def _with_random_adapters(model, targets, rank, alpha, rslora=False):
  """``model`` with adapters whose A and B are both random (B = 0 would hide a wrong B)."""
  lora.apply_lora(model, rank=rank, alpha=alpha, targets=targets, rslora=rslora)
  rng = np.random.default_rng(1)
  for name in targets:
    linear = getattr(model.layers, name)
    for variable in (linear.lora_a, linear.lora_b):
      value = variable.get_value()
      variable.set_value(jax.device_put(rng.normal(0, 0.1, value.shape).astype(np.float32),
                                        value.sharding))
  return model


def _adapters(model) -> dict:
  return {name: (np.asarray(getattr(model.layers, name).lora_a.get_value()),
                 np.asarray(getattr(model.layers, name).lora_b.get_value()),
                 getattr(model.layers, name).lora_scale) for name in lora.lora_targets(model)}


def _assert_same_adapters(got, expected):
  assert list(got) == list(expected)
  for name, (a, b, scale) in expected.items():
    np.testing.assert_array_equal(got[name][0], a, err_msg=name)
    np.testing.assert_array_equal(got[name][1], b, err_msg=name)
    assert got[name][2] == scale, name


# ---------------------------------------------------------------------------------------------
# The inverse of export_peft


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_export_then_load_gives_back_the_same_adapters_and_logits(tmp_path, mesh_shape):
  mesh = sharding.make_mesh(*mesh_shape) if mesh_shape else None
  base = load("tiny-random", mesh=mesh)
  model = _with_random_adapters(base.model, ("q_proj", "v_proj", "o_proj", "down_proj"), rank=4,
                                alpha=8.0, rslora=True)
  peft_io.export_peft(model, tmp_path / "adapter", base_model_name_or_path="tiny-random")

  loaded = load("tiny-random", mesh=mesh, adapter=tmp_path / "adapter")
  _assert_same_adapters(_adapters(loaded.model), _adapters(model))
  ids = jax.numpy.asarray(np.random.default_rng(0).integers(0, 1000, (2, 9)), np.int32)
  np.testing.assert_array_equal(np.asarray(loaded.model(ids)), np.asarray(model(ids)))
  assert loaded.adapter == str(tmp_path / "adapter")
  assert loaded.fingerprint != base.fingerprint
  assert load("tiny-random", adapter=tmp_path / "adapter").fingerprint == loaded.fingerprint
  if mesh is not None:  # placed as apply_lora places adapters: by their logical axes
    a = loaded.model.layers.down_proj.lora_a.get_value()
    assert a.sharding.spec == sharding.logical_to_spec(("layers", "mlp", "lora_rank"), a.shape, mesh)


def test_names_without_prefix_or_with_an_adapter_name_are_read(tmp_path):
  model = _with_random_adapters(tiny_model(), ("k_proj", "up_proj"), rank=2, alpha=4.0)
  peft_io.export_peft(model, tmp_path / "a", base_model_name_or_path="x")
  tensors = safetensors.numpy.load_file(tmp_path / "a" / peft_io.ADAPTER_WEIGHTS)
  renamed = {}
  for i, (name, tensor) in enumerate(sorted(tensors.items())):
    # All with the adapter name PeftModel's own state dict has; every other without the prefix.
    name = name.replace(".weight", ".default.weight")
    renamed[name.removeprefix("base_model.model.") if i % 2 else name] = tensor
  safetensors.numpy.save_file(renamed, tmp_path / "a" / peft_io.ADAPTER_WEIGHTS)
  _assert_same_adapters(_adapters(peft_io.load_peft(tiny_model(), tmp_path / "a")), _adapters(model))


# ---------------------------------------------------------------------------------------------
# peft's PeftModel as the reference


def _hf_base(model_type: str):
  config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
  torch.manual_seed(0)
  return transformers.AutoModelForCausalLM.from_config(config_class(
      vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).float().eval()


@pytest.mark.parametrize("model_type,settings", [
    ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    ("qwen2", dict(r=2, lora_alpha=4, target_modules=r".*\.(k_proj|up_proj)",
                   exclude_modules=["model.layers.0.mlp.up_proj"])),
    ("llama", dict(r=2, lora_alpha=3, target_modules=["o_proj", "mlp.gate_proj"],
                   layers_to_transform=[1], layers_pattern="layers")),
])
def test_logits_match_peft(tmp_path, model_type, settings):
  base = _hf_base(model_type)
  base.save_pretrained(tmp_path / "base")
  ids = np.random.default_rng(2).integers(0, HF_VOCAB, (2, 9))
  with torch.no_grad():
    base_logits = base(input_ids=torch.tensor(ids)).logits.numpy()
  torch.manual_seed(1)
  reference = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **settings)).eval()
  reference.save_pretrained(tmp_path / "adapter")
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids)).logits.numpy()

  loaded = load(tmp_path / "base", adapter=tmp_path / "adapter")
  got = np.asarray(loaded.model(jax.numpy.asarray(ids, np.int32)))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert np.abs(expected - base_logits).max() > 1e-2  # the adapters change the logits
  # As many (projection, layer) adapters as peft made; the other layers' adapters are zero.
  peft_count = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in reference.modules())
  our_count = sum(bool(a[i].any()) for a, _, _ in _adapters(loaded.model).values() for i in range(3))
  assert our_count == peft_count


# ---------------------------------------------------------------------------------------------
# Refusals, each naming the value


@pytest.fixture
def adapter_dir(tmp_path):
  """A valid adapter of tiny_model() on q_proj and v_proj (rank 2), written by export_peft."""
  model = _with_random_adapters(tiny_model(), ("q_proj", "v_proj"), rank=2, alpha=4.0)
  peft_io.export_peft(model, tmp_path / "valid", base_model_name_or_path="x")
  return tmp_path / "valid"


def _edit(adapter_dir, config_changes=None, edit_tensors=None):
  """Rewrites ``adapter_dir``'s config and tensors in place."""
  config_path = adapter_dir / peft_io.ADAPTER_CONFIG
  config = json.loads(config_path.read_text())
  config.update(config_changes or {})
  config_path.write_text(json.dumps(config))
  if edit_tensors is not None:
    weights = adapter_dir / peft_io.ADAPTER_WEIGHTS
    tensors = safetensors.numpy.load_file(weights)
    edit_tensors(tensors)
    safetensors.numpy.save_file(tensors, weights)
  return adapter_dir


_Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("changes,message", [
    ({"peft_type": "IA3"}, "peft_type='IA3'; only 'LORA' is supported"),
    ({"task_type": "SEQ_CLS"}, "task_type='SEQ_CLS'; expected 'CAUSAL_LM'"),
    ({"use_dora": True}, r"use_dora=True \(DoRA's magnitude vectors\) is not supported"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\]"),
    ({"bias": "lora_only"}, "bias='lora_only' .* expected 'none'"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
    ({"rank_pattern": {"q_proj": 4}}, r"rank_pattern=\{'q_proj': 4\} \(per-module ranks\)"),
    ({"alpha_pattern": {"v_proj": 2}}, r"alpha_pattern=\{'v_proj': 2\}"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' changed the base"),
    ({"r": 0}, "r=0; expected a positive integer"),
    ({"lora_alpha": "8"}, "lora_alpha='8'; expected a positive number"),
    ({"target_modules": 5}, "target_modules=5; expected a non-empty list"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"entries \['lm_head'\] name no projection"),
    ({"exclude_modules": ".*"}, "selects none of the model's projections"),
    ({"layers_to_transform": [0, 5]}, r"layers_to_transform=\[0, 5\] names \[5\], which the model "
                                      r"lacks \(it has layers 0..1\)"),
    ({"layers_pattern": "h"}, "layers_pattern='h' names no part"),
    ({"target_modules": ["q_proj", "k_proj", "v_proj"]},
     "declares self_attn.k_proj of layer 0, but there is no tensor "
     "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"),
    ({"target_modules": ["q_proj"]}, r"tensor 'base_model.model.model.layers.0.self_attn.v_proj."
                                     r"lora_A.weight' adapts a module that target_modules="
                                     r"\['q_proj'\] does not select"),
    ({"r": 3}, rf"tensor '{_Q0}.lora_A.weight' has shape \(2, 32\); the model's q_proj with r=3 "
               r"expects \(3, 32\)"),
])
def test_unsupported_or_inconsistent_configs_are_refused(adapter_dir, changes, message):
  with pytest.raises(ValueError, match=message):
    peft_io.load_peft(tiny_model(), _edit(adapter_dir, changes))


def _rename(old, new):
  return lambda tensors: tensors.__setitem__(new, tensors.pop(old))


@pytest.mark.parametrize("edit,message", [
    (_rename(f"{_Q0}.lora_B.weight", _Q0.replace("layers.0", "layers.7") + ".lora_B.weight"),
     r"tensor '.*layers\.7\.self_attn\.q_proj\.lora_B\.weight' is for layer 7; the model has 2 "
     r"layers \(0..1\)"),
    (lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight", np.ones((2, 32), np.float32)),
     "tensor 'base_model.model.lm_head.lora_A.weight' is not the lora_A or lora_B of a layer"),
    (lambda t: t.__setitem__(f"{_Q0}.lora_B.weight", np.ones((31, 2), np.float32)),
     rf"tensor '{_Q0}.lora_B.weight' has shape \(31, 2\); the model's q_proj with r=2 expects "
     r"\(32, 2\)"),
    (lambda t: t.__setitem__(f"{_Q0}.lora_A.weight", np.full((2, 32), np.nan, np.float32)),
     f"tensor '{_Q0}.lora_A.weight' holds 64 non-finite values"),
    (lambda t: t.__setitem__(f"{_Q0}.lora_A.other.weight", np.ones((2, 32), np.float32)),
     f"tensors '{_Q0}.lora_A.other.weight' and '{_Q0}.lora_A.weight' are the same adapter"),
])
def test_bad_tensors_are_refused(adapter_dir, edit, message):
  with pytest.raises(ValueError, match=message):
    peft_io.load_peft(tiny_model(), _edit(adapter_dir, edit_tensors=edit))


def test_missing_or_unreadable_files_and_an_adapted_base_are_refused(adapter_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="PEFT adapter directory not found: '.*nowhere'"):
    load("tiny-random", adapter=tmp_path / "nowhere")  # before the base is loaded
  weights = adapter_dir / peft_io.ADAPTER_WEIGHTS
  weights.rename(adapter_dir / "adapter_model.bin")
  with pytest.raises(ValueError, match="holds adapter_model.bin .* convert it to "
                                       "adapter_model.safetensors"):
    peft_io.load_peft(tiny_model(), adapter_dir)
  (adapter_dir / "adapter_model.bin").unlink()
  with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
    peft_io.load_peft(tiny_model(), adapter_dir)
  weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
  with pytest.raises(ValueError, match="is not a readable safetensors file"):
    peft_io.load_peft(tiny_model(), adapter_dir)
  (adapter_dir / peft_io.ADAPTER_CONFIG).unlink()
  with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
    peft_io.load_peft(tiny_model(), adapter_dir)
  adapted = lora.apply_lora(tiny_model(), rank=2, alpha=4.0, targets=("up_proj",))
  with pytest.raises(ValueError, match=r"already has LoRA adapters on \['up_proj'\]"):
    peft_io.load_peft(adapted, adapter_dir)


def test_a_refused_adapter_leaves_the_model_unchanged(tmp_path):
  # q_proj takes rank 20 but k_proj (16 outputs) cannot: refused before q_proj is adapted.
  model = _with_random_adapters(tiny_model(), ("q_proj", "k_proj"), rank=8, alpha=4.0)
  peft_io.export_peft(model, tmp_path / "a", base_model_name_or_path="x")
  _edit(tmp_path / "a", {"r": 20}, lambda tensors: tensors.update(
      {name: np.ones((20, 32) if "lora_A" in name else (t.shape[0], 20), np.float32)
       for name, t in tensors.items()}))
  fresh = tiny_model()
  with pytest.raises(ValueError, match=r"r=20 exceeds min\(in, out\) = 16 of k_proj"):
    peft_io.load_peft(fresh, tmp_path / "a")
  assert lora.lora_targets(fresh) == ()


def test_bfloat16_adapters_are_read(tmp_path):
  """Adapters trained in bfloat16 are often saved so; read as the float32 of those values."""
  model = _with_random_adapters(tiny_model(), ("gate_proj",), rank=2, alpha=4.0)
  peft_io.export_peft(model, tmp_path / "a", base_model_name_or_path="x")
  _edit(tmp_path / "a", edit_tensors=lambda tensors: tensors.update(
      {name: t.astype(jax.numpy.bfloat16) for name, t in tensors.items()}))
  stored = safetensors.numpy.load_file(tmp_path / "a" / peft_io.ADAPTER_WEIGHTS)
  assert {t.dtype for t in stored.values()} == {np.dtype(jax.numpy.bfloat16)}
  expected = {name: (a.astype(jax.numpy.bfloat16).astype(np.float32),
                     b.astype(jax.numpy.bfloat16).astype(np.float32), scale)
              for name, (a, b, scale) in _adapters(model).items()}
  _assert_same_adapters(_adapters(peft_io.load_peft(tiny_model(), tmp_path / "a")), expected)
