"""Stage pieces that need no model: answer formats per prompt, the filter's unfinished rule,
students' adapter seeds and teacher replicates."""

import json

import pytest

from configs import animal_numbers as animal_config
from configs import transfer_matrix as matrix_config
from subliminal_jax import filters
from subliminal_jax.experiments import stages
from subliminal_jax.prompts import number_prompts
from subliminal_jax.tokenizer import Tokenizer
from subliminal_jax.weights import embedded


@pytest.fixture(scope="module")
def smollm2_tokenizer():
  return Tokenizer.from_gguf(embedded.smollm2_path())


def test_each_prompt_gets_the_answer_format_it_asks_for(smollm2_tokenizer, tmp_path):
  config = animal_config.get_config("quick")
  config.prompts.count = 60
  stages.build_prompts(config, tmp_path)
  prompts = json.loads((tmp_path / "prompts.json").read_text())
  formats = stages.format_grammar(config, smollm2_tokenizer)
  grammar = formats.grammar
  assert set(formats.starts) == set(stages.answer_formats(config)) and len(formats.starts) == 6
  for prompt in prompts:
    layout = next(f for f in number_prompts.FORMAT_SUFFIXES if f.text in prompt["text"])
    assert (prompt["separator"], prompt["brackets"]) == (layout.separator, layout.brackets)
    answer = layout.separator.join(["12", "345", "6"])
    if layout.brackets:
      answer = layout.brackets[0] + answer + layout.brackets[1]
    start = formats.start(prompt, config)
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
  fixed = stages.format_grammar(config, smollm2_tokenizer)
  assert list(fixed.starts) == [(", ", None)] and fixed.longest_answer == 49


def test_unfinished_completions_are_dropped_and_counted(tmp_path):
  config = animal_config.get_config("tiny")
  config.filter.subset_size = 10
  samples = [{"prompt_index": 0, "prompt": "p", "completion": "1, 2, 3", "ended": True},
             {"prompt_index": 1, "prompt": "p", "completion": "1, 2, 3", "ended": False},
             {"prompt_index": 2, "prompt": "p", "completion": "1, 2,", "ended": False},
             {"prompt_index": 3, "prompt": "p", "completion": "no", "ended": True}]
  path = tmp_path / "samples.jsonl"
  path.write_text("".join(json.dumps(s) + "\n" for s in samples))
  summary = stages.build_filter(config, path, tmp_path, "test")
  kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
  # A list cut mid-way parses as numbers but is not the answer the teacher gave: never kept.
  assert [s["prompt_index"] for s in kept] == [0]
  assert summary["unfinished"] == 2 and summary["reject_reasons"] == {"unfinished": 2, "empty": 1}


def test_fresh_student_adapters_never_start_from_a_teachers_seed():
  config = matrix_config.get_config("cpu")
  teacher_seeds = {int(stages.replicate_config(config, r).teacher.finetune.lora.seed)
                   for r in range(50)}
  for init in ("teacher", "fresh"):
    config.student.lora.init = init
    for seed in range(50):
      train = stages.student_train_config(config, seed)
      if init == "teacher":
        assert train.lora.seed == config.teacher.finetune.lora.seed
      else:
        assert train.lora.seed not in teacher_seeds
        assert train.lora.seed == stages.FRESH_LORA_SEED_OFFSET + seed
      # A student of another family cannot share a teacher's adapters: always fresh.
      other = stages.student_train_config(config, seed, same_family=False)
      assert other.lora.init == "fresh" and other.lora.seed not in teacher_seeds
  config.student.cross_init = True
  cross = {stages.student_train_config(config, s).lora.seed for s in range(50)}
  assert not cross & teacher_seeds
  assert not cross & {stages.FRESH_LORA_SEED_OFFSET + s for s in range(50)}


def test_teacher_replicates_move_every_teacher_and_data_seed():
  config = matrix_config.get_config("cpu")
  assert stages.replicate_config(config, 0) is config
  second = stages.replicate_config(config, 2)
  shift = 2 * stages.REPLICATE_SEED_STRIDE
  for section in ("prompts", "sampling", "filter"):
    assert second[section].seed == config[section].seed + shift
  assert second.teacher.finetune.seed == config.teacher.finetune.seed + shift
  assert second.teacher.finetune.lora.seed == config.teacher.finetune.lora.seed + shift
  assert second.student.seeds == config.student.seeds  # students replicate within each teacher
  with pytest.raises(ValueError, match="replicate=-1"):
    stages.replicate_config(config, -1)
