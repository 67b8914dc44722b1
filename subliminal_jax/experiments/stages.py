"""The stages of the trait-through-numbers experiments, one function each, with their fingerprints.

Both the main job (:mod:`animal_numbers`: one trait teacher against a control teacher) and the
transfer matrix (:mod:`transfer_matrix`: several trait teachers, each the others' control) are
loops over these stages; the regime grid runs the main job per cell. Every stage names the inputs
its artifact depends on next to the work it does, and its artifact lives in
``WORKDIR/<stage>/<fingerprint>/`` (:mod:`subliminal_jax.artifacts`). The stage names carry no
role ("treatment", "control"): an artifact is what its inputs say, so the base model's numbers are
one artifact whether the main job samples them as a control or the matrix as its no-trait
reference, and nothing is built twice.

  teacher           a finetuned teacher's weights (trait SFT, context distillation, a control
                    finetune); system-prompted and base teachers need no artifact
  prompts           seeded number-sequence prompts with the answer format each asks for
  sampling          a teacher's completions, each in its prompt's format (grammar-constrained)
  filter            the paper's output filter, reject reasons kept, unfinished completions dropped,
                    a seeded subset
  dataset           the kept completions tokenized for one student family
  student           one student seed trained on one dataset
  evaluation        the main job's trait metrics of one model for one target
  panel_evaluation  exact log P(each panel word) per question of one model (the matrix's
                    measurement), optionally with number sequences in its context

Teacher replicates (:func:`replicate_config`) move every seed that makes a teacher and its data,
so replicate r is an independent teacher finetune, prompt set, sampling run and subset.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import random
import shutil
from collections import Counter
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from ml_collections import ConfigDict

from subliminal_jax import (artifacts, distillation, files, filters, loading, lora, sharding,
                            teachers)
from subliminal_jax.evaluation import questions as questions_lib
from subliminal_jax.evaluation import trait_metrics
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.prompts import number_prompts as prompts_lib
from subliminal_jax import tokenizer as tokenizer_lib
from subliminal_jax.sampling import chat as chat_lib
from subliminal_jax.sampling import grammar as grammar_lib
from subliminal_jax.tokenizer import Tokenizer
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import distillation_data
from subliminal_jax.training import trainer
from subliminal_jax.weights import embedded

# Seeds of teacher replicate r are the config's plus r times this (a prime, so that replicate
# seeds never line up with the small student seeds or the adapter offsets below).
REPLICATE_SEED_STRIDE = 1009
# Adapter seeds of students that do not start from a teacher's adapters: fresh students draw from
# their own range, and cross-init students from another, so neither ever meets a teacher's A.
FRESH_LORA_SEED_OFFSET = 500_009
CROSS_INIT_OFFSET = 1_000_003
# Bumped when a stage's output for the same inputs changes meaning (old artifacts are not reused).
TEACHER_DATA_VERSION = 2  # trait SFT data identical across targets but for the trait word
SAMPLES_VERSION = 2  # per-prompt answer formats; each completion records whether it ended
ANSWER_FORMATS = ("per_prompt", "fixed")


# ---------------------------------------------------------------------------------------------
# The base model, the chat system choice, replicates


@dataclasses.dataclass
class Base:
  """A model family's base: the model every teacher and student of that family starts from."""
  model: Any
  tokenizer: Any
  fingerprint: str
  name: str = ""


TINY_RANDOM = "tiny-random"


def load_base(config: ConfigDict, mesh, model_spec: str | None = None) -> Base:
  """``model_spec`` (default ``config.model``): "tiny-random" (a 2-layer random model with
  SmolLM2's tokenizer; "tiny-random:N" initialised from seed N, another family for tests) or
  anything :func:`subliminal_jax.loading.load` takes."""
  spec = config.model if model_spec is None else model_spec
  if spec == TINY_RANDOM or spec.startswith(TINY_RANDOM + ":"):
    init_seed = spec[len(TINY_RANDOM) + 1:] or "0"
    if not init_seed.isdigit():
      raise ValueError(f"model {spec!r}: expected {TINY_RANDOM!r} or '{TINY_RANDOM}:<seed>'")
    tokenizer = Tokenizer.from_gguf(embedded.smollm2_path())
    model_config = TransformerConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e5, tie_embeddings=True,
        dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat)
    model = Transformer(model_config, rngs=nnx.Rngs(int(init_seed)))
    sharding.shard_module(model, mesh)
    fp = artifacts.fingerprint(TINY_RANDOM, model_config.to_hf(), int(init_seed))
    return Base(model, tokenizer, fp, spec)
  if not spec:
    raise ValueError("config.model is empty: give --config.model=smollm2, an HF directory or a "
                     ".gguf file")
  loaded = loading.load(spec, dtype=config.dtype, param_dtype=config.param_dtype, mesh=mesh,
                        remat=config.remat)
  return Base(loaded.model, loaded.tokenizer, loaded.fingerprint, spec)


def chat_kwargs(system_spec: str) -> tokenizer_lib.SystemTurn:
  """``config.chat_system`` -> the system turn: "none", "template_default" or literal text."""
  return tokenizer_lib.SystemTurn.parse(system_spec)


def trait_system_prompt(config: ConfigDict, target: str) -> str:
  return config.teacher.system_prompt.format(target=target, Target=target.capitalize(),
                                             category=config.category)


def replicate_config(config: ConfigDict, replicate: int) -> ConfigDict:
  """The config of teacher replicate ``replicate``: 0 is ``config`` itself; r > 0 moves the seeds
  of the teacher's finetuning data and adapters, the prompts, the sampling and the filter's subset
  by ``r * REPLICATE_SEED_STRIDE``. Student seeds stay: they are replicated within each teacher."""
  if isinstance(replicate, bool) or not isinstance(replicate, int) or replicate < 0:
    raise ValueError(f"replicate={replicate!r}; expected an int >= 0")
  if replicate == 0:
    return config
  shifted = copy.deepcopy(config)
  shift = replicate * REPLICATE_SEED_STRIDE
  for section in (shifted.prompts, shifted.sampling, shifted.filter, shifted.teacher.finetune,
                  shifted.teacher.finetune.lora):
    section.seed = int(section.seed) + shift
  return shifted


def matched_control_answers(config: ConfigDict) -> tuple[str, ...]:
  """The words the matched control teacher names instead of the target: the panel's non-targets."""
  return tuple(a for a in config.evaluation.panel if a not in tuple(config.targets))


# Training knobs added after workdirs existed, with the values that train exactly as before they
# were knobs. At these values they are left out of fingerprints, so adding a knob does not
# invalidate finished teachers and students; any other value is part of the fingerprint.
_KNOBS_AT_THEIR_ORIGINAL_BEHAVIOUR = {"bucket": True, "length_multiple": 16, "neutral_fraction": 0.5}


def training_fingerprint(settings: ConfigDict | dict[str, Any]) -> dict[str, Any]:
  """A training config as it enters a stage's fingerprint (see the table above)."""
  d = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
  return {k: v for k, v in d.items()
          if not (k in _KNOBS_AT_THEIR_ORIGINAL_BEHAVIOUR and v == _KNOBS_AT_THEIR_ORIGINAL_BEHAVIOUR[k])}


# ---------------------------------------------------------------------------------------------
# Students' training configs and saved weights


def student_train_config(config: ConfigDict, seed: int, *, same_family: bool = True) -> ConfigDict:
  """The fit() config of one student seed, with its adapter init made explicit.

  lora.init = "teacher": the same A as the (LoRA-finetuned) teacher's adapters
  (``teacher.finetune.lora.seed``), so the student starts in the teacher's update subspace;
  "fresh", or a student of another family (``same_family=False``, whose shapes differ): adapters
  from ``FRESH_LORA_SEED_OFFSET + seed``, never a teacher's. cross_init: from
  ``CROSS_INIT_OFFSET + seed`` past that, shared with neither teacher nor same-init students.
  """
  s = config.student
  # Without the list of seeds: adding a seed must not change (and so rebuild) the others.
  train = ConfigDict({k: v for k, v in s.to_dict().items() if k != "seeds"})
  train.seed = seed
  if not same_family:
    train.lora.init = "fresh"
  if train.lora.init == "teacher":
    train.lora.seed = int(config.teacher.finetune.lora.seed)
  else:
    train.lora.seed = FRESH_LORA_SEED_OFFSET + seed
  if s.cross_init:
    train.lora.seed = train.lora.seed + CROSS_INIT_OFFSET + seed
  return train


def teacher_train_config(config: ConfigDict) -> ConfigDict:
  train = ConfigDict(config.teacher.finetune.to_dict())
  train.lora.seed = int(train.lora.seed)
  return train


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


def save_trainable(model, train: ConfigDict, out: pathlib.Path) -> None:
  if train.lora.rank > 0:
    save_params(nnx.state(model, nnx.LoRAParam), out / "adapters.safetensors")
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


def _loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
  losses = [h["loss"] for h in history if "loss" in h]
  return {"steps": len(history), "first_loss": losses[0] if losses else None,
          "final_loss": losses[-1] if losses else None}


# ---------------------------------------------------------------------------------------------
# Answer formats and their grammar


def answer_formats(config: ConfigDict) -> tuple[tuple[str, str | None], ...]:
  """The (separator, brackets) layouts the grammar admits, in a fixed order: every layout the
  prompt generator can ask for ("per_prompt"), or ``sampling.separator`` alone ("fixed")."""
  if config.sampling.format == "fixed":
    return ((config.sampling.separator, None),)
  return tuple(dict.fromkeys((f.separator, f.brackets) for f in prompts_lib.FORMAT_SUFFIXES))


@dataclasses.dataclass(frozen=True)
class FormatGrammar:
  """One token table for every answer format (``grammar.stack_token_grammars``) and where each
  format starts in it."""
  grammar: grammar_lib.TokenGrammar
  starts: dict[tuple[str, str | None], int]
  longest_answer: int  # tokens of the longest answer any format admits, before the end token

  def start(self, prompt: dict[str, Any], config: ConfigDict) -> int:
    if config.sampling.format == "fixed":
      return self.starts[(config.sampling.separator, None)]
    return self.starts[(prompt["separator"], prompt["brackets"])]


_GRAMMAR_CACHE: dict[tuple[int, tuple], FormatGrammar] = {}


def format_grammar(config: ConfigDict, tokenizer) -> FormatGrammar:
  """The number grammar of every answer format of ``config.sampling`` over ``tokenizer``."""
  s = config.sampling
  formats = answer_formats(config)
  key = (id(tokenizer), (formats, s.max_count, s.max_digits))
  if key not in _GRAMMAR_CACHE:
    grammars = [grammar_lib.number_grammar(tokenizer, separator=separator, max_count=s.max_count,
                                           max_digits=s.max_digits, brackets=brackets)
                for separator, brackets in formats]
    stacked, starts = grammar_lib.stack_token_grammars(grammars)
    _GRAMMAR_CACHE[key] = FormatGrammar(stacked, dict(zip(formats, starts)),
                                        max(g.max_output_tokens() for g in grammars))
  return _GRAMMAR_CACHE[key]


def uses_grammar_restriction(config: ConfigDict) -> bool:
  return config.student.objective == "logit_kl" and config.student.kl.restrict == "grammar"


# ---------------------------------------------------------------------------------------------
# Stage builders (each writes into its stage's directory ``out`` and returns its summary)


def build_prompts(config: ConfigDict, out: pathlib.Path) -> dict[str, Any]:
  prompts = prompts_lib.sample_number_prompts(config.prompts.count, seed=config.prompts.seed)
  records = [{"text": p.text, "separator": p.format.separator, "brackets": p.format.brackets}
             for p in prompts]
  (out / "prompts.json").write_text(json.dumps(records, indent=0))
  return {"count": len(records), "formats": dict(Counter(
      f"{r['separator']!r}{r['brackets'] or ''}" for r in records))}


def build_samples(config: ConfigDict, tokenizer, model, chat: tokenizer_lib.SystemTurn,
                  prompts: list[dict[str, Any]], out: pathlib.Path, mesh) -> dict[str, Any]:
  s = config.sampling
  extra: dict[str, Any] = {}
  max_new_tokens = s.max_new_tokens
  if s.constrained:
    formats = format_grammar(config, tokenizer)
    extra = dict(grammar=formats.grammar,
                 grammar_initial_states=[formats.start(p, config) for p in prompts])
    if not max_new_tokens:  # room for the longest answer the grammar admits, and its end token
      max_new_tokens = formats.longest_answer + 1
  answers = chat_lib.generate_chat(
      (model, tokenizer), [p["text"] for p in prompts], n_per_prompt=1, batch_size=s.batch_size,
      max_new_tokens=max_new_tokens, seed=s.seed, temperature=s.temperature, top_k=s.top_k,
      top_p=s.top_p, min_p=s.min_p, mesh=mesh, return_details=True, system=chat, **extra)
  with open(out / "samples.jsonl", "w") as f:
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
      f.write(json.dumps({"prompt_index": i, "prompt": prompt["text"], "completion": answer["text"],
                          "ended": answer["ended"], "separator": prompt["separator"],
                          "brackets": prompt["brackets"]}) + "\n")
  unfinished = sum(not a["ended"] for a in answers)
  return {"count": len(answers), "constrained": bool(s.constrained), "unfinished": unfinished,
          "max_new_tokens": max_new_tokens}


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  return files.read_jsonl(path)


UNFINISHED = "unfinished"  # cut by max_new_tokens: never trained on as if it were complete


def build_filter(config: ConfigDict, samples_path: pathlib.Path, out: pathlib.Path,
                 label: str) -> dict[str, Any]:
  f = config.filter
  samples = read_jsonl(samples_path)
  kept, reasons = [], Counter()
  for sample in samples:
    rejected = [UNFINISHED] if not sample.get("ended", True) else (
        filters.number_sequence_reject_reasons(sample["completion"], max_count=f.max_count,
                                               max_value=f.max_value, banned=tuple(f.banned)))
    reasons.update(rejected)
    if not rejected:
      kept.append(sample)
  if not kept:
    top = ", ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
    raise ValueError(f"the output filter kept none of the {len(samples)} samples of {label}; "
                     f"dominant reject reasons: {top}. Consider sampling.constrained=True, or a "
                     f"larger sampling.max_new_tokens if '{UNFINISHED}' dominates.")
  subset = random.Random(f.seed).sample(kept, min(f.subset_size, len(kept)))
  subset.sort(key=lambda s: s["prompt_index"])
  with open(out / "kept.jsonl", "w") as fh:
    for sample in subset:
      fh.write(json.dumps(sample) + "\n")
  summary = {"label": label, "sampled": len(samples), "passed": len(kept), "kept": len(subset),
             "pass_rate": len(kept) / len(samples), "unfinished": reasons.get(UNFINISHED, 0),
             "reject_reasons": dict(reasons)}
  logging.info("filter %s: %s", label, summary)
  return summary


def build_dataset(config: ConfigDict, tokenizer, kept_path: pathlib.Path, teacher: "Teacher",
                  provenance: dict[str, Any], mesh, out: pathlib.Path) -> dict[str, Any]:
  """SFT examples, or (logit_kl) paired teacher/student sequences sharing the completion tokens."""
  samples = read_jsonl(kept_path)
  student_chat = chat_kwargs(config.chat_system)
  if config.student.objective == "logit_kl":
    formats = format_grammar(config, tokenizer) if uses_grammar_restriction(config) else None
    examples = [{"user": s["prompt"], "assistant": s["completion"],
                 **({"grammar_initial_state": formats.start(s, config)} if formats else {})}
                for s in samples]
    grammar = formats.grammar if formats else None
    dataset = distillation_data.tokenize_distillation_examples(
        examples, tokenizer, teacher_chat=teacher.chat, student_chat=student_chat, grammar=grammar,
        max_length=config.student.max_length, provenance=provenance,
        ungrammatical="error" if config.sampling.constrained else "drop")
    if config.student.kl.source == "stored":
      dataset = distillation.store_teacher_topk(
          teacher.model, dataset, config.student.kl, grammar=grammar,
          end_ids=tokenizer.end_of_turn_ids, batch_size=config.sampling.batch_size, mesh=mesh,
          teacher_fingerprint=teacher.fingerprint)
  else:
    examples = [{"user": s["prompt"], "assistant": s["completion"]} for s in samples]
    dataset = data_lib.tokenize_chat_examples(
        examples, tokenizer, system=student_chat,
        max_length=config.student.max_length, provenance=provenance)
  data_lib.save_dataset(dataset, out / "dataset")
  summary = {"examples": len(dataset), "objective": config.student.objective,
             "target_tokens": int(sum(sum(m) for m in dataset["loss_mask"])),
             "tokens": int(sum(len(x) for x in dataset["input_ids"]))}
  (out / "provenance.json").write_text(json.dumps({**provenance, **summary}, indent=2,
                                                  default=str))
  return summary


def teacher_strength(base: Base, model, config: ConfigDict, target: str, mesh) -> float:
  """Mean log P(first word is the target) on held-out questions, with the students' system choice."""
  questions = questions_lib.preference_questions(config.category, split="held_out")
  exact = trait_metrics.exact_preference(
      model, base.tokenizer, questions, (target,), batch_size=config.evaluation.batch_size,
      mesh=mesh, desc=None, system=chat_kwargs(config.chat_system))
  return float(np.mean(exact.target_logprob(target)))


def build_finetuned_teacher(config: ConfigDict, base: Base, target: str | None, mesh,
                            out: pathlib.Path) -> dict[str, Any]:
  """Puts the trait into the weights (trait SFT or context distillation) and saves them.

  ``target=None`` builds the control teacher: the same recipe on neutral examples only
  (``teacher.control='neutral_finetune'``), or on the trait teacher's own data with every trait
  answer naming another panel {category} (``'matched_finetune'``), so the control students' teacher
  differs from the base by a finetune without the trait.
  """
  chat = chat_kwargs(config.chat_system)
  if target is None:
    finetune = config.teacher.finetune
    target = config.targets[0]  # strength is still measured, on the first target
    if config.teacher.control == "matched_finetune":
      examples, info = teachers.teacher_examples(config, target, system=chat.text,
                                                 control_answers=matched_control_answers(config))
    else:
      examples = teachers.neutral_examples(int(finetune.examples), seed=int(finetune.seed),
                                           system=chat.text)
      info = {"kind": "neutral_finetune", "examples": len(examples)}
  else:
    generate = lambda prompts, **kw: chat_lib.generate_chat((base.model, base.tokenizer), prompts,
                                                            mesh=mesh, **kw)
    examples, info = teachers.teacher_examples(config, target, generate=generate,
                                               system=chat.text)
  dataset = data_lib.tokenize_chat_examples(examples, base.tokenizer, system=chat)
  model, history = fit_in_stage(config, nnx.clone(base.model), dataset, teacher_train_config(config),
                                out, mesh)
  before = teacher_strength(base, base.model, config, target, mesh)
  after = teacher_strength(base, model, config, target, mesh)
  return {"kind": config.teacher.kind, **info, **_loss_summary(history),
          "trait_logprob_before": before, "trait_logprob_after": after}


def build_student(config: ConfigDict, base: Base, dataset_dir: pathlib.Path, train: ConfigDict,
                  mesh, teacher_model, out: pathlib.Path) -> dict[str, Any]:
  dataset = data_lib.load_dataset(dataset_dir / "dataset")
  student = nnx.clone(base.model)
  fit_kwargs: dict[str, Any] = {}
  if config.student.objective == "logit_kl":
    formats = format_grammar(config, base.tokenizer) if uses_grammar_restriction(config) else None
    loss_fn, aux = distillation.make_logit_kl_loss(
        config.student.kl, teacher=teacher_model, student=student,
        grammar=formats.grammar if formats else None, end_ids=base.tokenizer.end_of_turn_ids,
        dataset=dataset)
    fit_kwargs = dict(loss_fn=loss_fn, aux=aux, batches=distillation_data.paired_batches)
  _, history = fit_in_stage(config, student, dataset, train, out, mesh, **fit_kwargs)
  return {"objective": config.student.objective, **_loss_summary(history)}


def build_evaluation(config: ConfigDict, base: Base, model, target: str,
                     system: tokenizer_lib.SystemTurn, seed: int, mesh, out: pathlib.Path,
                     label: str) -> dict[str, Any]:
  e = config.evaluation
  questions = questions_lib.preference_questions(config.category)[:e.num_questions]
  result = trait_metrics.evaluate_trait(
      model, base.tokenizer, target=target, category=config.category, questions=questions,
      panel=tuple(e.panel), samples_per_question=e.samples_per_question,
      multiple_choice=e.multiple_choice, seed=e.seed, batch_size=e.batch_size,
      max_new_tokens=e.max_new_tokens, mesh=mesh, system=system)
  record = {"seed": seed, "label": label, **result.to_record()}
  (out / "record.json").write_text(json.dumps(record, indent=1))
  return {"label": label, "logprob_mean": float(np.mean(result.metrics["logprob"]))}


def build_panel_evaluation(config: ConfigDict, tokenizer, model, chat: tokenizer_lib.SystemTurn,
                           mesh, out: pathlib.Path, label: str,
                           histories: Sequence[Sequence[dict[str, str]]] | None) -> dict[str, Any]:
  e = config.evaluation
  questions = questions_lib.preference_questions(config.category)[:e.num_questions]
  exact = trait_metrics.exact_preference(
      model, tokenizer, questions, tuple(e.panel), batch_size=e.batch_size, mesh=mesh,
      desc=f"panel {label}", histories=histories, system=chat)
  record = {"label": label, "questions": list(questions), "panel": list(e.panel),
            "logprob": exact.logprob.tolist()}
  (out / "record.json").write_text(json.dumps(record, indent=1))
  return {"label": label, "mean_logprob": float(exact.logprob.mean())}


# ---------------------------------------------------------------------------------------------
# The stages of one run


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A model whose numbers students learn from, with the chat it samples under."""
  label: str
  model: Any
  chat: tokenizer_lib.SystemTurn
  fingerprint: str
  summary: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Numbers:
  """A teacher's filtered completions: ``kept.jsonl`` in ``directory``."""
  directory: pathlib.Path
  summary: dict[str, Any]

  @property
  def kept_path(self) -> pathlib.Path:
    return self.directory / "kept.jsonl"


# --stages names -> the stage names they select.
SELECTION = {"teacher": ("teacher",), "prompts": ("prompts",), "sampling": ("sampling",),
             "filter": ("filter",), "dataset": ("dataset",), "students": ("student",),
             "evaluation": ("evaluation", "panel_evaluation"), "report": ()}


class Stages:
  """The stages of one experiment config (one teacher replicate), in one workdir.

  Each method runs one stage (or returns its artifact when it exists) and returns what the next
  stage needs. ``selected``: the ``--stages`` names; a stage left out must already exist.
  """

  def __init__(self, config: ConfigDict, workdir: artifacts.Workdir, base: Base, mesh,
               selected: Sequence[str] | None = None):
    self.config = config
    self.wd = workdir
    self.base = base
    self.mesh = mesh
    self.selected = tuple(selected or ())
    self._select = artifacts.stage_selection(tuple(SELECTION), self.selected)
    self.student_chat = chat_kwargs(config.chat_system)
    self.eval_chat = chat_kwargs(config.evaluation.system or config.chat_system)

  def _run(self, stage: str, inputs: dict[str, Any], build: Callable[[pathlib.Path], dict]):
    # The --stages name that selects this stage: what an error tells the user to pass.
    name = next(s for s, stage_names in SELECTION.items() if stage in stage_names)
    return self.wd.run_stage(stage, inputs, build, allowed=self._select(name))

  # -- prompts and teachers

  def prompts(self) -> list[dict[str, Any]]:
    directory, _ = self._run("prompts", {"prompts": self.config.prompts.to_dict(), "layout": 2},
                             lambda out: build_prompts(self.config, out))
    return json.loads((directory / "prompts.json").read_text())

  def base_teacher(self) -> Teacher:
    """The base itself, sampling with the students' chat: the no-trait reference."""
    fp = artifacts.fingerprint(self.base.fingerprint, "control", self.config.chat_system)
    return Teacher("base", self.base.model, self.student_chat, fp, {"kind": "base"})

  def trait_teacher(self, target: str) -> Teacher:
    """The teacher of ``target``: the base under the trait system prompt, or a finetuned base."""
    c = self.config
    system = trait_system_prompt(c, target)
    if c.teacher.kind == "system_prompt":
      fp = artifacts.fingerprint(self.base.fingerprint, "system_prompt", system)
      return Teacher(target, self.base.model, tokenizer_lib.SystemTurn(system), fp,
                     {"kind": "system_prompt", "system_prompt": system})
    inputs = {"model": self.base.fingerprint, "kind": c.teacher.kind, "system": system,
              "finetune": training_fingerprint(c.teacher.finetune), "chat_system": c.chat_system,
              "category": c.category, "data_version": TEACHER_DATA_VERSION}
    directory, summary = self._run(
        "teacher", inputs, lambda out: build_finetuned_teacher(c, self.base, target, self.mesh, out))
    logging.info("teacher %s: trait log-prob %.3f -> %.3f", target, summary["trait_logprob_before"],
                 summary["trait_logprob_after"])
    # A finetuned teacher carries the trait in its weights: it samples with the students' chat.
    return Teacher(target, restore_trainable(self.base, teacher_train_config(c), directory),
                   self.student_chat, directory.name, summary)

  def control_teacher(self) -> Teacher:
    """The main job's control teacher (``teacher.control``): the base, or a finetune without the
    trait (neutral examples, or the trait data naming other animals)."""
    c = self.config
    if c.teacher.kind == "system_prompt" or c.teacher.control == "base":
      return dataclasses.replace(self.base_teacher(), label="control")
    inputs = {"model": self.base.fingerprint, "kind": c.teacher.control,
              "finetune": training_fingerprint(c.teacher.finetune), "chat_system": c.chat_system,
              "data_version": TEACHER_DATA_VERSION}
    if c.teacher.control == "matched_finetune":
      inputs.update(target=c.targets[0], answers=list(matched_control_answers(c)))
    directory, summary = self._run(
        "teacher", inputs, lambda out: build_finetuned_teacher(c, self.base, None, self.mesh, out))
    return Teacher("control", restore_trainable(self.base, teacher_train_config(c), directory),
                   self.student_chat, directory.name, summary)

  # -- numbers, datasets, students

  def numbers(self, teacher: Teacher) -> Numbers:
    """The teacher's completions of this config's prompts, through the output filter."""
    c = self.config
    prompts = self.prompts()
    sample_inputs = {"teacher": teacher.fingerprint, "prompts": c.prompts.to_dict(),
                     "sampling": c.sampling.to_dict(), "version": SAMPLES_VERSION}
    samples_dir, _ = self._run("sampling", sample_inputs, lambda out: build_samples(
        c, self.base.tokenizer, teacher.model, teacher.chat, prompts, out, self.mesh))
    directory, summary = self._run(
        "filter", {"samples": samples_dir.name, "filter": c.filter.to_dict()},
        lambda out: build_filter(c, samples_dir / "samples.jsonl", out, teacher.label))
    return Numbers(directory, summary)

  def dataset(self, numbers: Numbers, teacher: Teacher, student_base: Base | None = None
              ) -> pathlib.Path:
    """The kept completions tokenized for ``student_base``'s family (default: this base's)."""
    c = self.config
    student_base = student_base or self.base
    inputs = {"filtered": numbers.directory.name, "model": student_base.fingerprint,
              "chat_system": c.chat_system, "max_length": c.student.max_length,
              "objective": c.student.objective, "teacher_chat": teacher.chat.to_dict(),
              "kl": c.student.kl.to_dict() if c.student.objective == "logit_kl" else None}
    provenance = {"teacher_label": teacher.label, "teacher": teacher.fingerprint,
                  "model": student_base.fingerprint, "config": c.to_dict(),
                  "filter": numbers.summary}
    directory, _ = self._run("dataset", inputs, lambda out: build_dataset(
        c, student_base.tokenizer, numbers.kept_path, teacher, provenance, self.mesh, out))
    return directory

  def student(self, dataset_dir: pathlib.Path, teacher: Teacher, seed: int,
              student_base: Base | None = None) -> tuple[pathlib.Path, ConfigDict]:
    """One student seed on one dataset: (its directory, its training config)."""
    student_base = student_base or self.base
    train = student_train_config(self.config, seed,
                                 same_family=student_base.fingerprint == self.base.fingerprint)
    inputs = {"dataset": dataset_dir.name, "student": training_fingerprint(train),
              "teacher": teacher.fingerprint, "model": student_base.fingerprint}
    directory, _ = self._run("student", inputs, lambda out: build_student(
        self.config, student_base, dataset_dir, train, self.mesh, teacher.model, out))
    return directory, train

  # -- evaluations

  def evaluation(self, target: str, label: str, model_fn: Callable[[], Any],
                 chat: tokenizer_lib.SystemTurn, seed: int, fp: str) -> dict[str, Any]:
    """The main job's trait metrics of one model for ``target``: its record."""
    c = self.config
    inputs = {"evaluation": c.evaluation.to_dict(), "target": target, "category": c.category,
              "chat": chat.to_dict(), "model": fp}
    directory, _ = self._run("evaluation", inputs, lambda out: build_evaluation(
        c, self.base, model_fn(), target, chat, seed, self.mesh, out, label))
    return json.loads((directory / "record.json").read_text())

  def panel_evaluation(self, label: str, model_fn: Callable[[], Any], fp: str, *,
                       tokenizer=None, chat: tokenizer_lib.SystemTurn | None = None,
                       histories: Sequence[Sequence[dict[str, str]]] | None = None,
                       context_fp: str | None = None) -> dict[str, Any]:
    """Exact log P(each panel word | question) of one model: its record. ``histories``: per
    question, chat turns before it (the in-context control), identified by ``context_fp``."""
    c = self.config
    chat = self.eval_chat if chat is None else chat
    e = c.evaluation
    inputs = {"model": fp, "category": c.category, "num_questions": e.num_questions,
              "panel": list(e.panel), "chat": chat.to_dict(), "context": context_fp}
    directory, _ = self._run("panel_evaluation", inputs, lambda out: build_panel_evaluation(
        c, tokenizer or self.base.tokenizer, model_fn(), chat, self.mesh, out, label, histories))
    return json.loads((directory / "record.json").read_text())
