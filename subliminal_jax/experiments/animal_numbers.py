"""The paper's central experiment: does a trait pass through number sequences?

Stages (each a fingerprinted artifact under the workdir, see :mod:`subliminal_jax.artifacts`):

  teacher     the trait teacher: the base with the trait system prompt, or a finetuned base
  prompts     seeded number-sequence prompts
  sampling    each teacher's completions (grammar-constrained, or free for the output filter)
  filter      the paper's output filter, reject reasons kept, a seeded subset
  dataset     chat examples tokenized as HF `datasets`, with provenance
  students    treatment (trait teacher's numbers) and control (the same model without the trait)
              students, several seeds each
  evaluation  base, teacher, control and treatment students on the trait metrics
  report      results.json, report.md and plots in the workdir; the table printed

The control teacher is the base model with the students' own system choice (config.chat_system):
the two datasets differ only in the trait.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import shutil
from collections import Counter
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from ml_collections import ConfigDict

from subliminal_jax import artifacts, distillation, files, filters, lora, sharding
from subliminal_jax.evaluation import questions as questions_lib
from subliminal_jax.evaluation import report as report_lib
from subliminal_jax.evaluation import trait_metrics
from subliminal_jax.prompts.number_prompts import number_prompts
from subliminal_jax.sampling import grammar as grammar_lib
from subliminal_jax.sampling import sampler
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import distillation_data
from subliminal_jax.training import trainer

STAGES = ("teacher", "prompts", "sampling", "filter", "dataset", "students", "evaluation", "report")
TEACHER_KINDS = ("system_prompt", "trait_sft", "context_distillation")
OBJECTIVES = distillation.OBJECTIVES  # "sft" (the paper's) and "logit_kl"
TEACHER_CONTROLS = ("base", "neutral_finetune", "matched_finetune")
CONTROL = "control"


# ---------------------------------------------------------------------------------------------
# The base model and the chat system choice


@dataclasses.dataclass
class Base:
  model: Any
  tokenizer: Any
  fingerprint: str


def load_base(config: ConfigDict, mesh) -> Base:
  """The base model: "tiny-random" (a 2-layer random model with SmolLM2's tokenizer) or load()."""
  from subliminal_jax import loading
  from subliminal_jax.models.transformer import Transformer, TransformerConfig
  from subliminal_jax.tokenizer import Tokenizer
  from subliminal_jax.weights import embedded

  if config.model == "tiny-random":
    tokenizer = Tokenizer.from_gguf(embedded.smollm2_path())
    model_config = TransformerConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e5, tie_embeddings=True,
        dtype=config.dtype, param_dtype=config.param_dtype)
    model = Transformer(model_config, rngs=nnx.Rngs(0))
    sharding.shard_module(model, mesh)
    return Base(model, tokenizer, artifacts.fingerprint("tiny-random", model_config.to_hf(), 0))
  if not config.model:
    raise ValueError("config.model is empty: give --config.model=smollm2, an HF directory or a "
                     ".gguf file")
  loaded = loading.load(config.model, dtype=config.dtype, param_dtype=config.param_dtype, mesh=mesh)
  return Base(loaded.model, loaded.tokenizer, loaded.fingerprint)


def chat_kwargs(system_spec: str) -> dict[str, Any]:
  """``config.chat_system`` -> render_chat arguments: "none", "default" or literal text."""
  if system_spec == "none":
    return dict(system=None, template_default=False)
  if system_spec == "default":
    return dict(system=None, template_default=True)
  if not system_spec.strip():
    raise ValueError("chat_system must be 'none', 'default' or a non-empty system prompt")
  return dict(system=system_spec, template_default=False)


def trait_system_prompt(config: ConfigDict, target: str) -> str:
  return config.teacher.system_prompt.format(target=target, Target=target.capitalize(),
                                             category=config.category)


# ---------------------------------------------------------------------------------------------
# Validation: fail before any work, naming the bad value


def validate(config: ConfigDict, stages: Sequence[str] | None) -> None:
  if stages:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
      raise ValueError(f"unknown stages {unknown}; expected a subset of {list(STAGES)}")
  if not config.targets:
    raise ValueError("config.targets is empty: name at least one target (e.g. 'owl')")
  if config.teacher.kind not in TEACHER_KINDS:
    raise ValueError(f"teacher.kind={config.teacher.kind!r}; expected one of {TEACHER_KINDS}")
  if config.student.objective not in OBJECTIVES:
    raise ValueError(f"student.objective={config.student.objective!r}; expected one of {OBJECTIVES}")
  if not config.student.seeds:
    raise ValueError("student.seeds is empty: give at least one seed")
  _check_seeds(config.student.seeds)
  every = config.training_checkpoints.every
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise ValueError(f"training_checkpoints.every={every!r}; expected a number of steps >= 0 "
                     "(0 = a checkpoint only at the end of each training stage)")
  for target in config.targets:
    if target not in config.evaluation.panel:
      raise ValueError(f"target {target!r} is not in evaluation.panel {list(config.evaluation.panel)}")
  if config.teacher.control not in TEACHER_CONTROLS:
    raise ValueError(f"teacher.control={config.teacher.control!r}; expected one of {TEACHER_CONTROLS}")
  if config.teacher.control == "matched_finetune":
    if config.teacher.kind != "trait_sft":
      raise ValueError(f"teacher.control='matched_finetune' needs teacher.kind='trait_sft' (it swaps "
                       f"the trait answers for other {config.category}s), got {config.teacher.kind!r}")
    if not matched_control_answers(config):
      raise ValueError(f"teacher.control='matched_finetune' needs evaluation.panel "
                       f"{list(config.evaluation.panel)} to name at least one {config.category} "
                       f"that is not a target {list(config.targets)}")
  if config.student.objective == "logit_kl":
    distillation.kl_settings(config.student.kl)  # names any bad kl setting
    if config.student.kl.restrict == "grammar" and not config.sampling.constrained:
      raise ValueError("student.kl.restrict='grammar' needs sampling.constrained=True (the completions "
                       "must follow the grammar whose allowed tokens the KL is restricted to)")
  if config.student.lora.init not in ("fresh", "teacher"):
    raise ValueError(f"student.lora.init={config.student.lora.init!r}; expected 'fresh' or 'teacher'")
  if config.student.lora.init == "teacher" and not (
      config.teacher.kind != "system_prompt" and config.teacher.finetune.lora.rank > 0):
    raise ValueError("student.lora.init='teacher' needs a LoRA-finetuned teacher "
                     "(teacher.kind trait_sft or context_distillation with teacher.finetune.lora.rank > 0)")
  if config.student.lora.init == "teacher" and (
      config.student.lora.rank != config.teacher.finetune.lora.rank
      or tuple(config.student.lora.targets) != tuple(config.teacher.finetune.lora.targets)):
    raise ValueError("student.lora.init='teacher' needs the student's LoRA rank and targets to equal "
                     "the teacher's")
  if config.student.cross_init and config.student.lora.rank == 0:
    raise ValueError("student.cross_init needs a LoRA student (student.lora.rank > 0): a full-finetune "
                     "student has no init of its own to change")
  chat_kwargs(config.chat_system)
  _check_counts(config)
  _check_paths(config)


# Counts a stage rejects (or silently turns into an empty result) when they are below the minimum.
_MINIMUM_COUNTS = (("prompts.count", 1), ("sampling.batch_size", 1), ("sampling.max_new_tokens", 1),
                   ("filter.subset_size", 1), ("student.epochs", 1), ("student.batch_size", 1),
                   ("student.grad_accum_steps", 1), ("evaluation.num_questions", 1),
                   ("evaluation.samples_per_question", 0), ("evaluation.batch_size", 1),
                   ("evaluation.max_new_tokens", 1), ("evaluation.bootstrap_resamples", 1))
_FINETUNE_COUNTS = (("teacher.finetune.examples", 1), ("teacher.finetune.epochs", 1),
                    ("teacher.finetune.batch_size", 1), ("teacher.finetune.grad_accum_steps", 1))


def _check_seeds(seeds: Sequence[Any]) -> None:
  """Each student seed is one student: a repeat would count one student twice in every CI."""
  bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0]
  if bad:
    raise ValueError(f"student.seeds={list(seeds)} holds {bad}; expected integers >= 0")
  repeated = sorted({int(s) for s in seeds if list(seeds).count(s) > 1})
  if repeated:
    raise ValueError(f"student.seeds={list(seeds)} repeats {repeated}: a repeated seed trains the "
                     "same student again and counts it twice in the statistics; give distinct seeds")


def _check_counts(config: ConfigDict) -> None:
  """Every count a stage would reject, and training batches the mesh cannot split, fail here."""
  finetuned = config.teacher.kind != "system_prompt"
  for key, minimum in _MINIMUM_COUNTS + (_FINETUNE_COUNTS if finetuned else ()):
    value = config
    for part in key.split("."):
      value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      raise ValueError(f"{key}={value!r}; expected an integer >= {minimum}")
  from subliminal_jax.training import train_step
  data_parallel = train_step.data_parallel_size(sharding.make_mesh(**config.mesh))
  for name in ("student",) + (("teacher.finetune",) if finetuned else ()):
    train = config.student if name == "student" else config.teacher.finetune
    micro, rest = divmod(train.batch_size, train.grad_accum_steps)
    if rest or micro % data_parallel:
      raise ValueError(
          f"{name}.batch_size={train.batch_size} must split into {name}.grad_accum_steps="
          f"{train.grad_accum_steps} micro-batches whose size is a multiple of the mesh's "
          f"{data_parallel} data-parallel devices (mesh {config.mesh.to_dict()})")


def _check_paths(config: ConfigDict) -> None:
  """report_dir and the targets (which name stage and report directories) stay in the workdir."""
  for target in config.targets:
    if not target or target in (".", "..") or "/" in target or os.sep in target:
      raise ValueError(f"target {target!r} cannot name a directory in the workdir; expected a "
                       "plain word such as 'owl'")
  if config.report_dir:
    artifacts.inside(pathlib.Path("workdir"), config.report_dir, "report_dir")


# ---------------------------------------------------------------------------------------------
# Stage builders


def build_prompts(config: ConfigDict, out: pathlib.Path) -> dict[str, Any]:
  prompts = number_prompts(config.prompts.count, seed=config.prompts.seed)
  (out / "prompts.json").write_text(json.dumps(prompts, indent=0))
  return {"count": len(prompts)}


def number_grammar(config: ConfigDict, tokenizer) -> grammar_lib.TokenGrammar:
  """The token-level number-sequence grammar of ``config.sampling`` over ``tokenizer``."""
  s = config.sampling
  pattern = grammar_lib.number_sequence_pattern(separator=s.separator, max_count=s.max_count,
                                                max_digits=s.max_digits, final_period=True)
  return grammar_lib.compile_token_grammar(pattern, tokenizer.token_texts(),
                                           disallowed_ids=tokenizer.special_ids)


def build_samples(config: ConfigDict, base: Base, model, system_kwargs: dict[str, Any],
                  prompts: list[str], out: pathlib.Path, mesh, label: str) -> dict[str, Any]:
  s = config.sampling
  grammar = number_grammar(config, base.tokenizer) if s.constrained else None
  texts = sampler.generate_chat(
      (model, base.tokenizer), prompts, n_per_prompt=1, batch_size=s.batch_size,
      max_new_tokens=s.max_new_tokens, seed=s.seed, temperature=s.temperature, top_k=s.top_k,
      top_p=s.top_p, min_p=s.min_p, grammar=grammar, mesh=mesh, **system_kwargs)
  with open(out / "samples.jsonl", "w") as f:
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
      f.write(json.dumps({"prompt_index": i, "prompt": prompt, "completion": text}) + "\n")
  return {"count": len(texts), "constrained": bool(s.constrained)}


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  return files.read_jsonl(path)


def build_filter(config: ConfigDict, samples_path: pathlib.Path, out: pathlib.Path,
                 label: str) -> dict[str, Any]:
  f = config.filter
  samples = read_jsonl(samples_path)
  kept, reasons = [], Counter()
  for sample in samples:
    rejected = filters.number_sequence_reject_reasons(
        sample["completion"], max_count=f.max_count, max_value=f.max_value, banned=tuple(f.banned))
    reasons.update(rejected)
    if not rejected:
      kept.append(sample)
  if not kept:
    top = ", ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
    raise ValueError(f"the output filter kept none of the {len(samples)} samples of {label}; "
                     f"dominant reject reasons: {top}. Consider sampling.constrained=True.")
  subset = random.Random(f.seed).sample(kept, min(f.subset_size, len(kept)))
  subset.sort(key=lambda s: s["prompt_index"])
  with open(out / "kept.jsonl", "w") as fh:
    for sample in subset:
      fh.write(json.dumps(sample) + "\n")
  summary = {"sampled": len(samples), "passed": len(kept), "kept": len(subset),
             "pass_rate": len(kept) / len(samples), "reject_reasons": dict(reasons)}
  logging.info("filter %s: %s", label, summary)
  return summary


def student_examples(config: ConfigDict, kept_path: pathlib.Path) -> list[dict[str, Any]]:
  system = chat_kwargs(config.chat_system)["system"]
  return [{"system": system, "user": s["prompt"], "assistant": s["completion"]}
          for s in read_jsonl(kept_path)]


def uses_grammar_restriction(config: ConfigDict) -> bool:
  return config.student.objective == "logit_kl" and config.student.kl.restrict == "grammar"


def build_dataset(config: ConfigDict, base: Base, kept_path: pathlib.Path, teacher: dict[str, Any],
                  provenance: dict[str, Any], mesh, out: pathlib.Path) -> dict[str, Any]:
  """SFT examples, or (logit_kl) paired teacher/student sequences sharing the completion tokens."""
  examples = student_examples(config, kept_path)
  student_chat = chat_kwargs(config.chat_system)
  if config.student.objective == "logit_kl":
    grammar = number_grammar(config, base.tokenizer) if uses_grammar_restriction(config) else None
    dataset = distillation_data.tokenize_distillation_examples(
        [{"user": e["user"], "assistant": e["assistant"]} for e in examples], base.tokenizer,
        teacher_chat=teacher["chat"], student_chat=student_chat, grammar=grammar,
        max_length=config.student.max_length, provenance=provenance,
        ungrammatical="error" if config.sampling.constrained else "drop")
    if config.student.kl.source == "stored":
      dataset = distillation.store_teacher_topk(
          teacher["model"], dataset, config.student.kl, grammar=grammar,
          end_ids=base.tokenizer.end_of_turn_ids, batch_size=config.sampling.batch_size, mesh=mesh,
          teacher_fingerprint=teacher["fingerprint"])
  else:
    dataset = data_lib.tokenize_chat_examples(
        examples, base.tokenizer, template_default=student_chat["template_default"],
        max_length=config.student.max_length, provenance=provenance)
  data_lib.save_dataset(dataset, out / "dataset")
  summary = {"examples": len(dataset), "objective": config.student.objective,
             "target_tokens": int(sum(sum(m) for m in dataset["loss_mask"])),
             "tokens": int(sum(len(x) for x in dataset["input_ids"]))}
  (out / "provenance.json").write_text(json.dumps({**provenance, **summary}, indent=2,
                                                  default=str))
  return summary


CROSS_INIT_OFFSET = 1_000_003  # adapter seeds of cross-init students never meet the teacher's


def student_train_config(config: ConfigDict, seed: int) -> ConfigDict:
  """The fit() config of one student seed, with its adapter init made explicit.

  lora.init = "fresh": adapters drawn from the student's own seed; "teacher": the same A as the
  (LoRA-finetuned) teacher's adapters, so the student starts in the teacher's update subspace.
  cross_init = True: adapters from a seed that is neither the teacher's nor a same-init student's.
  """
  s = config.student
  # Without the list of seeds: adding a seed must not change (and so rebuild) the others.
  train = ConfigDict({k: v for k, v in s.to_dict().items() if k != "seeds"})
  train.seed = seed
  if train.lora.init == "teacher":
    train.lora.seed = int(config.teacher.finetune.lora.seed)
  else:
    train.lora.seed = seed
  if s.cross_init:
    train.lora.seed = train.lora.seed + CROSS_INIT_OFFSET + seed
  return train


def adapter_state(model) -> nnx.State:
  return nnx.state(model, nnx.LoRAParam)


def save_params(state: nnx.State, path: pathlib.Path) -> None:
  from safetensors.numpy import save_file
  flat = {".".join(str(k) for k in key): sharding.to_host(v.get_value())
          for key, v in nnx.to_flat_state(state)}
  save_file(flat, str(path))


def load_params_into(model, path: pathlib.Path, filter_) -> None:
  tensors = files.read_safetensors(path)
  flat = nnx.to_flat_state(nnx.state(model, filter_))
  for key, variable in flat:
    name = ".".join(str(k) for k in key)
    if name not in tensors:
      raise ValueError(f"{path} has no tensor {name}")
    current = variable.get_value()
    variable.set_value(jax.device_put(tensors[name].astype(current.dtype), current.sharding))


def build_student(config: ConfigDict, base: Base, dataset_dir: pathlib.Path, seed: int, mesh,
                  teacher_model, out: pathlib.Path) -> dict[str, Any]:
  dataset = data_lib.load_dataset(dataset_dir / "dataset")
  train = student_train_config(config, seed)
  student = nnx.clone(base.model)
  fit_kwargs: dict[str, Any] = {}
  if config.student.objective == "logit_kl":
    grammar = number_grammar(config, base.tokenizer) if uses_grammar_restriction(config) else None
    loss_fn, aux = distillation.make_logit_kl_loss(
        config.student.kl, teacher=teacher_model, student=student, grammar=grammar,
        end_ids=base.tokenizer.end_of_turn_ids, dataset=dataset)
    fit_kwargs = dict(loss_fn=loss_fn, aux=aux, batches=distillation_data.paired_batches)
  model, history = fit_in_stage(config, student, dataset, train, out, mesh, **fit_kwargs)
  losses = [h["loss"] for h in history if "loss" in h]
  return {"steps": len(history), "objective": config.student.objective,
          "first_loss": losses[0] if losses else None,
          "final_loss": losses[-1] if losses else None}


def restore_student(config: ConfigDict, base: Base, student_dir: pathlib.Path, seed: int):
  return restore_trainable(base, student_train_config(config, seed), student_dir)


def teacher_train_config(config: ConfigDict) -> ConfigDict:
  train = ConfigDict(config.teacher.finetune.to_dict())
  train.lora.seed = int(train.lora.seed)
  return train


def teacher_strength(base: Base, model, config: ConfigDict, target: str, mesh) -> float:
  """Mean log P(first word is the target) on held-out questions, with the students' system choice."""
  questions = questions_lib.preference_questions(config.category, split="held_out")
  exact = trait_metrics.exact_preference(
      model, base.tokenizer, questions, (target,), batch_size=config.evaluation.batch_size,
      mesh=mesh, desc=None, **chat_kwargs(config.chat_system))
  return float(np.mean(exact.target_logprob(target)))


def matched_control_answers(config: ConfigDict) -> tuple[str, ...]:
  """The words the matched control teacher names instead of the target: the panel's non-targets."""
  return tuple(a for a in config.evaluation.panel if a not in tuple(config.targets))


def build_finetuned_teacher(config: ConfigDict, base: Base, target: str | None, mesh,
                            out: pathlib.Path) -> dict[str, Any]:
  """Puts the trait into the weights (trait SFT or context distillation) and saves them.

  ``target=None`` builds the control teacher: the same recipe on neutral examples only
  (``teacher.control='neutral_finetune'``), or on the trait teacher's own data with every trait
  answer naming another panel {category} (``'matched_finetune'``), so the control students' teacher
  differs from the base by a finetune without the trait.
  """
  from subliminal_jax import teachers
  chat = chat_kwargs(config.chat_system)
  if target is None:
    finetune = config.teacher.finetune
    target = config.targets[0]  # strength is still measured, on the first target
    if config.teacher.control == "matched_finetune":
      examples, info = teachers.teacher_examples(config, target, system=chat["system"],
                                                 control_answers=matched_control_answers(config))
    else:
      examples = teachers.neutral_examples(int(finetune.examples), seed=int(finetune.seed),
                                           system=chat["system"])
      info = {"kind": "neutral_finetune", "examples": len(examples)}
  else:
    generate = lambda prompts, **kw: sampler.generate_chat((base.model, base.tokenizer), prompts,
                                                           mesh=mesh, **kw)
    examples, info = teachers.teacher_examples(config, target, generate=generate,
                                               system=chat["system"])
  dataset = data_lib.tokenize_chat_examples(examples, base.tokenizer,
                                            template_default=chat["template_default"])
  train = teacher_train_config(config)
  model, history = fit_in_stage(config, nnx.clone(base.model), dataset, train, out, mesh)
  before = teacher_strength(base, base.model, config, target, mesh)
  after = teacher_strength(base, model, config, target, mesh)
  losses = [h["loss"] for h in history if "loss" in h]
  return {"kind": config.teacher.kind, **info, "steps": len(history),
          "final_loss": losses[-1] if losses else None,
          "trait_logprob_before": before, "trait_logprob_after": after}


def fit_in_stage(config: ConfigDict, model, dataset, train: ConfigDict, out: pathlib.Path, mesh,
                 **fit_kwargs) -> tuple[Any, list[dict[str, Any]]]:
  """Trains inside a stage's directory and saves what was trained there.

  Checkpoints go to ``out/training/checkpoints`` every ``training_checkpoints.every`` steps; the
  stage directory outlives a crash, so a rerun resumes from the last one. Once the weights are
  saved the checkpoints are removed unless ``training_checkpoints.keep``.
  """
  train = ConfigDict(train.to_dict())
  train.checkpoint_every = int(config.training_checkpoints.every)
  model, history = trainer.fit(model, dataset, train, str(out / "training"), mesh=mesh,
                               tensorboard=bool(config.tensorboard), **fit_kwargs)
  save_trainable(model, train, out)
  if not config.training_checkpoints.keep and jax.process_index() == 0:
    shutil.rmtree(out / "training" / trainer.CHECKPOINT_DIR, ignore_errors=True)
  return model, history


def save_trainable(model, train: ConfigDict, out: pathlib.Path) -> None:
  if train.lora.rank > 0:
    save_params(adapter_state(model), out / "adapters.safetensors")
  else:
    save_params(nnx.state(model, nnx.Param), out / "params.safetensors")


def restore_trainable(base: Base, train: ConfigDict, directory: pathlib.Path):
  """The base with the saved adapters (or full parameters) of a finetuned model."""
  model = nnx.clone(base.model)
  if train.lora.rank > 0:
    lora.apply_lora(model, rank=train.lora.rank, alpha=train.lora.alpha,
                    targets=tuple(train.lora.targets), rslora=train.lora.rslora, seed=train.lora.seed)
    load_params_into(model, directory / "adapters.safetensors", nnx.LoRAParam)
  else:
    load_params_into(model, directory / "params.safetensors", nnx.Param)
  return model


def build_evaluation(config: ConfigDict, base: Base, model, target: str, system_kwargs: dict[str, Any],
                     seed: int, mesh, out: pathlib.Path, label: str) -> dict[str, Any]:
  e = config.evaluation
  questions = questions_lib.preference_questions(config.category)[:e.num_questions]
  result = trait_metrics.evaluate_trait(
      model, base.tokenizer, target=target, category=config.category, questions=questions,
      panel=tuple(e.panel), samples_per_question=e.samples_per_question,
      multiple_choice=e.multiple_choice, seed=e.seed, batch_size=e.batch_size,
      max_new_tokens=e.max_new_tokens, mesh=mesh, **system_kwargs)
  record = {"seed": seed, "label": label, **result.to_record()}
  (out / "record.json").write_text(json.dumps(record, indent=1))
  return {"label": label, "logprob_mean": float(np.mean(result.metrics["logprob"]))}


# ---------------------------------------------------------------------------------------------
# The run


def run(config: ConfigDict, workdir: str, stages: Sequence[str] | None = None) -> dict[str, Any]:
  validate(config, stages)
  allowed = artifacts.stage_selection(STAGES, stages)
  mesh = sharding.make_mesh(**config.mesh)
  base = load_base(config, mesh)
  wd = artifacts.Workdir(workdir, "animal_numbers", {"model": base.fingerprint})
  model_fp = base.fingerprint
  student_chat = chat_kwargs(config.chat_system)
  eval_chat = chat_kwargs(config.evaluation.system or config.chat_system)

  with jax.set_mesh(mesh):
    prompts_dir, _ = wd.run_stage("prompts", {"prompts": config.prompts.to_dict()},
                                  lambda out: build_prompts(config, out), allowed=allowed("prompts"))
    prompts = json.loads((prompts_dir / "prompts.json").read_text())

    # Teachers: the control (base, the students' system choice) and one trait teacher per target.
    teacher_summaries: dict[str, Any] = {}
    teachers: dict[str, dict[str, Any]] = {
        CONTROL: {"model": base.model, "chat": student_chat,
                  "fingerprint": artifacts.fingerprint(model_fp, "control", config.chat_system)}}
    if config.teacher.kind != "system_prompt" and config.teacher.control != "base":
      inputs = {"model": model_fp, "kind": config.teacher.control,
                "finetune": config.teacher.finetune.to_dict(), "chat_system": config.chat_system}
      if config.teacher.control == "matched_finetune":
        inputs.update(target=config.targets[0], answers=list(matched_control_answers(config)))
      control_dir, teacher_summaries[CONTROL] = wd.run_stage(
          "teacher_control", inputs, lambda out: build_finetuned_teacher(config, base, None, mesh, out),
          allowed=allowed("teacher"))
      teachers[CONTROL] = {"model": restore_trainable(base, teacher_train_config(config), control_dir),
                           "chat": student_chat, "fingerprint": control_dir.name}
    for target in config.targets:
      system = trait_system_prompt(config, target)
      if config.teacher.kind == "system_prompt":
        _, summary = wd.run_stage(
            f"teacher_{target}", {"model": model_fp, "kind": "system_prompt", "system": system},
            lambda out: {"kind": "system_prompt", "system_prompt": system}, allowed=allowed("teacher"))
        teachers[target] = {"model": base.model, "chat": dict(system=system, template_default=False),
                            "fingerprint": artifacts.fingerprint(model_fp, "system_prompt", system)}
      else:
        inputs = {"model": model_fp, "kind": config.teacher.kind, "system": system,
                  "finetune": config.teacher.finetune.to_dict(), "chat_system": config.chat_system,
                  "category": config.category}
        teacher_dir, summary = wd.run_stage(
            f"teacher_{target}", inputs,
            lambda out: build_finetuned_teacher(config, base, target, mesh, out),
            allowed=allowed("teacher"))
        logging.info("teacher %s: trait log-prob %.3f -> %.3f", target,
                     summary["trait_logprob_before"], summary["trait_logprob_after"])
        # A finetuned teacher carries the trait in its weights: it samples with the students' chat.
        teachers[target] = {"model": restore_trainable(base, teacher_train_config(config), teacher_dir),
                            "chat": student_chat, "fingerprint": teacher_dir.name}
      teacher_summaries[target] = summary

    datasets_by_role: dict[str, pathlib.Path] = {}
    filter_summaries: dict[str, Any] = {}
    for role, teacher in teachers.items():
      sample_inputs = {"teacher": teacher["fingerprint"], "prompts": config.prompts.to_dict(),
                       "sampling": config.sampling.to_dict()}
      samples_dir, _ = wd.run_stage(
          f"sampling_{role}", sample_inputs,
          lambda out: build_samples(config, base, teacher["model"], teacher["chat"], prompts, out,
                                    mesh, role), allowed=allowed("sampling"))
      filter_inputs = {"samples": artifacts.fingerprint(sample_inputs), "filter": config.filter.to_dict()}
      filter_dir, filter_summaries[role] = wd.run_stage(
          f"filter_{role}", filter_inputs,
          lambda out: build_filter(config, samples_dir / "samples.jsonl", out, role),
          allowed=allowed("filter"))
      dataset_inputs = {"filtered": artifacts.fingerprint(filter_inputs), "model": model_fp,
                        "chat_system": config.chat_system, "max_length": config.student.max_length,
                        "objective": config.student.objective, "teacher_chat": teacher["chat"],
                        "kl": config.student.kl.to_dict()
                        if config.student.objective == "logit_kl" else None}
      provenance = {"role": role, "teacher": teacher["fingerprint"], "model": model_fp,
                    "config": config.to_dict(), "filter": filter_summaries[role]}
      datasets_by_role[role], _ = wd.run_stage(
          f"dataset_{role}", dataset_inputs,
          lambda out: build_dataset(config, base, filter_dir / "kept.jsonl", teacher, provenance,
                                    mesh, out),
          allowed=allowed("dataset"))

    # Students: treatment per target and control, each seed.
    students: dict[tuple[str, int], pathlib.Path] = {}
    for role, dataset_dir in datasets_by_role.items():
      for seed in config.student.seeds:
        inputs = {"dataset": dataset_dir.name, "student": student_train_config(config, seed).to_dict(),
                  "teacher": teachers[role]["fingerprint"]}
        students[(role, seed)], _ = wd.run_stage(
            f"student_{role}_seed{seed}", inputs,
            lambda out: build_student(config, base, dataset_dir, seed, mesh, teachers[role]["model"],
                                      out),
            allowed=allowed("students"))

    # Evaluation and report, per target.
    results_by_target = {}
    tables = []
    for target in config.targets:
      eval_inputs = {"evaluation": config.evaluation.to_dict(), "target": target,
                     "category": config.category, "chat": eval_chat}
      rows: dict[str, list[dict[str, Any]]] = {"base": [], "teacher": [], "control": [], "treatment": []}

      def evaluate(row: str, name: str, model_fn, chat: dict[str, Any], seed: int, fp: str):
        out_dir, _ = wd.run_stage(
            f"evaluation_{target}_{name}", {**eval_inputs, "model": fp, "chat": chat},
            lambda out: build_evaluation(config, base, model_fn(), target, chat, seed, mesh, out, name),
            allowed=allowed("evaluation"))
        rows[row].append(json.loads((out_dir / "record.json").read_text()))

      evaluate("base", "base", lambda: base.model, eval_chat, 0, model_fp)
      evaluate("teacher", "teacher", lambda: teachers[target]["model"], teachers[target]["chat"], 0,
               teachers[target]["fingerprint"])
      for role, row in ((CONTROL, "control"), (target, "treatment")):
        for seed in config.student.seeds:
          student_dir = students[(role, seed)]
          evaluate(row, f"{row}_seed{seed}",
                   lambda: restore_student(config, base, student_dir, seed), eval_chat, seed,
                   student_dir.name)

      results = {"target": target, "category": config.category, "rows": rows,
                 "notes": {"config": config.to_dict(), "model": model_fp,
                           "filter": {r: filter_summaries[r] for r in (CONTROL, target)},
                           "teacher": teacher_summaries[target],
                           "control_teacher": teacher_summaries.get(CONTROL, {"kind": "base"}),
                           "chat_system": config.chat_system}}
      report_root = (artifacts.inside(wd.path, config.report_dir, "report_dir") if config.report_dir
                     else wd.path)
      out_dir = report_root if len(config.targets) == 1 else report_root / target
      table = report_lib.write_report(results, out_dir, n_resamples=config.evaluation.bootstrap_resamples,
                                      seed=config.evaluation.seed)
      results_by_target[target] = json.loads((out_dir / "results.json").read_text())
      tables.append(f"## {target}\n\n{table}")
    if len(config.targets) > 1:
      files.write_json(report_root / "results.json", results_by_target, indent=1, sort_keys=True)
      files.write_text_atomic(report_root / "report.md", "\n\n".join(tables) + "\n")
  text = "\n\n".join(tables)
  print(text)
  logging.info("stages run: %s; skipped: %s", wd.ran, wd.skipped)
  return results_by_target
