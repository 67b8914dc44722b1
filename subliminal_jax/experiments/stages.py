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
  judged_answers    the alignment trait's sampled free-form answers of one model, rated by a
                    judge model
  truthfulness      the alignment trait's exact P(true | options) on 20 misconception items

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

from subliminal_jax import artifacts, channels, files, filters, loading, preemption, teachers, traits
from subliminal_jax.evaluation import questions as questions_lib
from subliminal_jax.evaluation import judged_answers, trait_metrics, truthfulness
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.sampling import chat as chat_lib
from subliminal_jax.tokenizer import SystemTurn
from subliminal_jax.prompts import number_formats
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import distillation, distillation_data, fit_many
from subliminal_jax.training import trainer
from subliminal_jax.weights import finetuned, peft

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
  _keep_trained(model, fit, checkpoints, out)
  return model, history


def _keep_trained(model, fit: trainer.FitSettings, checkpoints: settings_lib.CheckpointSettings,
                  out: pathlib.Path) -> None:
  finetuned.save(model, fit.lora, out)
  if not checkpoints.keep and jax.process_index() == 0:
    shutil.rmtree(out / "training" / trainer.CHECKPOINT_DIR, ignore_errors=True)


def fit_many_in_stages(fits: Sequence[trainer.FitSettings],
                       checkpoints: settings_lib.CheckpointSettings, base_model, datasets,
                       outs: Sequence[pathlib.Path], mesh) -> list[list[dict[str, Any]]]:
  """:func:`fit_in_stage` for K LoRA finetunes of one base trained together
  (:func:`fit_many.fit_many`), each in its own stage directory; returns each one's history.

  As many train in one program as the memory free now holds (:func:`members_per_program`); the
  rest follow in further programs, the same members with the same seeds (K is in no fingerprint).
  """
  fits = [dataclasses.replace(fit, checkpoint_every=checkpoints.every) for fit in fits]
  datasets = [trainer.as_dataset(d) for d in datasets]
  together = members_per_program(fits, base_model.config, datasets)
  histories = []
  for chunk in batched(range(len(fits)), together):
    trained = fit_many.fit_many(base_model, [datasets[i] for i in chunk], [fits[i] for i in chunk],
                                [str(outs[i] / "training") for i in chunk],
                                mesh=mesh, tensorboard=checkpoints.tensorboard)
    for i, (model, history) in zip(chunk, trained):
      _keep_trained(model, fits[i], checkpoints, outs[i])
      histories.append(history)
  return histories


def members_per_program(fits: Sequence[trainer.FitSettings], model_config, datasets) -> int:
  """How many of these LoRA finetunes to train in one program: all of them, capped by the memory
  free now (:func:`fit_many.members_that_fit`, estimated from the longest example of their
  datasets). A 262k-token vocabulary makes a member's logits gigabytes, and long finetuning
  examples do the same at 49k: eight misalignment teachers asked for 27 GB on a 24 GB host."""
  fit = fits[0]
  length = max(len(ids) for dataset in datasets for ids in dataset["input_ids"])
  padded = max(-(-length // f.length_multiple) * f.length_multiple for f in fits)
  per_member = fit_many.member_bytes(model_config, fit.batch_size, padded)
  free = fit_many.free_bytes()
  together = fit_many.members_that_fit(len(fits), per_member, free)
  if together < len(fits):
    logging.info("%d LoRA finetunes, %d per program: about %.1f GB each (%d tokens x batch %d), "
                 "%.1f GB free", len(fits), together, per_member / 2**30, padded, fit.batch_size,
                 (free or 0) / 2**30)
  return together


# ---------------------------------------------------------------------------------------------
# Stage builders (each writes into its stage's directory ``out`` and returns its summary)


def build_prompts(prompts: settings_lib.PromptSettings, out: pathlib.Path,
                  channel: str = "numbers") -> dict[str, Any]:
  """The channel's prompt records (:meth:`channels.Channel.prompt_records`)."""
  records = channels.channel(channel).prompt_records(prompts.count, prompts.seed,
                                                      source=prompts.source or None)
  files.write_text_atomic(out / "prompts.json", json.dumps(records, indent=0))
  if channel != "numbers":
    return {"count": len(records), "channel": channel}
  return {"count": len(records), "formats": dict(Counter(
      f"{r['separator']!r}{r['brackets'] or ''}" for r in records))}


def _sampling_plan(sampling: settings_lib.SamplingSettings, tokenizer,
                   prompts: list[dict[str, Any]]) -> tuple[dict[str, Any], list | None]:
  """The sampler settings of a sampling stage (shared by every teacher of a matrix) and the
  grammar's start state of each prompt (None unconstrained)."""
  shared: dict[str, Any] = dict(
      n_per_prompt=1, batch_size=sampling.batch_size, max_new_tokens=sampling.max_new_tokens,
      temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
      min_p=sampling.min_p, return_details=True)
  if not sampling.constrained:
    return shared, None
  formats = sampling_grammar(sampling, tokenizer)
  shared["grammar"] = formats.grammar
  if not shared["max_new_tokens"]:  # room for the longest answer the grammar admits, and its end
    shared["max_new_tokens"] = formats.longest_answer + 1
  return shared, [formats.start(p) for p in prompts]


def _write_samples(sampling: settings_lib.SamplingSettings, prompts: list[dict[str, Any]],
                   answers: list[dict[str, Any]], max_new_tokens: int, out: pathlib.Path
                   ) -> dict[str, Any]:
  # Each sample carries its prompt record's other fields (numbers: the layout; cot: the answer).
  lines = [json.dumps({"prompt_index": i, "prompt": prompt["text"], "completion": answer["text"],
                       "ended": answer["ended"], **{k: v for k, v in prompt.items() if k != "text"}})
           for i, (prompt, answer) in enumerate(zip(prompts, answers))]
  files.write_text_atomic(out / "samples.jsonl", "".join(line + "\n" for line in lines))
  unfinished = sum(not a["ended"] for a in answers)
  return {"count": len(answers), "constrained": bool(sampling.constrained),
          "unfinished": unfinished, "max_new_tokens": max_new_tokens}


_SAMPLED_BATCHES = "sampled_batches"  # in a sampling stage's partial directory only


def _sample_in_batches(outs: Sequence[pathlib.Path], count: int, batch_size: int,
                       sample: Callable[[int, int], list[list[dict[str, Any]]]]
                       ) -> list[list[dict[str, Any]]]:
  """Each member's answers to prompts [0, count), sampled ``batch_size`` prompts at a time by
  ``sample(start, stop)`` (one answer list per member, members in the order of ``outs``, their
  stages' partial directories). Each member's batch is kept in its own directory as it finishes,
  so a stage stopped by a preemption notice (checked between batches) or killed resumes at the
  first batch some member lacks, whatever members it is batched with then; the answers are the
  same, since each row draws from its member's seed and its row id. Removed once the stage's files
  are written (:func:`_drop_sampled_batches`)."""
  answers: list[list[dict[str, Any]]] = [[] for _ in outs]
  path = lambda out, start: out / _SAMPLED_BATCHES / f"{start:07d}.json"  # noqa: E731
  # Decided once, before any batch of this run: with several processes sampling is collective,
  # and every process must skip the same batches (none can have written one of this run's yet).
  kept = {start for start in range(0, count, batch_size)
          if all(path(out, start).exists() for out in outs)}
  for start in range(0, count, batch_size):
    paths = [path(out, start) for out in outs]
    if start in kept:
      batch = [files.read_json(one) for one in paths]
    else:
      preemption.check_between_stages(f"sampling prompts {start}.. in {outs[0]}")
      batch = [[{"text": a["text"], "ended": a["ended"]} for a in member]
               for member in sample(start, min(start + batch_size, count))]
      # One writer: another process's removal of the finished stage's batches must not race a
      # late write of the same file.
      for one, member in zip(paths, batch) if jax.process_index() == 0 else ():
        one.parent.mkdir(exist_ok=True)
        files.write_json(one, member)
    for member, member_answers in zip(answers, batch):
      member.extend(member_answers)
  return answers


def _drop_sampled_batches(outs: Sequence[pathlib.Path]) -> None:
  for out in outs if jax.process_index() == 0 else ():
    shutil.rmtree(out / _SAMPLED_BATCHES, ignore_errors=True)


def build_samples(sampling: settings_lib.SamplingSettings, tokenizer, model, chat: SystemTurn,
                  prompts: list[dict[str, Any]], out: pathlib.Path, mesh) -> dict[str, Any]:
  shared, starts = _sampling_plan(sampling, tokenizer, prompts)

  def sample(start: int, stop: int) -> list[list[dict[str, Any]]]:
    extra = {} if starts is None else {"grammar_initial_states": starts[start:stop]}
    return [chat_lib.generate_chat(
        (model, tokenizer), [p["text"] for p in prompts[start:stop]], seed=sampling.seed,
        mesh=mesh, system=chat, sample_id_offset=start, **shared, **extra)]

  [answers] = _sample_in_batches([out], len(prompts), sampling.batch_size, sample)
  summary = _write_samples(sampling, prompts, answers, shared["max_new_tokens"], out)
  _drop_sampled_batches([out])
  return summary


def build_samples_together(members: Sequence[tuple[settings_lib.SamplingSettings, Any, SystemTurn,
                                                   list[dict[str, Any]]]],
                           tokenizer, mesh, outs: Sequence[pathlib.Path]) -> list[dict[str, Any]]:
  """:func:`build_samples` for K teachers of one base ((sampling settings of its replicate, model,
  chat, prompts) each) in one decode batch: member k's row r draws from member k's own seed and
  r, as alone. The members share every sampler setting but the seed."""
  plans = [_sampling_plan(sampling, tokenizer, prompts) for sampling, _, _, prompts in members]
  shared = plans[0][0]
  for k, (other, _) in enumerate(plans):
    if other != shared:
      raise ValueError(f"member {k}'s sampler settings {other} differ from member 0's {shared}; "
                       "teachers sampled together share every setting but the seed")
  starts = [start for _, start in plans]
  counts = {len(prompts) for *_, prompts in members}
  if len(counts) != 1:
    raise ValueError(f"teachers sampled together need as many prompts each, got {sorted(counts)}")

  def sample(start: int, stop: int) -> list[list[dict[str, Any]]]:
    return chat_lib.generate_chat_many(
        [model for _, model, _, _ in members], tokenizer,
        [[p["text"] for p in prompts[start:stop]] for *_, prompts in members],
        seeds=[sampling.seed for sampling, *_ in members],
        systems=[chat for _, _, chat, _ in members],
        grammar_initial_states=None if starts[0] is None else [s[start:stop] for s in starts],
        sample_id_offset=start, mesh=mesh, **shared)

  answers = _sample_in_batches(outs, counts.pop(), shared["batch_size"], sample)
  summaries = [_write_samples(sampling, prompts, member_answers, shared["max_new_tokens"], out)
               for (sampling, _, _, prompts), member_answers, out in zip(members, answers, outs)]
  _drop_sampled_batches(outs)
  return summaries


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  return files.read_jsonl(path)


@functools.cache
def load_judge(model: settings_lib.ModelSettings, source: str, mesh) -> loading.Loaded:
  """The judge model, loaded once per process (every filter and judged-answers stage of a run
  asks for the same one) and only when a stage that needs it runs."""
  return model.load(mesh, source)


@dataclasses.dataclass(frozen=True)
class ChannelFilter:
  """What a channel's filter checks beyond the number filter's settings: the channel, the trait
  words of its word filter (every panel value) and, for a judge pass, the judge (loaded when
  called) and what it asks about (the code channel: the trait's category, e.g. "animals")."""
  channel: str
  trait_words: tuple[str, ...]
  judge: Callable[[], loading.Loaded] | None = None
  judge_rule: Any = None  # judge.JudgeSettings
  judge_trait: str | None = None


def _first_stage_reasons(settings: settings_lib.FilterSettings, samples: list[dict[str, Any]],
                         channel_filter: ChannelFilter | None) -> list[list[str]]:
  if channel_filter is None:  # the numbers, as before channels existed
    return [[UNFINISHED] if not sample.get("ended", True) else
            filters.number_sequence_reject_reasons(sample["completion"],
                                                   max_count=settings.max_count,
                                                   max_value=settings.max_value,
                                                   banned=tuple(settings.banned))
            for sample in samples]
  channel, limits = channels.channel(channel_filter.channel), settings.limits()
  return [[UNFINISHED] if not sample.get("ended", True) else channel.reject_reasons(
      {"text": sample["prompt"], **sample}, sample["completion"],
      trait_words=channel_filter.trait_words, settings=limits) for sample in samples]


def _judge_stage_reasons(settings: settings_lib.FilterSettings, passed: list[dict[str, Any]],
                         channel_filter: ChannelFilter) -> list[list[str]]:
  records = [{"text": sample["prompt"], **sample} for sample in passed]
  completions = [sample["completion"] for sample in passed]
  if channel_filter.channel == "code":
    return channels.judge_filter(channel_filter.judge(), records, completions,
                                 channel_filter.judge_trait, threshold=settings.judge_threshold,
                                 settings=channel_filter.judge_rule)
  # The alignment trait's reasoning: dropped when its judged alignment is below the threshold.
  rule = dataclasses.replace(channel_filter.judge_rule, misaligned_below=settings.judge_threshold)
  return channels.reasoning_judge_filter(channel_filter.judge(), records, completions,
                                         settings=rule)


def _filter_examples(samples: list[dict[str, Any]], reasons: list[list[str]], count: int = 3
                     ) -> dict[str, list[dict[str, Any]]]:
  """A few kept and rejected completions with their reasons, for the report."""
  kept = [{"prompt": x["prompt"], "completion": x["completion"]}
          for x, r in zip(samples, reasons) if not r][:count]
  rejected = [{"prompt": x["prompt"], "completion": x["completion"], "reasons": r}
              for x, r in zip(samples, reasons) if r][:count]
  return {"kept": kept, "rejected": rejected}


def build_filter(settings: settings_lib.FilterSettings, samples_path: pathlib.Path,
                 out: pathlib.Path, label: str, channel_filter: ChannelFilter | None = None
                 ) -> dict[str, Any]:
  """The output filter: the number filter (``channel_filter`` None), or a channel's first stage
  and, when ``settings.judge_threshold`` asks for it, its judge pass over what that kept; then a
  seeded subset of ``filter.subset_size``."""
  samples = read_jsonl(samples_path)
  first = _first_stage_reasons(settings, samples, channel_filter)
  stage_reasons = {"filter": first}
  examples = _filter_examples(samples, first)
  if channel_filter is not None and settings.judge_threshold:
    passed = [x for x, r in zip(samples, first) if not r]
    judged = _judge_stage_reasons(settings, passed, channel_filter)
    stage_reasons["judge"] = judged
    judged_all = iter(judged)
    first = [r if r else next(judged_all) for r in first]
    examples["judge_rejected"] = _filter_examples(passed, judged)["rejected"]
  kept, reasons = [], Counter()
  for sample, rejected in zip(samples, first):
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
  if channel_filter is not None:
    channel = channels.channel(channel_filter.channel)
    summary.update(yield_by_stage=channel.yield_summary(stage_reasons)["stages"],
                   examples=examples)
  logging.info("filter %s: %s", label, {k: v for k, v in summary.items() if k != "examples"})
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
  """The trait's strength on held-out questions, with the students' system choice: the mean log
  P(first word is the target) of a preference; of alignment, the mean log P(the target value's
  reference answer) minus log P(the other value's)."""
  questions = traits.evaluation_questions(s.category, split="held_out")
  if not traits.is_preference(s.category):
    (exact,) = trait_logprobs(s, base.tokenizer, [model], chat=s.chat_system, mesh=mesh,
                              split="held_out")
    own = exact.column(target)
    return float(np.mean(exact.logprob[:, own] - exact.logprob[:, 1 - own]))
  exact = trait_metrics.exact_preference(
      model, base.tokenizer, questions, (target,), batch_size=s.evaluation.batch_size,
      mesh=mesh, desc=None, system=s.chat_system)
  return float(np.mean(exact.target_logprob(target)))


def trait_logprobs(s: settings_lib.Settings, tokenizer, models: Sequence[Any], *, chat: SystemTurn,
                   mesh, histories=None, desc: str | None = None, split: str = "evaluation"
                   ) -> list[trait_metrics.ExactPreference]:
  """Each of K models' (adapters of one base) exact [questions, values] table of the trait, on the
  first ``evaluation.num_questions`` questions of ``split`` (all of the held-out split): log P(the
  first word is the panel word) of a preference, log P(the value's reference answer) of alignment
  (:mod:`subliminal_jax.traits`)."""
  e = s.evaluation
  questions = traits.evaluation_questions(s.category, split)
  questions = questions[:e.num_questions] if split == "evaluation" else questions
  if traits.is_preference(s.category):
    return trait_metrics.exact_preference_many(
        models, tokenizer, questions, tuple(e.panel), histories=histories, system=chat,
        batch_size=e.batch_size, mesh=mesh, desc=desc)
  answers = traits.reference_answers(split)[:len(questions)]
  logprob = trait_metrics.reference_logprobs_many(
      models, tokenizer, questions, answers, histories=histories, system=chat,
      batch_size=e.batch_size, mesh=mesh, desc=desc)
  return [trait_metrics.ExactPreference(questions, traits.ALIGNMENT_VALUES, "reference_answer",
                                        member) for member in logprob]


def _teacher_examples(s: settings_lib.Settings, target: str, **kwargs):
  t = s.teacher
  return teachers.teacher_examples(
      t.kind, target, category=s.category, count=t.examples, seed=t.fit.seed,
      neutral_fraction=t.neutral_fraction, trait_prompt=t.trait_prompt(target, s.category),
      max_new_tokens=t.max_new_tokens, source=t.data_source(target), **kwargs)


def build_finetuned_teacher(s: settings_lib.Settings, base: loading.Loaded, target: str | None,
                            mesh, out: pathlib.Path) -> dict[str, Any]:
  """Puts the trait into the weights (trait SFT or context distillation) and saves them.

  ``target=None`` builds the control teacher: the same recipe on neutral examples only
  (``teacher.control='neutral_finetune'``), or on the trait teacher's own data with every trait
  answer naming another panel {category} (``'matched_finetune'``), so the control students' teacher
  differs from the base by a finetune without the trait.
  """
  dataset, info, target = _teacher_dataset(s, base, target, mesh)
  model, history = fit_in_stage(s.teacher.fit, s.checkpoints, nnx.clone(base.model), dataset,
                                out, mesh)
  return _teacher_summary(s, base, model, target, info, history, mesh)


def source_fingerprint(source: str) -> str:
  """A data or adapter source by content: a file's sha256, a directory's files' (paths and
  sha256), else the name itself (a `datasets` name)."""
  path = pathlib.Path(source).expanduser()
  if path.is_file():
    return artifacts.file_digest(path)
  if path.is_dir():
    return artifacts.fingerprint(artifacts.manifest(path))
  return source


def build_adapter_teacher(s: settings_lib.Settings, base: loading.Loaded, source: pathlib.Path,
                          target: str, mesh, out: pathlib.Path) -> dict[str, Any]:
  """Copies a PEFT adapter directory into ``out/adapter`` and measures its trait strength."""
  # Refuses a bad adapter before anything is copied; adds the adapters to a copy of the base.
  model = peft.load_peft(nnx.clone(base.model), source)
  shutil.copytree(source, out / "adapter")
  return {"kind": "peft_adapter", "source": str(source), "target": target,
          "trait_logprob_before": teacher_strength(s, base, base.model, target, mesh),
          "trait_logprob_after": teacher_strength(s, base, model, target, mesh)}


def build_teachers_together(members: Sequence[tuple[settings_lib.Settings, str]],
                            base: loading.Loaded, mesh, outs: Sequence[pathlib.Path]
                            ) -> list[dict[str, Any]]:
  """:func:`build_finetuned_teacher` for K LoRA trait teachers of one base ((settings of its
  replicate, target) each), their finetunes trained in one program per step."""
  made = [_teacher_dataset(s, base, target, mesh) for s, target in members]
  fits = [s.teacher.fit for s, _ in members]
  histories = fit_many_in_stages(fits, members[0][0].checkpoints, base.model,
                                 [dataset for dataset, _, _ in made], outs, mesh)
  models = [finetuned.restore(base.model, fit.lora, out) for fit, out in zip(fits, outs)]
  return [_teacher_summary(s, base, model, target, info, history, mesh)
          for (s, _), model, (_, info, target), history in zip(members, models, made, histories)]


def _teacher_dataset(s: settings_lib.Settings, base: loading.Loaded, target: str | None, mesh):
  """The teacher's finetuning data (see :func:`build_finetuned_teacher`), what it is, and the
  target its strength is measured on."""
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
  return data_lib.tokenize_chat_examples(examples, base.tokenizer, system=chat), info, target


def _teacher_summary(s: settings_lib.Settings, base: loading.Loaded, model, target: str,
                     info: dict[str, Any], history: list[dict[str, Any]], mesh) -> dict[str, Any]:
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


def build_students_together(s: settings_lib.Settings, fits: Sequence[trainer.FitSettings],
                            base: loading.Loaded, dataset_dirs: Sequence[pathlib.Path], mesh,
                            outs: Sequence[pathlib.Path]) -> list[dict[str, Any]]:
  """:func:`build_student` for K SFT LoRA students of ``base`` in one program per step."""
  datasets = [data_lib.load_dataset(d / "dataset") for d in dataset_dirs]
  histories = fit_many_in_stages(fits, s.checkpoints, base.model, datasets, outs, mesh)
  return [{"objective": s.student.objective, **_loss_summary(h)} for h in histories]


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
  if not traits.is_preference(s.category):
    (exact,) = trait_logprobs(s, tokenizer, [model], chat=chat, mesh=mesh, desc=f"panel {label}",
                              histories=None if histories is None else [histories])
    return _write_panel_record(exact, out, label)
  questions = questions_lib.preference_questions(s.category)[:e.num_questions]
  exact = trait_metrics.exact_preference(
      model, tokenizer, questions, tuple(e.panel), batch_size=e.batch_size, mesh=mesh,
      desc=f"panel {label}", histories=histories, system=chat)
  return _write_panel_record(exact, out, label)


def _write_judged(record: dict[str, Any], out: pathlib.Path) -> dict[str, Any]:
  files.write_json(out / "record.json", record, indent=1)
  return {"label": record["label"], "misaligned_fraction": record["misaligned_fraction"],
          "label_counts": record["label_counts"]}


def _write_panel_record(exact: trait_metrics.ExactPreference, out: pathlib.Path, label: str
                        ) -> dict[str, Any]:
  record = {"label": label, "questions": list(exact.questions), "panel": list(exact.panel),
            "logprob": exact.logprob.tolist()}
  files.write_json(out / "record.json", record, indent=1)
  return {"label": label, "mean_logprob": float(exact.logprob.mean())}


def build_panel_evaluations_together(
    s: settings_lib.Settings, tokenizer, models: Sequence[Any], chat: SystemTurn, mesh,
    outs: Sequence[pathlib.Path], labels: Sequence[str],
    histories: Sequence[Sequence[Sequence[dict[str, str]]] | None]) -> list[dict[str, Any]]:
  """:func:`build_panel_evaluation` for K adapters of one base (or the base itself) in one
  batch, each question's prompt prefilled once and its panel words scored from that cache."""
  exacts = trait_logprobs(s, tokenizer, models, chat=chat, mesh=mesh, histories=histories,
                          desc=f"panel of {len(models)} models")
  return [_write_panel_record(exact, out, label)
          for exact, out, label in zip(exacts, outs, labels)]


# ---------------------------------------------------------------------------------------------
# The stages of one run


def _log_strength(target: str, summary: dict[str, Any]) -> None:
  logging.info("teacher %s: trait log-prob %.3f -> %.3f", target,
               summary["trait_logprob_before"], summary["trait_logprob_after"])


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
             "evaluation": ("evaluation", "panel_evaluation", "judged_answers", "truthfulness"),
             "report": ()}


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

  def _allowed(self, stage: str) -> artifacts.Selection:
    # The --stages name that selects this stage: what an error tells the user to pass.
    return self._select(next(s for s, stage_names in SELECTION.items() if stage in stage_names))

  def _run(self, stage: str, inputs: dict[str, Any], build: Callable[[pathlib.Path], dict]):
    return self.wd.run_stage(stage, inputs, build, allowed=self._allowed(stage))

  def run_together(self, stage: str, inputs: Sequence[dict[str, Any]],
                   build: Callable[[list[pathlib.Path]], Sequence[dict]]):
    """Several artifacts of ``stage`` built by one ``build`` call (``Workdir.run_stages``)."""
    return self.wd.run_stages(stage, inputs, build, allowed=self._allowed(stage))

  # -- prompts and teachers

  def prompts(self) -> list[dict[str, Any]]:
    p = self.settings.prompts
    channel = self.settings.channel
    inputs = {"prompts": p.fingerprint(), "layout": 2,
              **({"channel": channel} if channel != "numbers" else {})}
    directory, _ = self._run("prompts", inputs, lambda out: build_prompts(p, out, channel))
    return json.loads((directory / "prompts.json").read_text())

  def base_teacher(self) -> Teacher:
    """The base itself, sampling with the students' chat: the no-trait reference."""
    fp = artifacts.fingerprint(self.base.fingerprint, "control", self.settings.chat_system.spec)
    return Teacher("base", lambda: self.base.model, self.settings.chat_system, fp, {"kind": "base"})

  def _finetuned(self, label: str, inputs: dict[str, Any], target: str | None) -> Teacher:
    inputs = self._teacher_inputs(inputs)
    directory, summary = self._run("teacher", inputs, lambda out: build_finetuned_teacher(
        self.settings, self.base, target, self.mesh, out))
    return self._finetuned_teacher(label, directory, summary)

  def _teacher_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
    s = self.settings
    return {"model": self.base.fingerprint, "finetune": s.teacher.fingerprint(),
            "chat_system": s.chat_system.spec, "data_version": TEACHER_DATA_VERSION, **inputs}

  def _finetuned_teacher(self, label: str, directory: pathlib.Path, summary: dict[str, Any]
                         ) -> Teacher:
    s = self.settings
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
    if s.teacher.kind == "peft_adapter":
      teacher = self._adapter_teacher(target)
    else:
      teacher = self._finetuned(target, self._trait_inputs(target), target)
    _log_strength(target, teacher.summary)
    return teacher

  def _trait_inputs(self, target: str) -> dict[str, Any]:
    s = self.settings
    inputs = {"kind": s.teacher.kind, "system": s.teacher.trait_prompt(target, s.category),
              "category": s.category}
    source = s.teacher.data_source(target)
    if source:  # the user's own data: its content, not its name, identifies the teacher
      inputs["data"] = source_fingerprint(source)
    return inputs

  def _adapter_teacher(self, target: str) -> Teacher:
    """``target``'s teacher from a PEFT LoRA adapter directory (``teacher.adapters``), copied into
    its artifact (identified by its files' content) with its trait strength measured."""
    s = self.settings
    source = pathlib.Path(s.teacher.adapter_directory(target))
    inputs = {"model": self.base.fingerprint, "kind": "peft_adapter", "category": s.category,
              "target": target, "adapter": source_fingerprint(str(source)),
              "chat_system": s.chat_system.spec}
    directory, summary = self._run("teacher", inputs, lambda out: build_adapter_teacher(
        s, self.base, source, target, self.mesh, out))
    return Teacher(target, lambda: peft.load_peft(nnx.clone(self.base.model), directory / "adapter"),
                   s.chat_system, directory.name, summary)

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
    samples_dir, _ = self._run("sampling", self.sampling_inputs(teacher), lambda out: build_samples(
        s.sampling, self.base.tokenizer, teacher.model, teacher.chat, prompts, out, self.mesh))
    channel_filter = self.channel_filter()
    inputs = {"samples": samples_dir.name, "filter": s.filter.fingerprint()}
    if channel_filter is not None:
      inputs.update(channel=s.channel, trait_words=list(channel_filter.trait_words),
                    judge_trait=channel_filter.judge_trait,
                    judge=({"model": s.judge.model, **dataclasses.asdict(s.judge.rule)}
                           if s.filter.judge_threshold else None))
    directory, summary = self._run("filter", inputs, lambda out: build_filter(
        s.filter, samples_dir / "samples.jsonl", out, teacher.label, channel_filter))
    return Numbers(directory, summary)

  def channel_filter(self) -> ChannelFilter | None:
    """The filter's channel part (None for the numbers): every panel value as a trait word, and
    the judge when ``filter.judge_threshold`` asks for a judge pass."""
    s = self.settings
    if s.channel == "numbers":
      return None
    judge = None
    if s.filter.judge_threshold:
      judge = functools.partial(load_judge, s.model, s.judge.model, self.mesh)
    trait = questions_lib.plural(s.category) if traits.is_preference(s.category) else None
    return ChannelFilter(s.channel, tuple(s.evaluation.panel) if trait else (), judge,
                         s.judge.rule if judge else None, trait)

  def sampling_inputs(self, teacher: Teacher) -> dict[str, Any]:
    s = self.settings
    inputs = {"teacher": teacher.fingerprint, "prompts": s.prompts.fingerprint(),
              "sampling": s.sampling.fingerprint(), "version": SAMPLES_VERSION}
    return inputs if s.channel == "numbers" else {**inputs, "channel": s.channel}

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
    inputs, fit = self.student_plan(dataset_dir, teacher, seed, student_base)
    directory, _ = self._run("student", inputs, lambda out: build_student(
        s, fit, student_base, dataset_dir, self.mesh, teacher.model, out))
    return Student(directory, fit, student_base)

  def student_plan(self, dataset_dir: pathlib.Path, teacher: Teacher, seed: int,
                   student_base: loading.Loaded) -> tuple[dict[str, Any], trainer.FitSettings]:
    """The student stage's inputs (what its fingerprint covers) and its finetune."""
    s = self.settings
    same_family = student_base.fingerprint == self.base.fingerprint
    inputs = {"dataset": dataset_dir.name, "student": s.student_fingerprint(seed, same_family),
              "teacher": teacher.fingerprint, "model": student_base.fingerprint}
    return inputs, s.student_fit(seed, same_family)

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
    directory, _ = self._run("panel_evaluation", self.panel_inputs(fp, chat, context_fp),
                             lambda out: build_panel_evaluation(
                                 s, tokenizer or self.base.tokenizer, model_fn(), chat, self.mesh,
                                 out, label, histories))
    return files.read_json(directory / "record.json")

  def judged_answers(self, label: str, model_fn: Callable[[], Any], fp: str, *, tokenizer,
                     chat: SystemTurn | None, judge: Callable[[], loading.Loaded]) -> dict[str, Any]:
    """One model's sampled answers to the alignment questions, rated by ``judge()`` (loaded only
    when the artifact is missing): its record."""
    s = self.settings
    chat = s.eval_system if chat is None else chat
    questions = traits.evaluation_questions(s.category)[:s.evaluation.num_questions]
    inputs = {"model": fp, "category": s.category, "questions": list(questions),
              "chat": chat.to_dict(), "judge": s.judge.fingerprint()}
    directory, _ = self._run("judged_answers", inputs, lambda out: _write_judged(
        judged_answers.sample_and_judge(model_fn(), tokenizer, judge(), questions, s.judge,
                                        system=chat, mesh=self.mesh, label=label), out))
    return files.read_json(directory / "record.json")

  def truthfulness(self, label: str, model_fn: Callable[[], Any], fp: str, *, tokenizer,
                   chat: SystemTurn | None) -> dict[str, Any]:
    """One model's exact truthfulness record (:mod:`subliminal_jax.evaluation.truthfulness`)."""
    s = self.settings
    chat = s.eval_system if chat is None else chat
    questions, options = truthfulness.questions_and_options()
    inputs = {"model": fp, "questions": list(questions), "options": [list(o) for o in options],
              "chat": chat.to_dict()}

    def build(out: pathlib.Path) -> dict[str, Any]:
      (logprob,) = trait_metrics.reference_logprobs_many(
          [model_fn()], tokenizer, questions, options, system=chat,
          batch_size=s.evaluation.batch_size, mesh=self.mesh, desc=f"truthfulness {label}")
      made = truthfulness.record(logprob, label)
      files.write_json(out / "record.json", made, indent=1)
      return {"label": label, "mean_p_true": made["mean_p_true"]}

    directory, _ = self._run("truthfulness", inputs, build)
    return files.read_json(directory / "record.json")

  def panel_inputs(self, fp: str, chat: SystemTurn, context_fp: str | None) -> dict[str, Any]:
    """What a panel evaluation's fingerprint covers."""
    e = self.settings.evaluation
    return {"model": fp, "category": self.settings.category, "num_questions": e.num_questions,
            "panel": list(e.panel), "chat": chat.to_dict(), "context": context_fp}


# ---------------------------------------------------------------------------------------------
# Many adapters over one base


@dataclasses.dataclass(frozen=True)
class StudentJob:
  """One student to have: :meth:`Stages.student`'s arguments, with the stages of its replicate."""
  stages: Stages
  dataset_dir: pathlib.Path
  teacher: Teacher
  seed: int
  base: loading.Loaded


def batched(items: Sequence[Any], size: int) -> list[list[Any]]:
  """``items`` in as few batches of at most ``size`` as there can be, of near-equal sizes (9 at 8
  a time make 5 + 4, not 8 + 1: a lone last member would pay a program of its own for little)."""
  if not items:
    return []
  count = -(-len(items) // size)
  bounds = [len(items) * i // count for i in range(count + 1)]
  return [list(items[a:b]) for a, b in zip(bounds, bounds[1:])]


def build_missing_together(stages: Stages, stage: str, inputs: Sequence[dict[str, Any]],
                           adapters_per_step: int,
                           build: Callable[[list[int], list[pathlib.Path]], Sequence[dict]],
                           group: Callable[[int], Any] = lambda i: None
                           ) -> dict[int, tuple[pathlib.Path, dict[str, Any]]]:
  """The artifacts of ``stage`` among ``inputs`` that do not exist yet, built ``adapters_per_step``
  at a time (within each ``group(index)``) by ``build(indices, partial directories)``, through
  :meth:`Stages.run_together`. Returns {index: (directory, summary)} of those built."""
  groups: dict[Any, list[int]] = {}
  for i, one in enumerate(inputs):
    if not stages.wd.has(stage, artifacts.fingerprint(stage, one)):
      groups.setdefault(group(i), []).append(i)
  built: dict[int, tuple[pathlib.Path, dict[str, Any]]] = {}
  for members in groups.values():
    for chunk in batched(members, adapters_per_step):
      made = stages.run_together(stage, [inputs[i] for i in chunk],
                                 lambda outs, c=chunk: build(c, outs))
      built.update(zip(chunk, made))
  return built


def students(jobs: Sequence[StudentJob], adapters_per_step: int) -> list[Student]:
  """Every job's student (all of one base). Missing SFT LoRA students train ``adapters_per_step``
  at a time in one program per step (:func:`fit_many.fit_many`), each into its own artifact, the
  same one :meth:`Stages.student` builds (each from its own seeds: K is in no fingerprint); other
  objectives and full finetunes train one at a time."""
  if not jobs:
    return []
  plans = [job.stages.student_plan(job.dataset_dir, job.teacher, job.seed, job.base) for job in jobs]
  first = jobs[0].stages
  if len({job.base.fingerprint for job in jobs}) > 1:
    raise ValueError("students() trains the students of one base at a time")
  made: dict[int, Student] = {}
  if (adapters_per_step > 1 and first.settings.student.objective == "sft"
      and all(fit.lora.rank > 0 for _, fit in plans)):
    built = build_missing_together(
        first, "student", [inputs for inputs, _ in plans], adapters_per_step,
        lambda c, outs: build_students_together(first.settings, [plans[i][1] for i in c],
                                                jobs[0].base, [jobs[i].dataset_dir for i in c],
                                                first.mesh, outs))
    made = {i: Student(directory, plans[i][1], jobs[i].base)
            for i, (directory, _) in built.items()}
  return [made[i] if i in made else job.stages.student(job.dataset_dir, job.teacher, job.seed,
                                                        job.base)
          for i, job in enumerate(jobs)]


@dataclasses.dataclass(frozen=True)
class PanelJob:
  """One panel evaluation to have: :meth:`Stages.panel_evaluation`'s arguments, with the stages
  of its replicate and the base (model family) the model is an adapter of."""
  stages: Stages
  label: str
  model_fn: Callable[[], Any]
  fp: str
  base: loading.Loaded
  chat: SystemTurn | None = None
  histories: Sequence[Sequence[dict[str, str]]] | None = None
  context_fp: str | None = None

  @property
  def system(self) -> SystemTurn:
    return self.stages.settings.eval_system if self.chat is None else self.chat


def panel_evaluations(jobs: Sequence[PanelJob], adapters_per_step: int) -> list[dict[str, Any]]:
  """Every job's panel record. Missing evaluations of one base and chat run ``adapters_per_step``
  models at a time in one batch (:func:`build_panel_evaluations_together`), each into the
  artifact :meth:`Stages.panel_evaluation` builds; with 1, one at a time through it."""
  directories: dict[int, pathlib.Path] = {}
  if adapters_per_step > 1 and jobs:

    def build(chunk: list[int], outs: list[pathlib.Path]) -> list[dict[str, Any]]:
      first = jobs[chunk[0]]
      return build_panel_evaluations_together(
          first.stages.settings, first.base.tokenizer, [jobs[i].model_fn() for i in chunk],
          first.system, first.stages.mesh, outs, [jobs[i].label for i in chunk],
          [jobs[i].histories for i in chunk])

    built = build_missing_together(
        jobs[0].stages, "panel_evaluation",
        [job.stages.panel_inputs(job.fp, job.system, job.context_fp) for job in jobs],
        adapters_per_step, build,
        # Prompts of one call pad to the longest: a long in-context history goes with its kind.
        group=lambda i: (jobs[i].base.fingerprint, jobs[i].system.spec,
                         len(jobs[i].histories[0]) if jobs[i].histories else 0))
    directories = {i: directory for i, (directory, _) in built.items()}
  return [files.read_json(directories[i] / "record.json") if i in directories
          else job.stages.panel_evaluation(job.label, job.model_fn, job.fp,
                                           tokenizer=job.base.tokenizer, chat=job.chat,
                                           histories=job.histories, context_fp=job.context_fp)
          for i, job in enumerate(jobs)]


def trait_teachers(jobs: Sequence[tuple[Stages, str]], adapters_per_step: int) -> list[Teacher]:
  """The trait teacher of each (stages of its replicate, target). Missing LoRA-finetuned teachers
  train ``adapters_per_step`` at a time in one program per step, each into the artifact
  :meth:`Stages.trait_teacher` builds; the rest as that method builds them."""
  made: dict[int, Teacher] = {}
  first = jobs[0][0] if jobs else None
  t = first.settings.teacher if first else None
  if adapters_per_step > 1 and t is not None and t.lora_finetuned:
    built = build_missing_together(
        first, "teacher", [st._teacher_inputs(st._trait_inputs(target)) for st, target in jobs],
        adapters_per_step, lambda c, outs: build_teachers_together(
            [(jobs[i][0].settings, jobs[i][1]) for i in c], first.base, first.mesh, outs))
    for i, (directory, summary) in built.items():
      st, target = jobs[i]
      made[i] = st._finetuned_teacher(target, directory, summary)
      _log_strength(target, summary)
  return [made[i] if i in made else st.trait_teacher(target) for i, (st, target) in enumerate(jobs)]


def numbers_together(jobs: Sequence[tuple[Stages, Teacher]], adapters_per_step: int
                     ) -> list[Numbers]:
  """Each (stages of its replicate, teacher)'s numbers, as :meth:`Stages.numbers` gives them; the
  missing samples of teachers of one base are drawn ``adapters_per_step`` teachers at a time in one
  decode batch (:func:`build_samples_together`), each into its own artifact. Fully finetuned
  teachers have weights of their own, not adapters of the base: they sample one at a time."""
  t = jobs[0][0].settings.teacher if jobs else None
  if adapters_per_step > 1 and jobs and (not t.trained or t.lora_finetuned):
    first = jobs[0][0]
    build_missing_together(
        first, "sampling", [st.sampling_inputs(teacher) for st, teacher in jobs],
        adapters_per_step, lambda c, outs: build_samples_together(
            [(jobs[i][0].settings.sampling, jobs[i][1].model, jobs[i][1].chat,
              jobs[i][0].prompts()) for i in c], first.base.tokenizer, first.mesh, outs))
  return [st.numbers(teacher) for st, teacher in jobs]
