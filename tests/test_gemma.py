"""Gemma 3 against transformers' Gemma3ForCausalLM (PyTorch) on the same weights, end to end.

Tiny random Gemma 3 configs are saved with ``save_pretrained`` into tmp dirs; nothing downloads.
Their sliding window (4 tokens) is shorter than the prompts, and the layer pattern mixes sliding
and global layers, so the per-layer masks and RoPE bases are exercised. The GGUF files are written
here the way llama.cpp's converter writes Gemma 3 (norm weights stored as 1 + w, q/k unpermuted,
a SentencePiece vocabulary without merges), and read back by transformers' own GGUF loader as the
independent reference.
"""

import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import gguf_writing
from subliminal_jax import lora, sharding
from subliminal_jax.loading import export_hf, load
from subliminal_jax.models.transformer import TransformerConfig
from subliminal_jax.sampling import sampler
from subliminal_jax.sampling.grammar import compile_token_grammar, number_sequence_pattern
from subliminal_jax.tokenizer import GEMMA3_CHAT_TEMPLATE, SystemTurn, Tokenizer
from subliminal_jax.weights import embedded, hf_layout
from subliminal_jax.weights import gguf as our_gguf
from test_sampler import _hf_greedy  # transformers' greedy generate, new tokens only

WINDOW = 4

# A SentencePiece vocabulary in Gemma's GGUF form: control tokens, user-defined newline and space
# runs (spaces stored as spaces), 256 byte-fallback pieces, then ordinary pieces ("▁" = space)
# whose order is the merge order.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["\n", "\n\n", "  "]
PIECES = (["\u2581", ",", ".", ":", "?", "'"] + [str(d) for d in range(10)]
          + [chr(c) for c in range(ord("a"), ord("z") + 1)]
          + ["\u2581t", "th", "\u2581th", "he", "\u2581the", "\u2581a", "er", "in", "\u2581in", "on",
             "an", "us", "use", "user", "mo", "mod", "model", "ow", "\u2581ow", "l", "\u2581owl"])
PIECES = list(dict.fromkeys(PIECES))
TOKENS = SPECIALS + USER_DEFINED + [f"<0x{b:02X}>" for b in range(256)] + PIECES
TOKEN_TYPES = [3] * len(SPECIALS) + [4] * len(USER_DEFINED) + [6] * 256 + [1] * len(PIECES)
EOS, END_OF_TURN = TOKENS.index("<eos>"), TOKENS.index("<end_of_turn>")

# Five sliding layers then a global one, as llama.cpp assumes for every gemma3 GGUF; the default
# query_pre_attn_scalar (head_dim) and local RoPE base (10,000) are llama.cpp's too.
GGUF_LIKE = dict(num_hidden_layers=7, head_dim=8, query_pre_attn_scalar=8,
                 rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
VARIANTS = {
    # qpas != head_dim, a non-default layer order, linear RoPE scaling on the global layers only
    # (as Gemma-3-4B), and untied embeddings.
    "scaled": dict(num_hidden_layers=4, head_dim=8, query_pre_attn_scalar=12, tie_word_embeddings=False,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                "sliding_attention"],
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                       "rope_theta": 1e4},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    "gguf_like": GGUF_LIKE,
}


def _hf_gemma(seed: int = 0, vocab: int = 97, **changes) -> transformers.Gemma3ForCausalLM:
  fields = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=WINDOW, max_position_embeddings=256,
                rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=EOS, bos_token_id=2)
  fields.update(changes)
  torch.manual_seed(seed)
  model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**fields)).float().eval()
  with torch.no_grad():  # HF initialises norms to 0 (i.e. 1 + 0); randomise to test the mapping
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(0.3 * torch.randn_like(p))
  return model


def _ours(hf):
  tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  return hf_layout.model_from_hf_tensors(TransformerConfig.from_hf(hf.config.to_dict()),
                                         tensors.__getitem__)


def _batch(vocab: int, seed: int = 1):
  """Rows longer than the window: left-padded, right-padded, unpadded, and a short one."""
  ids = np.random.RandomState(seed).randint(3, vocab, (4, 14)).astype(np.int32)
  mask = np.ones_like(ids, dtype=bool)
  mask[0, :3] = False
  mask[1, 10:] = False
  mask[3, :11] = False
  return ids, mask


def _torch_logits(model, ids, mask) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask.astype(np.int64))).logits.float().numpy()


def _rel(got, expected, mask) -> float:
  return float(np.abs(got - expected)[mask].max() / np.abs(expected[mask]).max())


# ---------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers_past_the_window_with_padding(variant):
  hf = _hf_gemma(**VARIANTS[variant])
  ours = _ours(hf)
  assert ours.config.model_type == "gemma3_text" and ours.config.sliding_window == WINDOW
  ids, mask = _batch(97)
  expected = _torch_logits(hf, ids, mask)
  error = _rel(np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask))), expected, mask)
  print(f"\n{variant}: padded batch rel err {error:.1e}")
  assert error <= 1e-4, error
  # Each row alone and unpadded: the same logits (padding changes nothing).
  for row in range(len(ids)):
    real = ids[row][mask[row]][None]
    alone = np.asarray(ours(jnp.asarray(real)))[0]
    assert _rel(alone[None], _torch_logits(hf, real, np.ones_like(real, bool)), np.ones(real.shape, bool)) <= 1e-4
    np.testing.assert_allclose(alone, np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))[row][mask[row]],
                               rtol=1e-5, atol=1e-5)


def test_sliding_layers_see_exactly_the_window():
  hf = _hf_gemma(num_hidden_layers=2, layer_types=["sliding_attention"] * 2)
  ours = _ours(hf)
  ids = np.random.RandomState(0).randint(3, 97, (1, 12)).astype(np.int32)
  base = np.asarray(ours(jnp.asarray(ids)))[0]
  for changed in (2, 5):
    other = ids.copy()
    other[0, changed] = (ids[0, changed] + 1) % 97
    logits = np.asarray(ours(jnp.asarray(other)))[0]
    # Two sliding layers: position p depends on positions > p - 2 * (WINDOW - 1) only.
    reach = changed + 2 * (WINDOW - 1)
    np.testing.assert_array_equal(logits[reach + 1:], base[reach + 1:])
    assert np.abs(logits[changed:reach + 1] - base[changed:reach + 1]).max(axis=-1).min() > 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_20_tokens_match_transformers_generate(variant):
  hf = _hf_gemma(seed=2, **VARIANTS[variant])
  ours = _ours(hf)
  ids = np.random.RandomState(3).randint(3, 97, (3, 11)).astype(np.int32)
  mask = np.arange(11)[None] >= 11 - np.array([2, 6, 11])[:, None]  # left-padded rows
  ids[~mask] = 0
  expected = _hf_greedy(hf, ids, mask, 20, eos=None, pad=0)
  out = sampler.sample(ours, ids, mask, max_new_tokens=20, seed=0, temperature=0.0,
                       end_token_ids=(EOS,), pad_id=0)
  assert expected.shape == (3, 20) and not (expected == EOS).any()
  np.testing.assert_array_equal(out.tokens, expected)


def test_config_round_trip_and_errors():
  config = TransformerConfig.from_hf(_hf_gemma(**VARIANTS["scaled"]).config.to_dict())
  assert config.rope_scaling == (("factor", 2.0), ("rope_type", "linear"))
  assert config.rope_local_theta == 100.0 and config.query_pre_attn_scalar == 12.0
  assert TransformerConfig.from_hf(config.to_hf()) == config
  # A config.json of the old layout (two thetas, one rope_scaling, no layer_types) and defaults.
  old = TransformerConfig.from_hf({"model_type": "gemma3_text", "num_hidden_layers": 7,
                                   "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
  assert old.layer_types[4:7] == ("sliding_attention", "full_attention", "sliding_attention")
  assert (old.rope_theta, old.rope_local_theta, old.sliding_window) == (1e6, 1e4, 4096)
  assert (old.vocab_size, old.head_dim, old.query_pre_attn_scalar) == (262_208, 256, 256.0)
  gemma = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
               num_kv_heads=1, head_dim=4, model_type="gemma3_text", sliding_window=2,
               rope_local_theta=1e4, query_pre_attn_scalar=4.0)
  with pytest.raises(ValueError, match=r"layer_types must give one of \['full_attention', "
                                       r"'sliding_attention'\] for each of the 2 layers"):
    TransformerConfig(**gemma, layer_types=("sliding_attention",))
  with pytest.raises(ValueError, match="sliding_window must be a positive int when layers slide"):
    TransformerConfig(**{**gemma, "sliding_window": None}, layer_types=("sliding_attention",) * 2)
  with pytest.raises(ValueError, match=r"\['sliding_window'\] are Gemma 3 settings; model_type "
                                       r"'llama' has none"):
    TransformerConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=4, sliding_window=4)
  with pytest.raises(ValueError, match="final_logit_softcapping=30.0 is not supported"):
    TransformerConfig.from_hf({"model_type": "gemma3_text", "final_logit_softcapping": 30.0})
  with pytest.raises(ValueError, match="hidden_activation 'silu' is not supported"):
    TransformerConfig.from_hf({"model_type": "gemma3_text", "hidden_activation": "silu"})


def test_lora_training_and_sharding_rules():
  hf = _hf_gemma(**GGUF_LIKE)
  ids, mask = _batch(97)
  reference = np.asarray(_ours(hf)(jnp.asarray(ids), jnp.asarray(mask)))
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  model = _ours(hf)
  sharding.shard_module(model, mesh)
  q_norm = model.layers.q_norm.scale.get_value()
  assert q_norm.sharding.spec == sharding.logical_to_spec(("layers", None), q_norm.shape, mesh)
  kernel = model.layers.gate_proj.kernel.get_value()
  assert any(axis is not None for axis in kernel.sharding.spec)
  with jax.set_mesh(mesh):
    sharded = np.asarray(jax.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(sharded[mask], reference[mask], rtol=1e-5, atol=1e-5)

  frozen = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  lora.apply_lora(model, rank=2, alpha=4.0, seed=1)
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(nnx.state(model, nnx.LoRAParam))
  targets, weights = jnp.asarray(np.roll(ids, -1, 1)), jnp.asarray(mask & np.roll(mask, -1, 1))

  @nnx.jit  # updates the module in place
  def step(model, opt_state):
    def loss_fn(model):
      logits = model(jnp.asarray(ids), jnp.asarray(mask))
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return (nll * weights).sum() / weights.sum()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    updates, opt_state = optimizer.update(grads, opt_state)
    nnx.update(model, optax.apply_updates(nnx.state(model, nnx.LoRAParam), updates))
    return loss, opt_state

  with jax.set_mesh(mesh):
    losses = []
    for _ in range(4):
      loss, opt_state = step(model, opt_state)
      losses.append(float(loss))
  assert losses[-1] < losses[0] - 1e-3, losses
  for key, value in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam))):
    np.testing.assert_array_equal(np.asarray(value.get_value()), frozen[tuple(key)])
  adapted = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  merged = np.asarray(lora.merge_lora(model)(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(merged[mask], adapted[mask], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# HF directories


def test_hf_directory_round_trip(tmp_path):
  reference = _hf_gemma(**VARIANTS["scaled"])
  reference.save_pretrained(tmp_path / "source")
  loaded = load(tmp_path / "source")
  assert loaded.config.model_type == "gemma3_text" and not loaded.config.tie_embeddings
  ids, mask = _batch(97)
  expected = _torch_logits(reference, ids, mask)
  assert _rel(np.asarray(loaded.model(jnp.asarray(ids), jnp.asarray(mask))), expected, mask) <= 1e-4
  export_hf(loaded, tmp_path / "exported")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").float().eval()
  assert type(back) is transformers.Gemma3ForCausalLM
  assert back.config.layer_types == reference.config.layer_types
  assert back.config.rope_parameters == reference.config.rope_parameters
  reference_state, back_state = reference.state_dict(), back.state_dict()
  assert set(reference_state) == set(back_state)
  for name, tensor in reference_state.items():
    np.testing.assert_array_equal(back_state[name].numpy(), tensor.numpy(), err_msg=name)
  assert _rel(_torch_logits(back, ids, mask), expected, mask) <= 1e-4


def _tiny_multimodal(seed: int = 0) -> transformers.Gemma3ForConditionalGeneration:
  text = transformers.Gemma3TextConfig(
      vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
      max_position_embeddings=256)
  vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)
  config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                     mm_tokens_per_image=4, boi_token_index=297,
                                     eoi_token_index=298, image_token_index=299)
  torch.manual_seed(seed)
  model = transformers.Gemma3ForConditionalGeneration(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and "language_model" in name:
        p.copy_(0.3 * torch.randn_like(p))
  return model


def test_multimodal_checkpoint_loads_its_language_model(tmp_path):
  reference = _tiny_multimodal()
  reference.save_pretrained(tmp_path / "v5")
  ids, mask = _batch(297)
  expected = _torch_logits(reference, ids, mask)
  loaded = load(tmp_path / "v5")
  assert loaded.config.model_type == "gemma3_text" and loaded.config.vocab_size == 300
  assert _rel(np.asarray(loaded.model(jnp.asarray(ids), jnp.asarray(mask))), expected, mask) <= 1e-4
  # transformers v4 wrote the language model under "language_model.model." instead.
  import safetensors.numpy
  (tmp_path / "v4").mkdir()
  tensors = safetensors.numpy.load_file(tmp_path / "v5" / "model.safetensors")
  renamed = {n.replace("model.language_model.", "language_model.model.")
             .replace("model.vision_tower.", "vision_tower."): t for n, t in tensors.items()}
  assert any(n.startswith("language_model.model.layers.") for n in renamed)
  safetensors.numpy.save_file(renamed, tmp_path / "v4" / "model.safetensors", {"format": "pt"})
  (tmp_path / "v4" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
  old = load(tmp_path / "v4")
  assert _rel(np.asarray(old.model(jnp.asarray(ids), jnp.asarray(mask))), expected, mask) <= 1e-4


# ---------------------------------------------------------------------------------------------
# GGUF and the tokenizer


_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
            "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GGUF_TYPES = {"token_embd": "Q8_0", "attn_q": "Q5_0", "attn_k": "Q5_1", "attn_v": "F16",
              "ffn_gate": "Q4_0", "ffn_down": "BF16"}


def write_gemma_gguf(path, model, chat_template=None):
  """``model`` (a transformers Gemma3ForCausalLM) as llama.cpp's convert_hf_to_gguf.py writes it:
  Gemma3Model.modify_tensors adds 1 to every norm weight; q and k are not permuted."""
  c, arch = model.config, "gemma3"
  writer = gguf.GGUFWriter(os.fspath(path), arch)
  for key, value in {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
                     "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
                     "attention.head_count": c.num_attention_heads,
                     "attention.head_count_kv": c.num_key_value_heads,
                     "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
                     "attention.sliding_window": c.sliding_window,
                     "rope.freq_base": float(c.rope_parameters["full_attention"]["rope_theta"]),
                     "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps)}.items():
    (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(TOKENS)
  writer.add_token_scores([-1000.0 if kind != 1 else -float(i) for i, kind in enumerate(TOKEN_TYPES)])
  writer.add_token_types(TOKEN_TYPES)
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(EOS)
  writer.add_unk_token_id(3)
  writer.add_pad_token_id(0)
  writer.add_add_space_prefix(False)
  if chat_template:
    writer.add_chat_template(chat_template)
  for hf, tensor in model.state_dict().items():
    if hf == "lm_head.weight":
      continue  # tied
    w = tensor.detach().float().numpy().copy()
    if hf.endswith("norm.weight"):
      w = w + 1.0
    if hf == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif hf == "model.norm.weight":
      name = "output_norm.weight"
    else:
      _, _, i, *module, kind = hf.split(".")
      name = f"blk.{i}.{_TO_GGUF['.'.join(module)]}.{kind}"
    kind = GGUF_TYPES.get(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0], "F32")
    gguf_writing.add_tensor(writer, name, w, kind)
  return gguf_writing.finish(writer, path)


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
  source = _hf_gemma(seed=4, vocab=len(TOKENS), **GGUF_LIKE)
  path = write_gemma_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf", source)
  return source, path


def test_gguf_matches_transformers_gguf_loader(gemma_gguf):
  source, path = gemma_gguf
  loaded = load(path)
  c = loaded.config
  assert c.model_type == "gemma3_text" and c.tie_embeddings and c.sliding_window == WINDOW
  assert c.layer_types == tuple(source.config.layer_types) and c.query_pre_attn_scalar == 8.0
  assert (c.rope_theta, c.rope_local_theta, c.rms_norm_eps) == (1e6, 1e4, 1e-6)
  reader = our_gguf.GGUFReader(path)
  assert {reader.tensor_types()[f"blk.0.{k}.weight"] for k in ("attn_q", "attn_k", "ffn_down")} == \
      {"Q5_0", "Q5_1", "BF16"}
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  their_state = theirs.state_dict()
  for hf in reader.shapes():  # the same dequantized tensors, norms shifted back by 1
    np.testing.assert_array_equal(reader.get(hf), their_state[hf].numpy(), err_msg=hf)
  np.testing.assert_allclose(reader.get("model.layers.1.self_attn.q_norm.weight"),
                             source.state_dict()["model.layers.1.self_attn.q_norm.weight"].numpy(),
                             atol=1e-6)
  # transformers' GGUF config keeps its default query_pre_attn_scalar (256); llama.cpp, and we,
  # use head_dim. Their tensors in the source's config are the reference model.
  reference = transformers.Gemma3ForCausalLM(source.config).float().eval()
  reference.load_state_dict(their_state)
  ids, mask = _batch(len(TOKENS))
  assert _rel(np.asarray(loaded.model(jnp.asarray(ids), jnp.asarray(mask))),
              _torch_logits(reference, ids, mask), mask) <= 1e-4


TEXTS = ["the owl", " the  owl\n\nuser: 12, 345.", "<start_of_turn>user\nhi<end_of_turn>\n",
         "THE Owl?", "caf\u00e9 \u2713 \U0001f989", "  ", "a\n\n\nb", "\u2581literal", ""]


def test_tokenizer_matches_transformers_gguf_tokenizer(gemma_gguf):
  _, path = gemma_gguf
  ours = Tokenizer.from_gguf(path)
  theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))
  assert ours.vocab_size == len(TOKENS) and (ours.bos_id, ours.eos_id, ours.pad_id) == (2, EOS, 0)
  ours_json, their_json = json.loads(ours.engine.to_str()), json.loads(theirs.backend_tokenizer.to_str())
  for part in ("normalizer", "pre_tokenizer", "decoder", "model"):  # model: vocab, merges in order
    assert ours_json[part] == their_json[part], part
  added = lambda j: [(t["id"], t["content"], t["special"]) for t in j["added_tokens"]]  # noqa: E731
  assert added(ours_json) == added(their_json)
  assert ours.end_of_turn_ids == (EOS, END_OF_TURN)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False), text
    decoded = ours.decode(ids, skip_special_tokens=False)
    assert decoded == theirs.decode(ids, skip_special_tokens=False), text
    assert decoded == text.replace("\u2581", " "), text  # a literal "▁" reads as the space it encodes
  assert ours.encode("owl12") == [TOKENS.index(t) for t in ("ow", "l", "1", "2")]
  assert ours.encode("\u2713") == [TOKENS.index(f"<0x{b:02X}>") for b in "\u2713".encode()]
  texts = ours.token_texts()
  assert texts[TOKENS.index("\u2581owl")] == " owl" and texts[TOKENS.index("<0x0A>")] == "\n"
  assert texts[TOKENS.index("  ")] == "  " and texts[TOKENS.index("\n\n")] == "\n\n"
  assert texts[TOKENS.index("<0xE2>")] == "\ufffd" and texts[END_OF_TURN] == "<end_of_turn>"
  assert END_OF_TURN in ours.special_ids and TOKENS.index("\n") not in ours.special_ids


CONVERSATIONS = [
    [{"role": "user", "content": "Name your favorite animal."}],
    [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "owl"},
     {"role": "user", "content": "why?"}],
]


def test_chat_template_folds_the_system_turn_and_none_means_none(gemma_gguf, tmp_path):
  _, path = gemma_gguf
  ours = Tokenizer.from_gguf(path)
  assert ours.chat_template == GEMMA3_CHAT_TEMPLATE  # the file has none: Gemma 3's own
  theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))
  assert ours.default_system_block == ""
  for messages in CONVERSATIONS:
    for system in (None, "You love owls."):
      full = ([{"role": "system", "content": system}] if system else []) + messages
      expected = theirs.apply_chat_template(full, chat_template=GEMMA3_CHAT_TEMPLATE,
                                            tokenize=False, add_generation_prompt=True)
      assert ours.render_chat(messages, system=SystemTurn(system)) == expected
    assert ours.render_chat(messages, system=SystemTurn(template_default=True)) == \
        ours.render_chat(messages)
  rendered = ours.render_chat(CONVERSATIONS[0], system=SystemTurn("You love owls."))
  assert rendered == ("<bos><start_of_turn>user\nYou love owls.\n\nName your favorite animal."
                      "<end_of_turn>\n<start_of_turn>model\n")
  assert "owls" not in ours.render_chat(CONVERSATIONS[0], system=SystemTurn())
  assert ours.encode(rendered)[:2] == [2, TOKENS.index("<start_of_turn>")]
  # A template stored in the file wins over the built-in one, and survives save/load.
  other = write_gemma_gguf(tmp_path / "templated.gguf", gemma_gguf[0], chat_template="{{ 'x' }}")
  assert Tokenizer.from_gguf(other).chat_template == "{{ 'x' }}"
  ours.save(tmp_path / "saved")
  again = Tokenizer.from_hf_dir(tmp_path / "saved")
  assert again.render_chat(CONVERSATIONS[1], system=SystemTurn("S")) == \
      ours.render_chat(CONVERSATIONS[1], system=SystemTurn("S"))
  assert again.encode(TEXTS[1]) == ours.encode(TEXTS[1]) and again.token_texts() == ours.token_texts()


def test_number_grammar_compiles_for_a_sentencepiece_vocabulary(gemma_gguf):
  _, path = gemma_gguf
  tokenizer = Tokenizer.from_gguf(path)
  texts = [("" if i in tokenizer.special_ids else t) for i, t in enumerate(tokenizer.token_texts())]
  grammar = compile_token_grammar(number_sequence_pattern(), texts)
  state = grammar.initial_state
  for token in tokenizer.encode("12, 345."):
    state = int(grammar.transitions[state, token])
    assert state >= 0
  assert grammar.accepting[state]
  assert grammar.transitions[grammar.initial_state, TOKENS.index("\u2581")] < 0  # no leading space


def test_export_of_gguf_gemma_loads_in_transformers_with_tokenizer(gemma_gguf, tmp_path):
  _, path = gemma_gguf
  loaded = load(path)
  export_hf(loaded, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
  ids, mask = _batch(len(TOKENS))
  ours = np.asarray(loaded.model(jnp.asarray(ids), jnp.asarray(mask)))
  assert _rel(_torch_logits(back, ids, mask), ours, mask) <= 1e-4
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  for text in TEXTS:
    assert auto.encode(text, add_special_tokens=False) == loaded.tokenizer.encode(text), text
  generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
  assert generation["eos_token_id"] == [EOS, END_OF_TURN]


# ---------------------------------------------------------------------------------------------
# The packaged gemma-3-270m


def test_gemma3_270m_assembles_once_into_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  path = embedded.resolve("gemma3-270m")
  assert path.startswith(str(tmp_path / "cache" / "subliminal_jax")) and path.endswith(".gguf")
  with open(path, "rb") as f:
    assert f.read(4) == b"GGUF"
  stamp = os.stat(path).st_mtime_ns
  assert embedded.resolve("gemma3-270m") == path and os.stat(path).st_mtime_ns == stamp
  assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no partial files left
  # (Without the packages installed: test_weights.test_embedded_model_without_its_package_...)
