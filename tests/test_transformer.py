"""The decoder itself: parity with transformers' PyTorch Llama/Qwen2, padding, KV cache, config errors."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from flax import nnx

from subliminal_jax.models.transformer import Transformer, TransformerConfig, resolve_remat
from subliminal_jax.weights import hf_layout


def _tiny_hf(model_type: str, **extra):
  cls = transformers.LlamaConfig if model_type == "llama" else transformers.Qwen2Config
  config = cls(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rope_theta=10000.0, **extra)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  ours = hf_layout.model_from_hf_tensors(TransformerConfig.from_hf(config.to_dict()), tensors.__getitem__)
  return model, ours


def _padded_batch(vocab: int):
  ids = np.random.RandomState(1).randint(0, vocab, (3, 11))
  mask = np.ones_like(ids, dtype=bool)
  mask[0, :4] = False  # left padded
  mask[1, 8:] = False  # right padded
  return ids, mask


@pytest.mark.parametrize("model_type,extra", [
    ("llama", dict(tie_word_embeddings=True)),
    ("qwen2", dict(tie_word_embeddings=False)),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
])
def test_logits_match_transformers_on_padded_batch(model_type, extra):
  reference, ours = _tiny_hf(model_type, **extra)
  ids, mask = _padded_batch(97)
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids),
                         attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  rel = np.abs(got - expected)[mask].max() / np.abs(expected[mask]).max()
  assert rel <= 1e-5, rel


def _tiny_model(**changes) -> Transformer:
  config = TransformerConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=3,
                             num_heads=4, num_kv_heads=2, head_dim=8, **changes)
  return Transformer(config, rngs=nnx.Rngs(0))


def test_padding_side_does_not_change_real_token_logits():
  model = _tiny_model()
  ids = np.random.RandomState(0).randint(0, 61, (1, 6))
  plain = np.asarray(model(jnp.asarray(ids)))
  left = np.concatenate([np.zeros((1, 3), int), ids], 1)
  right = np.concatenate([ids, np.zeros((1, 3), int)], 1)
  left_mask = np.arange(9)[None] >= 3
  right_mask = np.arange(9)[None] < 6
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(left), jnp.asarray(left_mask)))[:, 3:], plain,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(right), jnp.asarray(right_mask)))[:, :6],
                             plain, rtol=1e-5, atol=1e-5)


# Gemma 3: a window of 3 real tokens, shorter than the prompts, on the first and last layer.
GEMMA = dict(model_type="gemma3_text", sliding_window=3, rope_local_theta=1e4,
             query_pre_attn_scalar=8.0,
             layer_types=("sliding_attention", "full_attention", "sliding_attention"))


@pytest.mark.parametrize("changes", [dict(attention_bias=True), GEMMA], ids=["qwen2_like", "gemma3"])
def test_cached_decoding_equals_full_forward(changes):
  model = _tiny_model(**changes)
  ids, mask = _padded_batch(61)
  ids, mask = ids[[0, 2]], mask[[0, 2]]  # left-padded and unpadded rows
  full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  cache = model.init_cache(2, 16)
  logits, cache = model(jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]), cache=cache)
  steps = [np.asarray(logits)]
  for t in range(6, ids.shape[1]):
    logits, cache = model(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache=cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, 1)[mask], full[mask], rtol=1e-5, atol=1e-5)
  assert int(cache.length) == ids.shape[1]
  np.testing.assert_array_equal(np.asarray(cache.next_position), mask.sum(1))


def test_bfloat16_compute_stays_close_to_float32():
  model32 = _tiny_model()
  model16 = _tiny_model(dtype="bfloat16")
  ids = np.random.RandomState(0).randint(0, 61, (2, 7))
  a = np.asarray(model32(jnp.asarray(ids)))
  b = np.asarray(model16(jnp.asarray(ids)))
  assert b.dtype == np.float32
  assert np.abs(a - b).max() / np.abs(a).max() < 0.05


def test_num_params_counts_every_parameter():
  model = _tiny_model(tie_embeddings=False, attention_bias=True)
  counted = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
  assert counted == model.config.num_params


def test_config_errors_name_the_bad_value():
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*llama.*qwen2"):
    TransformerConfig.from_hf({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
    TransformerConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=6,
                      num_kv_heads=4, head_dim=4)
  with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
    TransformerConfig.from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"},
                               "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                               "num_hidden_layers": 1, "num_attention_heads": 2})


def _loss_and_grads(model: Transformer, ids):
  def loss(m):
    return jnp.mean(jax.nn.log_softmax(m(ids)[:, :-1]) * jax.nn.one_hot(ids[:, 1:], 61))
  return nnx.value_and_grad(loss)(model)


@pytest.mark.parametrize("remat", ["dots", "full", True])
def test_remat_policies_give_the_gradients_of_keeping_everything(remat):
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 12)), jnp.int32)
  kept_loss, kept = _loss_and_grads(_tiny_model(), ids)
  model = _tiny_model(remat=remat)
  loss, grads = _loss_and_grads(model, ids)
  np.testing.assert_allclose(loss, kept_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(kept)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The layer scan's body really is a checkpoint, with the policy asked for.
  policy = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}.get(remat)
  jaxpr = str(jax.make_jaxpr(lambda m: _loss_and_grads(m, ids)[0])(model))
  assert f"policy={policy!r}" in jaxpr


def test_remat_auto_is_dots_on_cpu_and_none_elsewhere():
  assert resolve_remat("auto", "cpu") == "dots"
  assert resolve_remat("auto", "gpu") == "none" and resolve_remat("auto", "tpu") == "none"
  assert resolve_remat("full", "cpu") == "full"
  assert _tiny_model(remat=False).config.remat == "none"
  no_remat = str(jax.make_jaxpr(lambda m: m(jnp.zeros((1, 4), jnp.int32)))(_tiny_model()))
  assert "policy=" not in no_remat and "prevent_cse" not in no_remat
  with pytest.raises(ValueError, match=r"remat='some'; expected one of \['none', 'dots'"):
    _tiny_model(remat="some")


def test_hf_config_round_trip():
  config = TransformerConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=3,
                             num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e5,
                             tie_embeddings=True, model_type="qwen2", attention_bias=True)
  assert TransformerConfig.from_hf(config.to_hf()) == config
