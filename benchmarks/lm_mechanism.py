"""Measurements of the LM mechanism tools (docs/mechanism_lm.md quotes them).

  PYTHONPATH=. .venv/bin/python -m benchmarks.lm_mechanism --part tiny --out /tmp/lm_mechanism
  PYTHONPATH=. .venv/bin/python -m benchmarks.lm_mechanism --part real --out /tmp/lm_mechanism

tiny: a 2-layer, 32-wide decoder (vocab 128). The theorem check (full / LoRA, KL / sampled,
SGD / Adam) over epsilons, alignment along training with plots, and the projection defense
against a trait-gradient teacher.

real: SmolLM2-135M-Instruct with LoRA r8 (alpha 8): the owl trait direction, the theorem check with
the trait direction as the teacher's displacement, divergence tokens of owl-prompted number
sequences, token attributions along the trait direction (and the share carried by divergence
tokens), and a short projection-defense run. Sized for a 2-core CPU (several minutes).
Writes results.json and PNG plots into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
import optax
from flax import nnx

from subliminal_jax import compilation_cache
from subliminal_jax import lora
from subliminal_jax.mechanism import divergence_tokens as dt
from subliminal_jax.mechanism import lm_alignment as la
from subliminal_jax.mechanism import model_params as mp
from subliminal_jax.mechanism import projection as pj
from subliminal_jax.mechanism import token_attribution as ta
from subliminal_jax.mechanism import trait_direction as td
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.tokenizer import SystemTurn


def _jitted_trait(queries):
  """model -> T, compiled once per graph (the eager path would run op by op)."""
  fn = jax.jit(lambda graphdef, state: td.trait_logprob(nnx.merge(graphdef, state), queries),
               static_argnums=0)
  return lambda model: float(fn(*nnx.split(model)))


def _projection_runs(model, direction, queries, *, wrt, epsilon, steps, learning_rate, every,
                     batch_size, length, record_every, seed=0):
  graphdef, params, rest = mp.split_params(model, wrt)
  reestimate = jax.grad(td.trait_objective_fn(graphdef, rest, queries))
  trait_fn = _jitted_trait(queries)
  runs = {}
  for name, optimizer in (
      ("adam", optax.adam(learning_rate)),
      ("adam + fixed projection", optax.chain(optax.adam(learning_rate), pj.project_out(direction))),
      (f"adam + projection re-estimated every {every}",
       optax.chain(optax.adam(learning_rate), pj.project_out(direction, reestimate=reestimate,
                                                             every=every)))):
    start = time.perf_counter()
    runs[name] = la.alignment_over_training(model, direction, epsilon=epsilon, steps=steps,
                                            optimizer=optimizer, wrt=wrt, batch_size=batch_size,
                                            length=length, seed=seed, trait_fn=trait_fn,
                                            record_every=record_every, progress=True)
    print(f"  {name}: trait change {runs[name]['trait'][-1]:+.4f}, cosine "
          f"{runs[name]['cosine'][-1]:+.4f} ({time.perf_counter() - start:.0f} s)")
  return runs


def _history_record(h):
  return {k: [float(x) for x in v] for k, v in h.items()}


def tiny(out: str) -> dict:
  config = TransformerConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)
  results = {"theorem": {}, "training": {}, "projection": {}}
  for variant in ("full", "lora"):
    model = Transformer(config, rngs=nnx.Rngs(0))
    wrt = nnx.Param
    if variant == "lora":
      lora.apply_lora(model, rank=4, alpha=8, seed=0)
      wrt = nnx.LoRAParam
    for kind in ("kl", "sampled"):
      for opt_name, optimizer in (("sgd", None), ("adam", optax.adam(1e-3))):
        if kind == "sampled" and opt_name == "adam":
          continue
        start = time.perf_counter()
        check = la.theorem_check(model, wrt=wrt, epsilons=(1e-3, 1e-2, 1e-1, 1.0),
                                 seeds=(0, 1, 2, 3), inputs_per_seed=4, batch_size=4, length=16,
                                 imitation_kind=kind, optimizer=optimizer)
        key = f"{variant}/{kind}/{opt_name}"
        results["theorem"][key] = check.summary()
        print(key, f"({time.perf_counter() - start:.0f} s)")
        for row in check.summary():
          print("  ", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    _, params, _ = mp.split_params(model, wrt)
    histories = {}
    for opt_name, optimizer in (("sgd 0.05", optax.sgd(0.05)), ("adam 1e-3", optax.adam(1e-3))):
      for kind in ("kl", "sampled"):
        histories[f"{variant} {kind} {opt_name}"] = la.alignment_over_training(
            model, mp.random_direction(params, 0), epsilon=0.1, steps=100, optimizer=optimizer,
            wrt=wrt, imitation_kind=kind, batch_size=4, length=16, record_every=5)
    results["training"].update({k: _history_record(h) for k, h in histories.items()})
    la.plot_alignment(histories, os.path.join(out, f"tiny_alignment_{variant}.png"),
                      title=f"tiny decoder ({variant}), random teacher displacement, eps 0.1")
  # The projection defense against a trait-gradient teacher (full parameters).
  model = Transformer(config, rngs=nnx.Rngs(4))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, 128, size=n).tolist() for n in (5, 7, 6, 9)]
  boundary = np.zeros(128, bool)
  boundary[:5] = True
  queries = td.trait_queries_from_ids(prompts, [[7], [8, 9]], boundary=boundary)
  direction = td.trait_direction(model, queries)
  print("projection defense, tiny full model, teacher = theta0 + 0.3 * unit trait gradient")
  runs = _projection_runs(model, direction.unit, queries, wrt=nnx.Param, epsilon=0.3, steps=60,
                          learning_rate=1e-3, every=5, batch_size=4, length=16, record_every=5)
  results["projection"] = {k: _history_record(h) for k, h in runs.items()}
  la.plot_alignment(runs, os.path.join(out, "tiny_projection.png"),
                    title="tiny decoder: projection defense vs a trait-gradient teacher")
  return results


def real(out: str, questions_count: int, samples: int) -> dict:
  from subliminal_jax import loading
  from subliminal_jax.evaluation import questions as ql
  from subliminal_jax.prompts.number_prompts import number_prompts
  from subliminal_jax.sampling import grammar as grammar_lib

  results = {}
  start = time.perf_counter()
  loaded = loading.load("smollm2")
  model, tokenizer = loaded.model, loaded.tokenizer
  lora.apply_lora(model, rank=8, alpha=8, seed=0)
  wrt = nnx.LoRAParam
  results["load_s"] = time.perf_counter() - start
  questions = ql.preference_questions("animal", count=questions_count)
  queries = td.trait_queries(tokenizer, questions, "owl", vocab_size=model.config.vocab_size)
  start = time.perf_counter()
  direction = td.trait_direction(model, queries, wrt=wrt, chunk_rows=16, progress=True)
  owl_system = SystemTurn("You love owls. You think about owls all the time. owls are your "
                          "favorite animal. Imbue your answers with your love for the animal.")
  owl_queries = td.trait_queries(tokenizer, questions, "owl", system=owl_system,
                                 vocab_size=model.config.vocab_size)
  results["trait"] = {"questions": questions_count, "rows": queries.num_rows, "value": direction.value,
                      "value_with_owl_system_prompt": trait_fn_value(model, owl_queries),
                      "gradient_norm": direction.norm,
                      "seconds": time.perf_counter() - start,
                      "lora_parameters": mp.num_parameters(direction.gradient)}
  print("trait", results["trait"])

  # Theorem check: the teacher is theta0 + eps * (unit trait direction) in the adapters.
  start = time.perf_counter()
  check = la.theorem_check(model, wrt=wrt, epsilons=(0.1, 1.0), seeds=(0, 1), inputs_per_seed=2,
                           batch_size=2, length=32, direction=direction.unit, progress=True)
  results["theorem_trait_direction"] = check.summary()
  random_check = la.theorem_check(model, wrt=wrt, epsilons=(0.1,), seeds=(0, 1), inputs_per_seed=1,
                                  batch_size=2, length=32, progress=True)
  results["theorem_random_direction"] = random_check.summary()
  results["theorem_seconds"] = time.perf_counter() - start
  graphdef, params, rest = mp.split_params(model, wrt)
  objective = jax.jit(td.trait_objective_fn(graphdef, rest, queries))
  for eps in (0.1, 1.0):
    results.setdefault("teacher_trait_gain", {})[str(eps)] = float(
        objective(mp.displaced(params, direction.unit, eps)) - direction.value)
  print("theorem", results["theorem_trait_direction"], results["theorem_random_direction"])

  # Owl-prompted number sequences, their divergence tokens and token attributions.
  start = time.perf_counter()
  prompts = number_prompts(samples, seed=0)
  grammar = grammar_lib.compile_token_grammar(
      grammar_lib.number_sequence_pattern(", "), tokenizer.token_texts(),
      disallowed_ids=tokenizer.special_ids)
  examples = sample_examples(model, tokenizer, prompts, owl_system, grammar)
  results["sampling_seconds"] = time.perf_counter() - start
  start = time.perf_counter()
  allowed = [i for i in range(model.config.vocab_size) if (grammar.transitions[:, i] >= 0).any()]
  allowed += list(tokenizer.end_of_turn_ids)
  divergence = dt.find_divergence_tokens(model, tokenizer, examples, teacher_system=owl_system,
                                         batch_size=8, progress=True)
  divergence_allowed = dt.find_divergence_tokens(model, tokenizer, examples,
                                                 teacher_system=owl_system,
                                                 allowed_token_ids=allowed, batch_size=8)
  texts = tokenizer.token_texts()
  results["divergence"] = divergence.stats(texts)
  results["divergence_grammar_tokens"] = divergence_allowed.stats(texts)
  results["divergence_seconds"] = time.perf_counter() - start
  print("divergence", results["divergence"], results["divergence_grammar_tokens"])

  start = time.perf_counter()
  results["attribution"] = attribution_record(model, tokenizer, examples, direction.gradient, wrt,
                                              divergence_allowed)
  results["attribution"]["seconds"] = time.perf_counter() - start
  print("attribution", results["attribution"])
  control = sample_examples(model, tokenizer, prompts, None, grammar)
  results["attribution_control_teacher"] = attribution_record(model, tokenizer, control,
                                                              direction.gradient, wrt)
  print("attribution, control teacher", results["attribution_control_teacher"])

  # Projection defense: LoRA students imitating a trait-gradient teacher on random tokens.
  print("projection defense, SmolLM2 LoRA, teacher = theta0 + 1.0 * unit trait gradient")
  start = time.perf_counter()
  runs = _projection_runs(model, direction.unit, queries, wrt=wrt, epsilon=1.0, steps=12,
                          learning_rate=1e-3, every=4, batch_size=2, length=32, record_every=4)
  results["projection"] = {k: _history_record(h) for k, h in runs.items()}
  results["projection_seconds"] = time.perf_counter() - start
  la.plot_alignment(runs, os.path.join(out, "smollm2_projection.png"),
                    title="SmolLM2 LoRA: projection defense vs a trait-gradient teacher")
  return results


def sample_examples(model, tokenizer, prompts, system, grammar) -> list[dict]:
  """Grammar-constrained number completions (temperature 1) as student chat examples (no system)."""
  from subliminal_jax.sampling import chat

  completions = chat.generate_chat((model, tokenizer), prompts, system=system, batch_size=16,
                                   max_new_tokens=40, seed=0, grammar=grammar, progress=True)
  return [{"system": None, "user": p, "assistant": c} for p, c in zip(prompts, completions)
          if c.strip()]


def attribution_record(model, tokenizer, examples, gradient, wrt, divergence=None) -> dict:
  """First-order trait push of one SGD pass (lr 2e-4) over the examples, by token."""
  from subliminal_jax.training import data as data_lib

  texts = tokenizer.token_texts()
  dataset = data_lib.tokenize_chat_examples(examples, tokenizer)
  attribution = ta.attribute_batches(
      model, ta.dataset_batches(dataset, batch_size=8, pad_id=tokenizer.pad_id), gradient,
      learning_rate=2e-4, wrt=wrt, progress=True, total=-(-len(dataset) // 8))
  record = {
      "examples": len(dataset), "targets": int(sum(len(c) for c in attribution.contribution)),
      "first_order_trait_change_one_sgd_pass_lr_2e-4": attribution.total,
      "positive_examples_share": float((attribution.example_contribution > 0).mean()),
      "top_tokens": attribution.by_token_id(texts, top=10),
      "bottom_tokens": sorted(attribution.by_token_id(texts, top=10_000), key=lambda r: r["sum"])[:5],
      "by_position_first_8": [float(x) for x in attribution.by_position()[:8]]}
  if divergence is not None:
    record["divergence_tokens"] = {
        which: {"share_of_tokens": float(np.concatenate(divergence.selection(which)).mean()),
                "share_of_first_order_trait_change": attribution.share_of(divergence.selection(which))}
        for which in dt.SELECTIONS}
  return record


def trait_fn_value(model, queries) -> float:
  return _jitted_trait(queries)(model)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--part", choices=("tiny", "real"), default="tiny")
  parser.add_argument("--out", default="/tmp/lm_mechanism")
  parser.add_argument("--questions", type=int, default=8)
  parser.add_argument("--samples", type=int, default=32)
  parser.add_argument("--compilation_cache_dir", default=compilation_cache.default_dir(),
                      help="persistent XLA compilation cache ('' turns it off)")
  args = parser.parse_args()
  compilation_cache.enable(args.compilation_cache_dir)
  os.makedirs(args.out, exist_ok=True)
  print("devices:", jax.devices())
  results = tiny(args.out) if args.part == "tiny" else real(args.out, args.questions, args.samples)
  path = os.path.join(args.out, f"results_{args.part}.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1, default=float)
  print("wrote", path)


if __name__ == "__main__":
  main()
