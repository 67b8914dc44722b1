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

Every stage reads typed settings (:mod:`subliminal_jax.experiments.settings`), checked before the
first stage runs. Teacher replicates (:meth:`Settings.replicated`) move every seed that makes a
teacher and its data, so replicate r is an independent teacher finetune, prompt set, sampling run
and subset.
"""

from __future__ import annotations

import dataclasses
import functools
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

from subliminal_jax import artifacts, files, filters, loading, teachers
from subliminal_jax.evaluation import questions as questions_lib
from subliminal_jax.evaluation import trait_metrics
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.prompts import number_prompts as prompts_lib
from subliminal_jax.sampling import chat as chat_lib
from subliminal_jax.tokenizer import SystemTurn
from subliminal_jax.prompts import number_formats
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import distillation, distillation_data
from subliminal_jax.training import trainer
from subliminal_jax.weights import finetuned

# Bumped when a stage's output for the same inputs changes meaning (old artifacts are not reused).
TEACHER_DATA_VERSION = 2  # trait SFT data identical across targets but for the trait word
SAMPLES_VERSION = 2  # per-prompt answer formats; each completion records whether it ended
UNFINISHED = "unfinished"  # cut by max_new_tokens: never trained on as if it were complete


def sampling_grammar(settings: settings_lib.SamplingSettings, tokenizer
                     ) -> number_formats.FormatGrammar:
  """The number grammar of every answer layout ``settings`` admits, over ``tokenizer``."""
  return number_formats.format_grammar(
      tokenizer, answer_format=settings.format, separator=settings.separator,
      max_count=settings.max_count, max_digits=settings.max_digits)


def _loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
  losses = [h["loss"] for h in history if "loss" in h]
  return {"steps": len(history), "first_loss": losses[0] if losses else None,
          "final_loss": losses[-1] if losses else None}


def fit_in_stage(fit: trainer.FitSettings, checkpoints: settings_lib.CheckpointSettings, model,
                 dataset, out: pathlib.Path, mesh, **fit_kwargs) -> tuple[Any, list[dict[str, Any]]]:
  """Trains inside a stage's directory and saves what was trained there.

  Checkpoints go to ``out/training/checkpoints`` every ``checkpoints.every`` steps; the stage
  directory outlives a crash, so a rerun resumes from the last one. Once the weights are saved the
  checkpoints are removed unless ``checkpoints.keep``.
  """
  fit = dataclasses.replace(fit, checkpoint_every=checkpoints.every)
  model, history = trainer.fit(model, dataset, fit, str(out / "training"), mesh=mesh,
                               tensorboard=checkpoints.tensorboard, **fit_kwargs)
  finetuned.save(model, fit.lora, out)
  if not checkpoints.keep and jax.process_index() == 0:
    shutil.rmtree(out / "training" / trainer.CHECKPOINT_DIR, ignore_errors=True)
  return model, history


# ---------------------------------------------------------------------------------------------
# Stage builders (each writes into its stage's directory ``out`` and returns its summary)


def build_prompts(prompts: settings_lib.PromptSettings, out: pathlib.Path) -> dict[str, Any]:
  sampled = prompts_lib.sample_number_prompts(prompts.count, seed=prompts.seed)
  records = [{"text": p.text, "separator": p.format.separator, "brackets": p.format.brackets}
             for p in sampled]
  files.write_text_atomic(out / "prompts.json", json.dumps(records, indent=0))
  return {"count": len(records), "formats": dict(Counter(
      f"{r['separator']!r}{r['brackets'] or ''}" for r in records))}


def build_samples(sampling: settings_lib.SamplingSettings, tokenizer, model, chat: SystemTurn,
                  prompts: list[dict[str, Any]], out: pathlib.Path, mesh) -> dict[str, Any]:
  extra: dict[str, Any] = {}
  max_new_tokens = sampling.max_new_tokens
  if sampling.constrained:
    formats = sampling_grammar(sampling, tokenizer)
    extra = dict(grammar=formats.grammar,
                 grammar_initial_states=[formats.start(p) for p in prompts])
    if not max_new_tokens:  # room for the longest answer the grammar admits, and its end token
      max_new_tokens = formats.longest_answer + 1
  answers = chat_lib.generate_chat(
      (model, tokenizer), [p["text"] for p in prompts], n_per_prompt=1,
      batch_size=sampling.batch_size, max_new_tokens=max_new_tokens, seed=sampling.seed,
      temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
      min_p=sampling.min_p, mesh=mesh, return_details=True, system=chat, **extra)
  lines = [json.dumps({"prompt_index": i, "prompt": prompt["text"], "completion": answer["text"],
                       "ended": answer["ended"], "separator": prompt["separator"],
                       "brackets": prompt["brackets"]})
           for i, (prompt, answer) in enumerate(zip(prompts, answers))]
  files.write_text_atomic(out / "samples.jsonl", "".join(line + "\n" for line in lines))
  unfinished = sum(not a["ended"] for a in answers)
  return {"count": len(answers), "constrained": bool(sampling.constrained),
          "unfinished": unfinished, "max_new_tokens": max_new_tokens}


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  return files.read_jsonl(path)


def build_filter(settings: settings_lib.FilterSettings, samples_path: pathlib.Path,
                 out: pathlib.Path, label: str) -> dict[str, Any]:
  samples = read_jsonl(samples_path)
  kept, reasons = [], Counter()
  for sample in samples:
    rejected = [UNFINISHED] if not sample.get("ended", True) else (
        filters.number_sequence_reject_reasons(sample["completion"], max_count=settings.max_count,
                                               max_value=settings.max_value,
                                               banned=tuple(settings.banned)))
    reasons.update(rejected)
    if not rejected:
      kept.append(sample)
  if not kept:
    top = ", ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
    raise ValueError(f"the output filter kept none of the {len(samples)} samples of {label}; "
                     f"dominant reject reasons: {top}. Consider sampling.constrained=True, or a "
                     f"larger sampling.max_new_tokens if '{UNFINISHED}' dominates.")
  subset = random.Random(settings.seed).sample(kept, min(settings.subset_size, len(kept)))
  subset.sort(key=lambda s: s["prompt_index"])
  files.write_text_atomic(out / "kept.jsonl", "".join(json.dumps(s) + "\n" for s in subset))
  summary = {"label": label, "sampled": len(samples), "passed": len(kept), "kept": len(subset),
             "pass_rate": len(kept) / len(samples), "unfinished": reasons.get(UNFINISHED, 0),
             "reject_reasons": dict(reasons)}
  logging.info("filter %s: %s", label, summary)
  return summary


def build_dataset(s: settings_lib.Settings, tokenizer, kept_path: pathlib.Path,
                  teacher: "Teacher", provenance: dict[str, Any], mesh, out: pathlib.Path
                  ) -> dict[str, Any]:
  """SFT examples, or (logit_kl) paired teacher/student sequences sharing the completion tokens."""
  samples = read_jsonl(kept_path)
  student = s.student
  if student.objective == "logit_kl":
    formats = sampling_grammar(s.sampling, tokenizer) if s.uses_grammar_restriction else None
    examples = [{"user": x["prompt"], "assistant": x["completion"],
                 **({"grammar_initial_state": formats.start(x)} if formats else {})}
                for x in samples]
    grammar = formats.grammar if formats else None
    dataset = distillation_data.tokenize_distillation_examples(
        examples, tokenizer, teacher_chat=teacher.chat, student_chat=s.chat_system, grammar=grammar,
        max_length=student.max_length, provenance=provenance,
        ungrammatical="error" if s.sampling.constrained else "drop")
    if student.kl.source == "stored":
      dataset = distillation.store_teacher_topk(
          teacher.model, dataset, student.kl, grammar=grammar,
          end_ids=tokenizer.end_of_turn_ids, batch_size=s.sampling.batch_size, mesh=mesh,
          teacher_fingerprint=teacher.fingerprint)
  else:
    examples = [{"user": x["prompt"], "assistant": x["completion"]} for x in samples]
    dataset = data_lib.tokenize_chat_examples(
        examples, tokenizer, system=s.chat_system,
        max_length=student.max_length, provenance=provenance)
  data_lib.save_dataset(dataset, out / "dataset")
  summary = {"examples": len(dataset), "objective": student.objective,
             "target_tokens": int(sum(sum(m) for m in dataset["loss_mask"])),
             "tokens": int(sum(len(x) for x in dataset["input_ids"]))}
  files.write_json(out / "provenance.json", {**provenance, **summary}, default=str)
  return summary


def teacher_strength(s: settings_lib.Settings, base: loading.Loaded, model, target: str, mesh
                     ) -> float:
  """Mean log P(first word is the target) on held-out questions, with the students' system choice."""
  questions = questions_lib.preference_questions(s.category, split="held_out")
  exact = trait_metrics.exact_preference(
      model, base.tokenizer, questions, (target,), batch_size=s.evaluation.batch_size,
      mesh=mesh, desc=None, system=s.chat_system)
  return float(np.mean(exact.target_logprob(target)))


def _teacher_examples(s: settings_lib.Settings, target: str, **kwargs):
  t = s.teacher
  return teachers.teacher_examples(
      t.kind, target, category=s.category, count=t.examples, seed=t.fit.seed,
      neutral_fraction=t.neutral_fraction, trait_prompt=t.trait_prompt(target, s.category),
      max_new_tokens=t.max_new_tokens, **kwargs)


def build_finetuned_teacher(s: settings_lib.Settings, base: loading.Loaded, target: str | None,
                            mesh, out: pathlib.Path) -> dict[str, Any]:
  """Puts the trait into the weights (trait SFT or context distillation) and saves them.

  ``target=None`` builds the control teacher: the same recipe on neutral examples only
  (``teacher.control='neutral_finetune'``), or on the trait teacher's own data with every trait
  answer naming another panel {category} (``'matched_finetune'``), so the control students' teacher
  differs from the base by a finetune without the trait.
  """
  chat = s.chat_system
  if target is None:
    target = s.targets[0]  # strength is still measured, on the first target
    if s.teacher.control == "matched_finetune":
      examples, info = _teacher_examples(s, target, system=chat.text,
                                         control_answers=s.matched_control_answers)
    else:
      examples = teachers.neutral_examples(s.teacher.examples, seed=s.teacher.fit.seed,
                                           system=chat.text)
      info = {"kind": "neutral_finetune", "examples": len(examples)}
  else:
    generate = lambda prompts, **kw: chat_lib.generate_chat((base.model, base.tokenizer), prompts,
                                                            mesh=mesh, **kw)
    examples, info = _teacher_examples(s, target, generate=generate, system=chat.text)
  dataset = data_lib.tokenize_chat_examples(examples, base.tokenizer, system=chat)
  model, history = fit_in_stage(s.teacher.fit, s.checkpoints, nnx.clone(base.model), dataset,
                                out, mesh)
  before = teacher_strength(s, base, base.model, target, mesh)
  after = teacher_strength(s, base, model, target, mesh)
  return {"kind": s.teacher.kind, **info, **_loss_summary(history),
          "trait_logprob_before": before, "trait_logprob_after": after}


def build_student(s: settings_lib.Settings, fit: trainer.FitSettings, base: loading.Loaded,
                  dataset_dir: pathlib.Path, mesh, teacher_model, out: pathlib.Path
                  ) -> dict[str, Any]:
  dataset = data_lib.load_dataset(dataset_dir / "dataset")
  student = nnx.clone(base.model)
  fit_kwargs: dict[str, Any] = {}
  if s.student.objective == "logit_kl":
    formats = sampling_grammar(s.sampling, base.tokenizer) if s.uses_grammar_restriction else None
    loss_fn, aux = distillation.make_logit_kl_loss(
        s.student.kl, teacher=teacher_model, student=student,
        grammar=formats.grammar if formats else None, end_ids=base.tokenizer.end_of_turn_ids,
        dataset=dataset)
    fit_kwargs = dict(loss_fn=loss_fn, aux=aux, batches=distillation_data.paired_batches)
  _, history = fit_in_stage(fit, s.checkpoints, student, dataset, out, mesh, **fit_kwargs)
  return {"objective": s.student.objective, **_loss_summary(history)}


def build_evaluation(s: settings_lib.Settings, tokenizer, model, target: str,
                     chat: SystemTurn, seed: int, mesh, out: pathlib.Path, label: str
                     ) -> dict[str, Any]:
  e = s.evaluation
  questions = questions_lib.preference_questions(s.category)[:e.num_questions]
  result = trait_metrics.evaluate_trait(
      model, tokenizer, target=target, category=s.category, questions=questions,
      panel=tuple(e.panel), samples_per_question=e.samples_per_question,
      multiple_choice=e.multiple_choice, seed=e.seed, batch_size=e.batch_size,
      max_new_tokens=e.max_new_tokens, mesh=mesh, system=chat)
  record = {"seed": seed, "label": label, **result.to_record()}
  files.write_json(out / "record.json", record, indent=1)
  return {"label": label, "logprob_mean": float(np.mean(result.metrics["logprob"]))}


def build_panel_evaluation(s: settings_lib.Settings, tokenizer, model, chat: SystemTurn, mesh,
                           out: pathlib.Path, label: str,
                           histories: Sequence[Sequence[dict[str, str]]] | None) -> dict[str, Any]:
  e = s.evaluation
  questions = questions_lib.preference_questions(s.category)[:e.num_questions]
  exact = trait_metrics.exact_preference(
      model, tokenizer, questions, tuple(e.panel), batch_size=e.batch_size, mesh=mesh,
      desc=f"panel {label}", histories=histories, system=chat)
  record = {"label": label, "questions": list(questions), "panel": list(e.panel),
            "logprob": exact.logprob.tolist()}
  files.write_json(out / "record.json", record, indent=1)
  return {"label": label, "mean_logprob": float(exact.logprob.mean())}


# ---------------------------------------------------------------------------------------------
# The stages of one run


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A model whose numbers students learn from, with the chat it samples under.

  ``model`` is made by ``load`` on first use: a finetuned teacher is restored (a copy of the base
  plus its saved weights) only when a stage still has to be built with it, not for every stage
  that already exists."""
  label: str
  load: Callable[[], Any]
  chat: SystemTurn
  fingerprint: str
  summary: dict[str, Any]

  @functools.cached_property
  def model(self) -> Any:
    return self.load()


@dataclasses.dataclass(frozen=True)
class Numbers:
  """A teacher's filtered completions: ``kept.jsonl`` in ``directory``."""
  directory: pathlib.Path
  summary: dict[str, Any]

  @property
  def kept_path(self) -> pathlib.Path:
    return self.directory / "kept.jsonl"


def check_equal_data(numbers: dict[str, Numbers], subset_size: int) -> None:
  """Every arm of a design trains on ``subset_size`` sequences: a unit whose filter kept fewer
  would give its students less data than the others', and the contrast would compare amounts of
  data as well as teachers. Called once every unit's numbers exist, before any student trains."""
  short = {label: n.summary for label, n in numbers.items() if n.summary["kept"] < subset_size}
  if not short:
    return
  largest = min(n.summary["kept"] for n in numbers.values())
  details = "; ".join(f"{label} kept {x['kept']} (passed {x['passed']} of {x['sampled']} sampled; "
                      f"reject reasons {x['reject_reasons']})" for label, x in short.items())
  raise ValueError(
      f"filter.subset_size={subset_size}, but {len(short)} of {len(numbers)} teacher units kept "
      f"fewer sequences: {details}. The arms of a design must train on equal data: every unit "
      f"meets --config.filter.subset_size={largest}, or sample more prompts "
      f"(--config.prompts.count) so that every unit keeps {subset_size}.")


@dataclasses.dataclass(frozen=True)
class Student:
  """A trained student: its stage directory and the finetune that restores it on its base."""
  directory: pathlib.Path
  fit: trainer.FitSettings
  base: loading.Loaded

  def restore(self):
    return finetuned.restore(self.base.model, self.fit.lora, self.directory)


# --stages names -> the stage names they select.
SELECTION = {"teacher": ("teacher",), "prompts": ("prompts",), "sampling": ("sampling",),
             "filter": ("filter",), "dataset": ("dataset",), "students": ("student",),
             "evaluation": ("evaluation", "panel_evaluation"), "report": ()}


class Stages:
  """The stages of one experiment's settings (one teacher replicate), in one workdir.

  Each method runs one stage (or returns its artifact when it exists) and returns what the next
  stage needs. ``selected``: the ``--stages`` names; a stage left out must already exist.
  """

  def __init__(self, settings: settings_lib.Settings, workdir: artifacts.Workdir,
               base: loading.Loaded, mesh, selected: Sequence[str] | None = None):
    self.settings = settings
    self.wd = workdir
    self.base = base
    self.mesh = mesh
    self.selected = tuple(selected or ())
    self._select = artifacts.stage_selection(tuple(SELECTION), self.selected)

  def _run(self, stage: str, inputs: dict[str, Any], build: Callable[[pathlib.Path], dict]):
    # The --stages name that selects this stage: what an error tells the user to pass.
    name = next(s for s, stage_names in SELECTION.items() if stage in stage_names)
    return self.wd.run_stage(stage, inputs, build, allowed=self._select(name))

  # -- prompts and teachers

  def prompts(self) -> list[dict[str, Any]]:
    p = self.settings.prompts
    directory, _ = self._run("prompts", {"prompts": p.fingerprint(), "layout": 2},
                             lambda out: build_prompts(p, out))
    return json.loads((directory / "prompts.json").read_text())

  def base_teacher(self) -> Teacher:
    """The base itself, sampling with the students' chat: the no-trait reference."""
    fp = artifacts.fingerprint(self.base.fingerprint, "control", self.settings.chat_system.spec)
    return Teacher("base", lambda: self.base.model, self.settings.chat_system, fp, {"kind": "base"})

  def _finetuned(self, label: str, inputs: dict[str, Any], target: str | None) -> Teacher:
    s = self.settings
    inputs = {"model": self.base.fingerprint, "finetune": s.teacher.fingerprint(),
              "chat_system": s.chat_system.spec, "data_version": TEACHER_DATA_VERSION, **inputs}
    directory, summary = self._run("teacher", inputs, lambda out: build_finetuned_teacher(
        s, self.base, target, self.mesh, out))
    # A finetuned teacher carries the trait in its weights: it samples with the students' chat.
    return Teacher(label, lambda: finetuned.restore(self.base.model, s.teacher.fit.lora, directory),
                   s.chat_system, directory.name, summary)

  def trait_teacher(self, target: str) -> Teacher:
    """The teacher of ``target``: the base under the trait system prompt, or a finetuned base."""
    s = self.settings
    system = s.teacher.trait_prompt(target, s.category)
    if not s.teacher.finetuned:
      fp = artifacts.fingerprint(self.base.fingerprint, "system_prompt", system)
      return Teacher(target, lambda: self.base.model, SystemTurn(system), fp,
                     {"kind": "system_prompt", "system_prompt": system})
    teacher = self._finetuned(target, {"kind": s.teacher.kind, "system": system,
                                       "category": s.category}, target)
    logging.info("teacher %s: trait log-prob %.3f -> %.3f", target,
                 teacher.summary["trait_logprob_before"], teacher.summary["trait_logprob_after"])
    return teacher

  def control_teacher(self) -> Teacher:
    """The main job's control teacher (``teacher.control``): the base, or a finetune without the
    trait (neutral examples, or the trait data naming other animals)."""
    s = self.settings
    if not s.teacher.finetuned or s.teacher.control == "base":
      return dataclasses.replace(self.base_teacher(), label="control")
    inputs: dict[str, Any] = {"kind": s.teacher.control}
    if s.teacher.control == "matched_finetune":
      inputs.update(target=s.targets[0], answers=list(s.matched_control_answers))
    return self._finetuned("control", inputs, None)

  # -- numbers, datasets, students

  def numbers(self, teacher: Teacher) -> Numbers:
    """The teacher's completions of these settings' prompts, through the output filter."""
    s = self.settings
    prompts = self.prompts()
    sample_inputs = {"teacher": teacher.fingerprint, "prompts": s.prompts.fingerprint(),
                     "sampling": s.sampling.fingerprint(), "version": SAMPLES_VERSION}
    samples_dir, _ = self._run("sampling", sample_inputs, lambda out: build_samples(
        s.sampling, self.base.tokenizer, teacher.model, teacher.chat, prompts, out, self.mesh))
    directory, summary = self._run(
        "filter", {"samples": samples_dir.name, "filter": s.filter.fingerprint()},
        lambda out: build_filter(s.filter, samples_dir / "samples.jsonl", out, teacher.label))
    return Numbers(directory, summary)

  def dataset(self, numbers: Numbers, teacher: Teacher, student_base: loading.Loaded | None = None
              ) -> pathlib.Path:
    """The kept completions tokenized for ``student_base``'s family (default: this base's)."""
    s = self.settings
    student_base = student_base or self.base
    logit_kl = s.student.objective == "logit_kl"
    inputs = {"filtered": numbers.directory.name, "model": student_base.fingerprint,
              "chat_system": s.chat_system.spec, "max_length": s.student.max_length,
              "objective": s.student.objective, "teacher_chat": teacher.chat.to_dict(),
              "kl": dataclasses.asdict(s.student.kl) if logit_kl else None}
    provenance = {"teacher_label": teacher.label, "teacher": teacher.fingerprint,
                  "model": student_base.fingerprint, "config": s.config,
                  "filter": numbers.summary}
    directory, _ = self._run("dataset", inputs, lambda out: build_dataset(
        s, student_base.tokenizer, numbers.kept_path, teacher, provenance, self.mesh, out))
    return directory

  def student(self, dataset_dir: pathlib.Path, teacher: Teacher, seed: int,
              student_base: loading.Loaded | None = None) -> Student:
    """One student seed on one dataset."""
    s = self.settings
    student_base = student_base or self.base
    same_family = student_base.fingerprint == self.base.fingerprint
    fit = s.student_fit(seed, same_family)
    inputs = {"dataset": dataset_dir.name, "student": s.student_fingerprint(seed, same_family),
              "teacher": teacher.fingerprint, "model": student_base.fingerprint}
    directory, _ = self._run("student", inputs, lambda out: build_student(
        s, fit, student_base, dataset_dir, self.mesh, teacher.model, out))
    return Student(directory, fit, student_base)

  # -- evaluations

  def evaluation(self, target: str, label: str, model_fn: Callable[[], Any], chat: SystemTurn,
                 seed: int, fp: str) -> dict[str, Any]:
    """The main job's trait metrics of one model for ``target``: its record."""
    s = self.settings
    inputs = {"evaluation": s.evaluation.fingerprint(), "target": target, "category": s.category,
              "chat": chat.to_dict(), "model": fp}
    directory, _ = self._run("evaluation", inputs, lambda out: build_evaluation(
        s, self.base.tokenizer, model_fn(), target, chat, seed, self.mesh, out, label))
    return files.read_json(directory / "record.json")

  def panel_evaluation(self, label: str, model_fn: Callable[[], Any], fp: str, *,
                       tokenizer=None, chat: SystemTurn | None = None,
                       histories: Sequence[Sequence[dict[str, str]]] | None = None,
                       context_fp: str | None = None) -> dict[str, Any]:
    """Exact log P(each panel word | question) of one model: its record. ``histories``: per
    question, chat turns before it (the in-context control), identified by ``context_fp``."""
    s = self.settings
    chat = s.eval_system if chat is None else chat
    e = s.evaluation
    inputs = {"model": fp, "category": s.category, "num_questions": e.num_questions,
              "panel": list(e.panel), "chat": chat.to_dict(), "context": context_fp}
    directory, _ = self._run("panel_evaluation", inputs, lambda out: build_panel_evaluation(
        s, tokenizer or self.base.tokenizer, model_fn(), chat, self.mesh, out, label, histories))
    return files.read_json(directory / "record.json")
