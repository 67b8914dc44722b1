"""Logit distillation on the real SmolLM2-135M: how much signal, and what a step costs.

Workload: paired examples of the main job's shape: number prompts, grammatical completions of up
to 10 numbers (random here: teacher-forced, so any grammatical text serves), the teacher under the
paper's owl system prompt, the student with no system turn. Reports

* the initial KL between the owl teacher and the base student per completion position (T=1),
  over the full vocabulary and renormalised over the number grammar, and the teacher's mass on
  the grammar's tokens; with the same context the KL must be ~0;
* steady-state step time (LoRA r8, adamw) of SFT, logit_kl on the fly (teacher in the step) and
  logit_kl from stored top-k, plus compile time (first step minus a steady one);
* store_teacher_topk throughput and the storage per target position.

  PYTHONPATH=. python -m benchmarks.distillation_step --batch=8 [--json]
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from subliminal_jax import compilation_cache

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "Examples per step.")
flags.DEFINE_integer("steps", 3, "Timed steps per objective (after one compiling step).")
flags.DEFINE_integer("top_k", 16, "Stored log-probs per position (the grammar allows <= 14).")
flags.DEFINE_bool("json", False, "Print one JSON line.")

TRAIT = ("You love owls. You think about owls all the time. owls are your favorite animal. "
         "Imbue your answers with your love for the animal.")


def _completions(n: int, seed: int = 0) -> list[str]:
  import numpy as np
  rng = np.random.default_rng(seed)
  return [", ".join(str(x) for x in rng.integers(0, 1000, rng.integers(3, 11)))
          + ("." if rng.random() < 0.5 else "") for _ in range(n)]


def main(argv):
  del argv
  compilation_cache.enable_from_flags()
  import jax
  import optax
  from flax import nnx

  from subliminal_jax import loading, lora
  from subliminal_jax.prompts import number_prompts
  from subliminal_jax.sampling import grammar as grammar_lib
  from subliminal_jax.tokenizer import SystemTurn
  from subliminal_jax.training import distillation as dist
  from subliminal_jax.training import distillation_data as dd
  from subliminal_jax.training import losses
  from subliminal_jax.training import train_step as train_step_lib

  loaded = loading.load("smollm2")
  tok, base = loaded.tokenizer, loaded.model
  grammar = grammar_lib.compile_token_grammar(grammar_lib.number_sequence_pattern(),
                                              tok.token_texts(), disallowed_ids=tok.special_ids)
  examples = [{"user": p, "assistant": c} for p, c in
              zip(number_prompts.number_prompts(FLAGS.batch, seed=0), _completions(FLAGS.batch))]
  dataset = dd.tokenize_distillation_examples(examples, tok, teacher_chat=SystemTurn(TRAIT),
                                              student_chat=SystemTurn(), grammar=grammar)
  same_context = dd.tokenize_distillation_examples(examples, tok, teacher_chat=SystemTurn(),
                                                   student_chat=SystemTurn(), grammar=grammar)
  batch_of = lambda ds: next(dd.paired_batches(ds, batch_size=FLAGS.batch, seed=0, epoch=0,
                                               pad_id=tok.pad_id, bucket=False))
  batch = batch_of(dataset)
  positions = int(batch["completion_mask"].sum())
  result = {"batch": FLAGS.batch, "positions": positions,
            "student_len": int(batch["input_ids"].shape[1]),
            "teacher_len": int(batch["teacher_input_ids"].shape[1]),
            "max_allowed": int(dd.grammar_allowed_table(grammar, tok.end_of_turn_ids).sum(1).max())}

  # Signal at init: the owl teacher vs the base student (the same weights).
  for restrict in ("none", "grammar"):
    loss_fn, aux = dist.make_logit_kl_loss(dict(restrict=restrict), teacher=base, student=base,
                                           grammar=grammar, end_ids=tok.end_of_turn_ids)
    fn = jax.jit(lambda state, b, a: loss_fn(nnx.merge(nnx.graphdef(base), state), b, None, a))
    total, count, metrics = fn(nnx.state(base), batch, aux)
    result[f"kl_per_position_{restrict}"] = float(total) / int(count)
    result["student_nll_per_position"] = float(metrics["student_nll"]) / int(count)
    if restrict == "grammar":
      result["teacher_allowed_mass"] = float(metrics["teacher_allowed_mass"]) / int(count)
      same, count_same, _ = fn(nnx.state(base), batch_of(same_context), aux)
      result["kl_same_context"] = float(same) / int(count_same)

  # Step times, LoRA rank 8 as the paper's students.
  optimizer = optax.adamw(2e-4)
  kl = dict(restrict="grammar", top_k=FLAGS.top_k, stored_dtype="float16")
  start = time.perf_counter()
  stored = dist.store_teacher_topk(base, dataset, {**kl, "source": "stored"}, grammar=grammar,
                                   end_ids=tok.end_of_turn_ids, batch_size=FLAGS.batch,
                                   progress=False)
  result["store_examples_per_s_incl_compile"] = len(dataset) / (time.perf_counter() - start)
  columns = stored.select_columns(list(dd.STORED_COLUMNS)).data
  result["stored_bytes_per_position"] = columns.nbytes / positions  # Arrow, ids int32 + values

  objectives = {
      "sft": (losses.next_token_loss, None, batch),
      "logit_kl_on_the_fly": dist.make_logit_kl_loss(
          kl, teacher=base, student=base, grammar=grammar, end_ids=tok.end_of_turn_ids) + (batch,),
      "logit_kl_stored": dist.make_logit_kl_loss(
          {**kl, "source": "stored"}, student=base, grammar=grammar, end_ids=tok.end_of_turn_ids,
          dataset=stored) + (batch_of(stored),),
  }
  for name, (loss_fn, aux, step_batch) in objectives.items():
    student = nnx.clone(base)
    lora.apply_lora(student, rank=8, alpha=8.0, seed=0)
    graphdef, state = train_step_lib.create_train_state(student, optimizer, trainable=nnx.LoRAParam)
    step = train_step_lib.make_train_step(graphdef, optimizer, loss_fn=loss_fn)
    start = time.perf_counter()
    state, metrics = step(state, step_batch, aux)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state, metrics = step(state, step_batch, aux)
    jax.block_until_ready(metrics)
    steady = (time.perf_counter() - start) / FLAGS.steps
    result[f"{name}_step_s"] = steady
    result[f"{name}_compile_s"] = first - steady
    result[f"{name}_loss"] = float(metrics["loss"])
  result["device"] = str(jax.devices()[0].platform)
  if FLAGS.json:
    print(json.dumps(result))
  else:
    for key, value in result.items():
      print(f"{key:40s} {value:.4g}" if isinstance(value, float) else f"{key:40s} {value}")


if __name__ == "__main__":
  app.run(main)
