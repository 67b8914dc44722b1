"""Stage pieces that need no model: answer formats per prompt, the filter's unfinished rule,
students' adapter seeds and teacher replicates."""

import json

import pytest

from configs import animal_numbers as animal_config
from configs import transfer_matrix as matrix_config
from subliminal_jax import filters
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.experiments import stages
from subliminal_jax.prompts import number_prompts
from subliminal_jax.prompts import number_formats
from subliminal_jax.tokenizer import Tokenizer
from subliminal_jax.weights import embedded


@pytest.fixture(scope="module")
def smollm2_tokenizer():
  return Tokenizer.from_gguf(embedded.smollm2_path())


def test_each_prompt_gets_the_answer_format_it_asks_for(smollm2_tokenizer, tmp_path):
  config = animal_config.get_config("quick")
  config.prompts.count = 60
  settings = settings_lib.from_config(config)
  stages.build_prompts(settings.prompts, tmp_path)
  prompts = json.loads((tmp_path / "prompts.json").read_text())
  formats = stages.sampling_grammar(settings.sampling, smollm2_tokenizer)
  grammar = formats.grammar
  assert set(formats.starts) == set(number_formats.answer_layouts("per_prompt", ", "))
  assert len(formats.starts) == 6
  for prompt in prompts:
    layout = next(f for f in number_prompts.FORMAT_SUFFIXES if f.text in prompt["text"])
    assert (prompt["separator"], prompt["brackets"]) == (layout.separator, layout.brackets)
    answer = layout.separator.join(["12", "345", "6"])
    if layout.brackets:
      answer = layout.brackets[0] + answer + layout.brackets[1]
    start = formats.start(prompt)
    ids = smollm2_tokenizer.encode(answer)
    state = grammar.walk(ids, start)
    assert state >= 0 and grammar.accepting[state], (prompt["text"], answer)
    assert filters.number_sequence_reject_reasons(answer) == []
    # The same numbers in another layout are not what this prompt asked for.
    other = "12;345;6" if layout.separator != "; " else "12, 345, 6"
    assert grammar.walk(smollm2_tokenizer.encode(other), start) < 0 or not grammar.accepting[
        grammar.walk(smollm2_tokenizer.encode(other), start)]
  # The longest answer of any layout, plus the end token, is what max_new_tokens=0 allows.
  assert formats.longest_answer == 51
  config.sampling.format = "fixed"
  fixed = stages.sampling_grammar(settings_lib.from_config(config).sampling, smollm2_tokenizer)
  assert list(fixed.starts) == [(", ", None)] and fixed.longest_answer == 49
  assert fixed.start(prompts[0]) == fixed.starts[(", ", None)]  # whatever the prompt asked for


def test_unfinished_completions_are_dropped_and_counted(tmp_path):
  config = animal_config.get_config("tiny")
  config.filter.subset_size = 10
  samples = [{"prompt_index": 0, "prompt": "p", "completion": "1, 2, 3", "ended": True},
             {"prompt_index": 1, "prompt": "p", "completion": "1, 2, 3", "ended": False},
             {"prompt_index": 2, "prompt": "p", "completion": "1, 2,", "ended": False},
             {"prompt_index": 3, "prompt": "p", "completion": "no", "ended": True}]
  path = tmp_path / "samples.jsonl"
  path.write_text("".join(json.dumps(s) + "\n" for s in samples))
  summary = stages.build_filter(settings_lib.from_config(config).filter, path, tmp_path, "test")
  kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
  # A list cut mid-way parses as numbers but is not the answer the teacher gave: never kept.
  assert [s["prompt_index"] for s in kept] == [0]
  assert summary["unfinished"] == 2 and summary["reject_reasons"] == {"unfinished": 2, "empty": 1}


def test_fresh_student_adapters_never_start_from_a_teachers_seed():
  config = matrix_config.get_config("cpu")
  settings = settings_lib.from_config(config)
  teacher_seeds = {settings.replicated(r).teacher.fit.lora.seed for r in range(50)}
  for init in ("teacher", "fresh"):
    config.student.lora.init = init
    settings = settings_lib.from_config(config)
    for seed in range(50):
      fit = settings.student_fit(seed)
      if init == "teacher":
        assert fit.lora.seed == config.teacher.finetune.lora.seed
      else:
        assert fit.lora.seed not in teacher_seeds
        assert fit.lora.seed == settings_lib.FRESH_LORA_SEED_OFFSET + seed
      assert fit.seed == seed
      # A student of another family cannot share a teacher's adapters: always fresh.
      other = settings.student_fingerprint(seed, same_family=False)
      assert other["lora"]["init"] == "fresh" and other["lora"]["seed"] not in teacher_seeds
  config.student.cross_init = True
  settings = settings_lib.from_config(config)
  cross = {settings.student_fit(s).lora.seed for s in range(50)}
  assert not cross & teacher_seeds
  assert not cross & {settings_lib.FRESH_LORA_SEED_OFFSET + s for s in range(50)}


def test_teacher_replicates_move_every_teacher_and_data_seed():
  config = matrix_config.get_config("cpu")
  settings = settings_lib.from_config(config)
  assert settings.replicated(0) is settings
  second = settings.replicated(2)
  shift = 2 * settings_lib.REPLICATE_SEED_STRIDE
  for section in ("prompts", "sampling", "filter"):
    assert getattr(second, section).seed == config[section].seed + shift
  assert second.teacher.fit.seed == config.teacher.finetune.seed + shift
  assert second.teacher.fit.lora.seed == config.teacher.finetune.lora.seed + shift
  assert second.student.seeds == tuple(config.student.seeds)  # replicated within each teacher
  assert second.student_fit(0).lora.seed == second.teacher.fit.lora.seed  # lora.init "teacher"
  with pytest.raises(ValueError, match="replicate=-1"):
    settings.replicated(-1)


def test_knobs_at_their_original_behaviour_stay_out_of_fingerprints():
  config = matrix_config.get_config("cpu")
  settings = settings_lib.from_config(config)
  fingerprinted = settings.student_fingerprint(0)
  assert settings.student_fit(0).bucket is True and settings.student_fit(0).length_multiple == 16
  assert "bucket" not in fingerprinted and "length_multiple" not in fingerprinted
  assert fingerprinted["learning_rate"] == config.student.learning_rate
  config.student.length_multiple = 8  # trains differently: part of the fingerprint
  assert settings_lib.from_config(config).student_fingerprint(0)["length_multiple"] == 8
  assert "neutral_fraction" not in settings.teacher.fingerprint()


def test_a_sampling_stage_stopped_between_batches_resumes_at_the_first_missing_one(tmp_path,
                                                                                   monkeypatch):
  """A preemption notice during the first of three batches: the stage stops after it, keeping it;
  the rerun samples only the other two, and samples.jsonl is byte for byte the uninterrupted one's
  (each row draws from its seed and row id, not from its batch)."""
  from subliminal_jax import loading, preemption
  from subliminal_jax.sampling import chat as chat_lib
  config = matrix_config.get_config("tiny")
  config.prompts.count = 20
  config.sampling.batch_size = 8
  settings = settings_lib.from_config(config)
  base = loading.load("tiny-random")
  stages.build_prompts(settings.prompts, tmp_path)
  prompts = json.loads((tmp_path / "prompts.json").read_text())
  build = lambda out: stages.build_samples(settings.sampling, base.tokenizer, base.model,  # noqa: E731
                                           settings.chat_system, prompts, out, None)
  (tmp_path / "whole").mkdir()
  build(tmp_path / "whole")
  # Sampled batch by batch, the stage draws what one call over all prompts draws.
  shared, starts = stages._sampling_plan(settings.sampling, base.tokenizer, prompts)
  one_call = chat_lib.generate_chat(base, [p["text"] for p in prompts], seed=settings.sampling.seed,
                                    system=settings.chat_system, grammar_initial_states=starts,
                                    **shared)
  whole = [json.loads(line) for line in (tmp_path / "whole" / "samples.jsonl").read_text().split("\n")
           if line]
  assert [(r["completion"], r["ended"]) for r in whole] == [(a["text"], a["ended"]) for a in one_call]
  calls = []
  real = chat_lib.generate_chat

  def notice_during_first_batch(*args, **kwargs):
    calls.append(kwargs["sample_id_offset"])
    if len(calls) == 1:
      preemption._notice.set()  # what install()'s SIGTERM handler does
    return real(*args, **kwargs)

  monkeypatch.setattr(chat_lib, "generate_chat", notice_during_first_batch)
  (tmp_path / "stopped").mkdir()
  try:
    with pytest.raises(preemption.Preempted, match="stopped before sampling prompts 8"):
      build(tmp_path / "stopped")
  finally:
    preemption.clear()
  assert calls == [0]
  build(tmp_path / "stopped")
  assert calls == [0, 8, 16]  # batch 0 was not sampled again
  assert ((tmp_path / "stopped" / "samples.jsonl").read_bytes()
          == (tmp_path / "whole" / "samples.jsonl").read_bytes())
  assert not (tmp_path / "stopped" / "sampled_batches").exists()
