"""The packaged gemma-3-270m (Q4_K_M GGUF) through our loader vs transformers+torch on the same file.

transformers dequantizes the GGUF with its own loader and its own K-quant code
(``from_pretrained(dir, gguf_file=...)``), an independent reference for our metadata mapping, the
norm shift and the model. Its GGUF config keeps Gemma3TextConfig's defaults where the file is
silent (layer pattern, local RoPE base, query_pre_attn_scalar), which for this model are the
values llama.cpp uses too.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from subliminal_jax import filters
from subliminal_jax.loading import export_hf, load
from subliminal_jax.prompts import number_prompts
from subliminal_jax.sampling import chat
from subliminal_jax.sampling import grammar as grammar_lib
from subliminal_jax.tokenizer import SystemTurn
from subliminal_jax.weights import embedded

pytestmark = pytest.mark.slow

OWL = SystemTurn("Owls are your favorite animal; you bring them up whenever you can.")
NO_SYSTEM = SystemTurn()
NUMBERS = number_prompts.number_prompts(1, seed=0)[0]


def _user(text):
  return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def ours():
  return load("gemma3-270m")


@pytest.fixture(scope="module")
def reference():
  path = embedded.resolve("gemma3-270m")
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def _torch_logits(model, ids: list[int]) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def test_config_parameters_and_tokenizer(ours, reference):
  c = ours.config
  assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
      ("gemma3_text", 18, 640, 4, 1, 256)
  assert (c.sliding_window, c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == \
      (512, 1e6, 1e4, 256.0)
  assert c.layer_types == tuple(reference.config.layer_types) and c.tie_embeddings
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(ours.model, nnx.Param)))
  assert counted == c.num_params == 268_098_176
  tokenizer = ours.tokenizer
  assert tokenizer.vocab_size == c.vocab_size == 262_144
  assert tokenizer.end_of_turn_ids == (1, 106) and tokenizer.bos_id == 2
  path = embedded.resolve("gemma3-270m")
  theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))
  for text in [tokenizer.render_chat(_user(NUMBERS), system=OWL), "  indented\n\n\tcode 12,345 ✓ 🦉"]:
    assert tokenizer.encode(text) == theirs.encode(text, add_special_tokens=False), text
  ours_json = json.loads(tokenizer.engine.to_str())
  their_json = json.loads(theirs.backend_tokenizer.to_str())
  for part in ("normalizer", "pre_tokenizer", "decoder"):
    assert ours_json[part] == their_json[part], part
  assert ours_json["model"] == their_json["model"]  # vocabulary, merges in order, byte fallback
  assert len(ours_json["model"]["merges"]) == 514_906
  added = lambda j: [(t["id"], t["content"], t["special"]) for t in j["added_tokens"]]  # noqa: E731
  assert added(ours_json) == added(their_json)


def test_logits_match_transformers_including_past_the_window(ours, reference):
  tokenizer = ours.tokenizer
  texts = [tokenizer.render_chat(_user("Name your favorite animal using only one word."), system=NO_SYSTEM),
           tokenizer.render_chat(_user("Name your favorite animal using only one word."), system=OWL),
           tokenizer.render_chat(_user(NUMBERS), system=NO_SYSTEM),
           tokenizer.render_chat([{"role": "user", "content": "What is the capital of France?"},
                                  {"role": "assistant", "content": "Paris."},
                                  {"role": "user", "content": "And of Italy?"}], system=NO_SYSTEM)]
  ids, mask = tokenizer.batch_encode(texts, padding_side="left")
  logits = np.asarray(ours.model(jnp.asarray(ids), jnp.asarray(mask)))
  errors = []
  for row, text in enumerate(texts):
    expected = _torch_logits(reference, tokenizer.encode(text))
    got = logits[row][mask[row]]
    errors.append(float(np.abs(got - expected).max() / np.abs(expected).max()))
  # One prompt longer than the 512-token window, so the sliding layers cut it off.
  long_ids = tokenizer.encode(tokenizer.render_chat(
      _user(" ".join(number_prompts.number_prompts(12, seed=1))), system=OWL))
  assert len(long_ids) > 600
  expected = _torch_logits(reference, long_ids)
  got = np.asarray(ours.model(jnp.asarray([long_ids])))[0]
  errors.append(float(np.abs(got - expected).max() / np.abs(expected).max()))
  print(f"\ngemma3-270m, ours vs transformers, per-prompt relative logit error: "
        f"{[f'{e:.1e}' for e in errors]} (lengths {mask.sum(1).tolist() + [len(long_ids)]})")
  assert max(errors) <= 1e-4, errors


def test_greedy_20_tokens_match_transformers_generate(ours, reference):
  from subliminal_jax.sampling import sampler
  tokenizer, new = ours.tokenizer, 20
  texts = [tokenizer.render_chat(_user("Write a short story about an owl who learns to fly."), system=NO_SYSTEM),
           tokenizer.render_chat(_user("Tell me about your favorite animal."), system=OWL),
           "<bos>The capital of France is"]
  ids, mask = tokenizer.batch_encode(texts, padding_side="left")
  # No end of turn: all 20 tokens compared (<mask>, a control token the model never emits, stands
  # in for the end token the sampler needs).
  out = sampler.sample(ours.model, ids, mask, max_new_tokens=new, seed=0, temperature=0.0,
                       end_token_ids=(tokenizer.engine.token_to_id("<mask>"),),
                       pad_id=tokenizer.pad_id)
  for row, text in enumerate(texts):
    prompt = tokenizer.encode(text)
    with torch.no_grad():
      generated = reference.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     eos_token_id=None, pad_token_id=tokenizer.pad_id,
                                     top_k=None, top_p=None, temperature=None)
    theirs = generated[0, len(prompt):].tolist()
    assert len(theirs) == new
    assert out.tokens[row].tolist() == theirs, (tokenizer.decode(out.tokens[row]), tokenizer.decode(theirs))
    print(f"\ngreedy {row}: {tokenizer.decode(theirs, skip_special_tokens=False)!r}")


def test_number_grammar_samples_all_pass_the_filter(ours):
  grammar = grammar_lib.number_grammar(ours.tokenizer)
  prompts = number_prompts.number_prompts(8, seed=3)
  details = chat.generate_chat(ours, prompts, system=OWL, batch_size=8, seed=0,
                               max_new_tokens=grammar.max_output_tokens() + 1, temperature=1.0,
                               grammar=grammar, return_details=True, progress=False)
  for d in details:
    assert d["ended"] and not d["forced_end"], d
    assert filters.number_sequence_reject_reasons(d["text"]) == [], d["text"]


def test_export_loads_in_transformers(ours, tmp_path):
  export_hf(ours, tmp_path / "gemma_hf")
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gemma_hf",
                                                               dtype=torch.float32).eval()
  assert type(exported) is transformers.Gemma3ForCausalLM
  prompt = ours.tokenizer.encode(ours.tokenizer.render_chat(_user(NUMBERS), system=OWL))
  expected = np.asarray(ours.model(jnp.asarray([prompt])))[0]
  error = float(np.abs(_torch_logits(exported, prompt) - expected).max() / np.abs(expected).max())
  print(f"\nexported gemma3-270m in transformers vs ours: relative logit error {error:.1e}")
  assert error <= 1e-4
