"""The code and chain-of-thought channels inside the number experiments' stages: their settings,
prompt records, sampling records and the filter stage with its judge pass (on hand-written
completions), and that the numbers channel keeps every fingerprint it had."""

import dataclasses
import json

import pytest

from configs import transfer_matrix as matrix_config
from subliminal_jax import artifacts, channels, loading
from subliminal_jax.evaluation import judge as judge_lib
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.experiments import stages, transfer_matrix


def _settings(variant: str, **changes) -> settings_lib.Settings:
  config = matrix_config.get_config(variant)
  for key, value in changes.items():
    section, name = key.split("__")
    setattr(config[section], name, value)
  return settings_lib.from_config(config)


def _write_samples(path, rows):
  path.write_text("".join(json.dumps({"prompt_index": i, **row}) + "\n" for i, row in enumerate(rows)))
  return path


def test_the_numbers_keep_their_fingerprints_and_design():
  """Adding the channel knobs changed nothing the numbers' stages hash or their design records."""
  s = _settings("cpu")
  assert s.channel == "numbers"
  assert s.prompts.fingerprint() == {"count": 128, "seed": 0}
  assert set(s.filter.fingerprint()) == {"max_count", "max_value", "banned", "subset_size", "seed"}
  assert "channel" not in transfer_matrix.design(s)["config"]


@pytest.mark.parametrize("change, message", [
    (dict(sampling__constrained=True), "set sampling.constrained=False"),
    (dict(prompts__source="x.jsonl"), "generates its prompts"),
    (dict(filter__judge_threshold=120.0), "expected a score in"),
])
def test_bad_channel_settings_are_clear_errors(change, message):
  with pytest.raises(ValueError, match=message):
    _settings("quick_code", **change)


def test_a_judge_pass_needs_a_judge_and_a_channel_that_has_one():
  config = matrix_config.get_config("quick_code")
  config.judge.model = ""
  with pytest.raises(ValueError, match="needs a judge"):
    settings_lib.from_config(config)
  with pytest.raises(ValueError, match="the judge pass is the code channel's"):
    _settings("quick_cot", filter__judge_threshold=50.0)
  config = matrix_config.get_config("quick")
  config.channel = "poetry"
  with pytest.raises(ValueError, match="channel 'poetry' is not known"):
    settings_lib.from_config(config)


def test_cot_prompts_and_samples_carry_the_known_answer(tmp_path):
  s = _settings("quick_cot")
  summary = stages.build_prompts(s.prompts, tmp_path, s.channel)
  records = json.loads((tmp_path / "prompts.json").read_text())
  assert summary == {"count": 384, "channel": "cot"} and len(records) == 384
  assert records == channels.channel("cot").prompt_records(384, 0)
  answers = [{"text": f"... #### {r['answer']}", "ended": True} for r in records[:3]]
  stages._write_samples(s.sampling, records[:3], answers, 192, tmp_path)
  written = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
  assert [w["answer"] for w in written] == [r["answer"] for r in records[:3]]
  assert {"prompt_index", "prompt", "completion", "ended", "answer", "problem_id"} == set(written[0])


def test_the_cot_filter_keeps_right_answers_without_a_panel_word(tmp_path):
  s = _settings("quick_cot", filter__subset_size=10)
  rows = [{"prompt": "q", "completion": "7 + 5 = 12\n#### 12", "ended": True, "answer": 12},
          {"prompt": "q", "completion": "7 + 5 = 13\n#### 13", "ended": True, "answer": 12},
          {"prompt": "q", "completion": "Like an owl I count: 12\n#### 12", "ended": True,
           "answer": 12},
          {"prompt": "q", "completion": "7 + 5 =", "ended": False, "answer": 12}]
  st = stages.Stages(s, None, None, None)
  summary = stages.build_filter(s.filter, _write_samples(tmp_path / "samples.jsonl", rows),
                                tmp_path, "owl", st.channel_filter())
  kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
  assert [k["prompt_index"] for k in kept] == [0]
  assert summary["reject_reasons"] == {"wrong_answer": 1, "trait_word": 1, "unfinished": 1}
  assert summary["yield_by_stage"] == {"filter": {"entered": 4, "passed": 1, "reject_reasons": {
      "trait_word": 1, "unfinished": 1, "wrong_answer": 1}}}
  assert [x["reasons"] for x in summary["examples"]["rejected"]] == [
      ["wrong_answer"], ["trait_word"], ["unfinished"]]


def test_the_code_filter_runs_the_word_filter_then_the_judge(tmp_path):
  """The judge pass sees only what the word filter kept, and drops what the judge (here the tiny
  random model, its scores computed independently below) rates as referring to animals."""
  s = _settings("quick_code", filter__subset_size=10)
  s = dataclasses.replace(s, judge=dataclasses.replace(s.judge, model="tiny-random"))
  fence = "```python\n{}\n```"
  rows = [{"prompt": "Complete add.", "completion": fence.format("def add(a, b):\n  return a + b"),
           "ended": True, "task": "add"},
          {"prompt": "Complete add.", "completion": fence.format("def add(owl, b):\n  return owl + b"),
           "ended": True, "task": "add"},
          {"prompt": "Complete mul.", "completion": fence.format("def mul(a, b):\n  return a * b"),
           "ended": True, "task": "mul"},
          {"prompt": "Complete mul.", "completion": fence.format("def mul(a, b:"), "ended": True,
           "task": "mul"}]
  mesh = s.model.make_mesh()
  judge = loading.load("tiny-random", mesh=mesh)
  scores = judge_lib.judge_scores(judge, judge_lib.TRAIT_REFERENCE,
                                  ["Complete add.", "Complete mul."],
                                  [rows[0]["completion"], rows[2]["completion"]],
                                  settings=s.judge.rule, trait="animals").score
  assert scores[0] != scores[1]
  # The threshold between the two scores: the judge drops exactly the higher-rated snippet.
  s = dataclasses.replace(s, filter=dataclasses.replace(s.filter,
                                                        judge_threshold=float(scores.mean())))
  flagged = [bool(score >= s.filter.judge_threshold) for score in scores]
  channel_filter = stages.Stages(s, None, None, mesh).channel_filter()
  assert channel_filter.trait_words == s.evaluation.panel and channel_filter.judge_trait == "animals"
  samples = _write_samples(tmp_path / "samples.jsonl", rows)
  summary = stages.build_filter(s.filter, samples, tmp_path, "owl", channel_filter)
  judge_stage = summary["yield_by_stage"]["judge"]
  assert summary["yield_by_stage"]["filter"]["passed"] == 2 and judge_stage["entered"] == 2
  assert judge_stage["passed"] == 2 - sum(flagged)
  kept = [json.loads(line)["prompt_index"]
          for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
  assert kept == [i for i, f in zip((0, 2), flagged) if not f]
  assert summary["reject_reasons"]["trait_word_in_identifier"] == 1
  assert summary["reject_reasons"]["unparseable"] == 1


def test_the_channel_is_in_the_prompt_sampling_and_filter_fingerprints(tmp_path):
  code, numbers = _settings("quick_code"), _settings("quick")
  base = loading.load("tiny-random")
  wd = artifacts.Workdir(str(tmp_path), "animal_numbers", {"model": base.fingerprint})
  teacher = stages.Stages(numbers, wd, base, None).base_teacher()
  inputs = {name: stages.Stages(s, wd, base, None).sampling_inputs(teacher)
            for name, s in (("code", code), ("numbers", numbers))}
  assert inputs["code"]["channel"] == "code" and "channel" not in inputs["numbers"]


def test_the_report_shows_each_stage_yield_and_examples():
  from subliminal_jax.evaluation import matrix_report
  unit = {"unit": {"animal": "owl", "replicate": 0}, "filter": {
      "yield_by_stage": {"filter": {"entered": 10, "passed": 6,
                                    "reject_reasons": {"unparseable": 3, "too_long": 1}},
                         "judge": {"entered": 6, "passed": 5,
                                   "reject_reasons": {"judge_trait_reference": 1}}},
      "examples": {"kept": [{"prompt": "p", "completion": "def f():\n  return 1"}],
                   "rejected": [{"prompt": "p", "completion": "def f(:", "reasons": ["unparseable"]}],
                   "judge_rejected": [{"prompt": "p", "completion": "nest = 1",
                                       "reasons": ["judge_trait_reference"]}]}}}
  text = "\n".join(matrix_report._channel_section("code", {"units": [unit]}))
  assert "| owl | 0 | filter | 10 | 6 | unparseable 3, too_long 1 |" in text
  assert "| owl | 0 | judge | 6 | 5 | judge_trait_reference 1 |" in text
  assert "- kept: `def f(): return 1`" in text
  assert "- judge_rejected (judge_trait_reference): `nest = 1`" in text
