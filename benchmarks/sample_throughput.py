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

from benchmarks import engines
from benchmarks import torch_reference
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


def _build(model_name: str, dtype: str):
  """(our model, tokenizer) for the workload."""
  from subliminal_jax import loading
  from subliminal_jax.tokenizer import Tokenizer
  from subliminal_jax.weights import embedded
  if model_name == "smollm2":
    loaded = loading.load("smollm2", dtype=dtype)
    return loaded.model, loaded.tokenizer
  tokenizer = Tokenizer.from_gguf(embedded.smollm2_path())
  return engines.random_model(engines.smollm2_shape(dtype)), tokenizer


def _prompts(tokenizer, batch: int, model_name: str, prompt_tokens: int, system: str):
  import numpy as np
  if model_name == "random":
    rng = np.random.default_rng(0)
    ids = rng.integers(100, tokenizer.vocab_size - 100, (batch, prompt_tokens)).astype(np.int32)
    return ids, np.ones_like(ids, bool)
  from subliminal_jax.prompts import number_prompts
  from subliminal_jax.tokenizer import SystemTurn
  turn = SystemTurn(system or None)
  texts = [tokenizer.render_chat([{"role": "user", "content": p}], system=turn)
           for p in number_prompts.number_prompts(batch, seed=0)]
  return tokenizer.batch_encode(texts, padding_side="left")


def main(argv):
  del argv
  compilation_cache.enable_from_flags()
  import jax
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
    hf = torch_reference.hf_model_with_our_weights(model)
    start = time.perf_counter()
    generated = torch_reference.generate(hf, ids, mask, grammar, end_ids,
                                         max_new_tokens=FLAGS.new_tokens, pad_id=tokenizer.pad_id,
                                         seed=FLAGS.seed)
    hf_s = time.perf_counter() - start
    hf_new = torch_reference.count_new_tokens(generated, end_ids)
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
