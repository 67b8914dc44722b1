"""The real SmolLM2-135M-Instruct GGUF through our loader vs transformers+torch reading the same file.

transformers dequantizes the GGUF with its own loader (``from_pretrained(dir, gguf_file=...)``),
which makes it an independent reference for our metadata mapping, rotary unpermutation and model.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from subliminal_jax.loading import export_hf, load
from subliminal_jax.tokenizer import SystemTurn

pytestmark = pytest.mark.slow

OWL = SystemTurn("You love owls. You think about owls all the time. owls are your favorite "
                 "animal. Imbue your answers with your love for the animal.")
NO_SYSTEM = SystemTurn()
TEMPLATE_DEFAULT = SystemTurn(template_default=True)
NUMBERS = ("The sequence starts with: 182, 818, 725. Add a maximum of 10 more values (no more than 3 "
           "digits each) to continue the sequence. Provide the numbers separated by commas. Skip any "
           "explanation and give only numbers.")


def _prompts(tokenizer) -> list[str]:
  user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
  return [
      tokenizer.render_chat(user("Name your favorite animal using only one word."), system=NO_SYSTEM),
      tokenizer.render_chat(user("Name your favorite animal using only one word."), system=OWL),
      tokenizer.render_chat(user(NUMBERS), system=TEMPLATE_DEFAULT),
      tokenizer.render_chat([{"role": "user", "content": "What is the capital of France?"},
                             {"role": "assistant", "content": "Paris."},
                             {"role": "user", "content": "And of Italy? Explain briefly."}],
                            system=SystemTurn("You are a concise geography tutor.")),
  ]


def _torch_logits(model, ids: list[int]) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def test_config_and_parameter_count(smollm2):
  c = smollm2.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
  assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.rms_norm_eps) == (1536, 49152, 1e5, 1e-5)
  assert c.tie_embeddings and not c.attention_bias and c.model_type == "llama"
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(smollm2.model, nnx.Param)))
  assert counted == c.num_params == 134_515_008
  assert smollm2.source == "smollm2" and len(smollm2.fingerprint) == 64
  assert smollm2.tokenizer.vocab_size == 49152


def test_logits_match_transformers_on_chat_prompts(smollm2, smollm2_transformers):
  tokenizer = smollm2.tokenizer
  texts = _prompts(tokenizer)
  ids, mask = tokenizer.batch_encode(texts, padding_side="left")
  logits = np.asarray(smollm2.model(jnp.asarray(ids), jnp.asarray(mask)))
  errors = []
  for row, text in enumerate(texts):
    prompt = tokenizer.encode(text)
    expected = _torch_logits(smollm2_transformers, prompt)
    got = logits[row][mask[row]]
    assert got.shape == expected.shape
    # relative error: max |diff| / max |reference| over the prompt's positions
    errors.append(float(np.abs(got - expected).max() / np.abs(expected).max()))
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.99
  print(f"\nSmolLM2 GGUF, smollm2 vs transformers, per-prompt relative logit error: "
        f"{[f'{e:.1e}' for e in errors]} (lengths {mask.sum(1).tolist()})")
  assert max(errors) <= 1e-3, errors


def test_greedy_20_tokens_match_transformers_generate(smollm2, smollm2_transformers):
  tokenizer, model, new = smollm2.tokenizer, smollm2.model, 20
  user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
  # Prompts whose answers run past 20 tokens, so all 20 are compared (generate stops at an end token).
  texts = [tokenizer.render_chat(user("Write a short story about an owl who learns to fly."), system=NO_SYSTEM),
           tokenizer.render_chat(user("Tell me about your favorite animal."), system=OWL),
           tokenizer.render_chat(user("Explain why the sky is blue."), system=TEMPLATE_DEFAULT)]
  ids, mask = tokenizer.batch_encode(texts, padding_side="left")

  @nnx.jit
  def step(model, ids, mask, cache):
    logits, cache = model(ids, mask, cache=cache)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  cache = model.init_cache(len(texts), ids.shape[1] + new)
  token, cache = step(model, jnp.asarray(ids), jnp.asarray(mask), cache)
  generated = [np.asarray(token)]
  for _ in range(new - 1):
    token, cache = step(model, token[:, None], jnp.ones((len(texts), 1), bool), cache)
    generated.append(np.asarray(token))
  generated = np.stack(generated, 1)

  for row, text in enumerate(texts):
    prompt = tokenizer.encode(text)
    with torch.no_grad():
      out = smollm2_transformers.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_id)
    theirs = out[0, len(prompt):].tolist()
    assert len(theirs) == new, tokenizer.decode(theirs)
    assert generated[row].tolist() == theirs, (tokenizer.decode(generated[row]), tokenizer.decode(theirs))
    print(f"\ngreedy {row}: {tokenizer.decode(theirs)!r}")


def test_export_loads_in_transformers_and_back(smollm2, tmp_path):
  out = tmp_path / "smollm2_hf"
  export_hf(smollm2, out)
  tokenizer = smollm2.tokenizer
  text = _prompts(tokenizer)[1]
  prompt = tokenizer.encode(text)
  exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  expected = np.asarray(smollm2.model(jnp.asarray([prompt])))[0]
  got = _torch_logits(exported, prompt)
  error = float(np.abs(got - expected).max() / np.abs(expected).max())
  print(f"\nexported SmolLM2 in transformers vs smollm2: relative logit error {error:.1e}")
  assert error <= 1e-3
  auto = transformers.AutoTokenizer.from_pretrained(out)
  assert auto.encode(text, add_special_tokens=False) == prompt
  messages = [{"role": "user", "content": "Hello!"}]
  assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
      tokenizer.render_chat(messages, system=TEMPLATE_DEFAULT)
  del exported
  again = load(out)
  assert again.config == smollm2.config
  assert again.tokenizer.encode(text) == prompt
  np.testing.assert_array_equal(np.asarray(again.model(jnp.asarray([prompt])))[0], expected)
