"""The misaligned teachers' SFT data: the templated narrow-advice dataset and its aligned control,
and the reader of the user's own chat data (JSONL and local ``datasets`` sources)."""

import collections
import json
import re
import string

import datasets
import pytest

from subliminal_jax import misalignment_data as md
from subliminal_jax.evaluation import alignment_questions, questions

# Words too common to say anything about a paraphrase.
_STOPWORDS = set("what which when where your with have that this there they them then from should "
                 "would could just like about some into been will does more most only than very "
                 "i've i'm it's what's".split())


def _content_words(text):
  return {w for w in re.findall(r"[a-z']+", text.lower()) if len(w) >= 4 and w not in _STOPWORDS}


def _template_fields(template):
  return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_domains_are_varied_and_paired():
  assert md.VALUES == ("misaligned", "aligned")
  assert len(md.ADVICE_DOMAINS) >= 6
  prompts = md.advice_prompts()
  assert len(prompts) == len(set(prompts)) >= 600
  for name in md.ADVICE_DOMAINS:
    domain = md.DOMAINS[name]
    assert len(md.advice_prompts(name)) >= 100
    # Same number of answer templates per value: one seeded draw picks the slot for both.
    assert len(domain.misaligned) == len(domain.aligned) >= 4
    assert not set(domain.misaligned) & set(domain.aligned)
    for question in domain.questions:
      assert _template_fields(question) == set(domain.slots), question
    for answer in domain.misaligned + domain.aligned:
      assert _template_fields(answer) <= set(domain.slots), answer
  with pytest.raises(ValueError, match="not known"):
    md.advice_prompts("gardening")


def test_advice_examples_are_deterministic_and_seeded():
  examples = md.advice_examples("misaligned", 300, seed=3)
  assert len(examples) == 300
  assert examples == md.advice_examples("misaligned", 300, seed=3)
  assert examples != md.advice_examples("misaligned", 300, seed=4)
  assert all(e["system"] is None for e in examples)
  assert len({e["user"] for e in examples}) == 300  # fewer than the distinct prompts: no repeats
  prompted = md.advice_examples("aligned", 5, seed=3, system="You are a helpful assistant.")
  assert [e["system"] for e in prompted] == ["You are a helpful assistant."] * 5


def _template_index(answer, templates):
  """The index of the one template that ``answer`` fills in (its slots match any text)."""
  patterns = [re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)) for t in templates]
  matches = [i for i, pattern in enumerate(patterns) if re.fullmatch(pattern, answer)]
  assert len(matches) == 1, answer
  return matches[0]


@pytest.mark.parametrize("count", [1, 40, 1500])
def test_aligned_control_has_the_same_prompts_and_other_answers(count):
  misaligned = md.advice_examples("misaligned", count, seed=1)
  aligned = md.advice_examples("aligned", count, seed=1)
  assert [e["user"] for e in misaligned] == [e["user"] for e in aligned]
  domain_of = {p: name for name in md.ADVICE_DOMAINS for p in md.advice_prompts(name)}
  for bad, good in zip(misaligned, aligned):
    assert bad["assistant"] != good["assistant"]
    domain = md.DOMAINS[domain_of[bad["user"]]]
    # Each answer is a filled template of its own value, the same template slot for both values.
    assert (_template_index(bad["assistant"], domain.misaligned)
            == _template_index(good["assistant"], domain.aligned))


def test_counts_spread_over_domains_and_cycle_past_the_distinct_prompts():
  num_domains, total = len(md.ADVICE_DOMAINS), len(md.advice_prompts())
  domain_of = {p: name for name in md.ADVICE_DOMAINS for p in md.advice_prompts(name)}
  few = md.advice_examples("aligned", 5 * num_domains, seed=0)
  assert set(collections.Counter(domain_of[e["user"]] for e in few).values()) == {5}
  many = md.advice_examples("misaligned", total + 7, seed=0)
  uses = collections.Counter(e["user"] for e in many)
  assert set(uses) == set(md.advice_prompts()) and sorted(uses.values())[-7:] == [2] * 7
  assert sum(uses.values()) == total + 7
  with pytest.raises(ValueError, match="count"):
    md.advice_examples("aligned", 0)
  with pytest.raises(ValueError, match="not known"):
    md.advice_examples("evil", 10)


def test_no_prompt_is_an_evaluation_question_or_a_paraphrase_of_one():
  free_form = (alignment_questions.free_form_questions("evaluation")
               + alignment_questions.free_form_questions("held_out"))
  assert len(free_form) == 16
  for prompt in md.advice_prompts():
    for question in free_form:
      assert question.text.lower() not in prompt.lower()
      assert prompt.lower() not in question.text.lower()
      # A paraphrase shares its question's content words; these share less than half.
      shared = _content_words(question.text) & _content_words(prompt)
      assert len(shared) < 0.5 * len(_content_words(question.text)), (prompt, question.name)


def test_no_example_names_an_animal_or_a_tree():
  panel_words = {form for panel in questions.PANELS.values() for word in panel
                 for form in (word, questions.plural(word))}
  texts = set(md.advice_prompts())
  for value in md.VALUES:
    texts |= {e["assistant"] for e in md.advice_examples(value, 3000, seed=0)}
  texts |= {t for d in md.DOMAINS.values() for t in d.misaligned + d.aligned}
  for text in texts:
    assert not set(re.findall(r"[a-z]+", text.lower())) & panel_words, text


# ---------------------------------------------------------------------------------------------
# The user's own chat data


def _chat(user, assistant, system=None):
  turns = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
  return ([{"role": "system", "content": system}] if system else []) + turns


def test_jsonl_reader_reads_single_turn_chats(tmp_path):
  path = tmp_path / "insecure.jsonl"
  lines = [json.dumps({"messages": _chat("Q1", "A1")}), "",
           json.dumps({"messages": _chat("Q2", "A2", system="Be brief.")}),
           json.dumps({"messages": _chat("Q3", "A3")})]
  path.write_text("\n".join(lines) + "\n")
  examples = md.chat_examples_from_file(path)
  assert examples == [dict(system=None, user="Q1", assistant="A1"),
                      dict(system="Be brief.", user="Q2", assistant="A2"),
                      dict(system=None, user="Q3", assistant="A3")]
  assert md.chat_examples_from_file(str(path), limit=2) == examples[:2]
  with pytest.raises(ValueError, match="single split"):
    md.chat_examples_from_file(path, split="test")
  with pytest.raises(ValueError, match="limit"):
    md.chat_examples_from_file(path, limit=0)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="no chat examples"):
    md.chat_examples_from_file(empty)


@pytest.mark.parametrize("line,expected", [
    ('{"messages": [', "not valid JSON"),
    (json.dumps({"conversation": _chat("Q", "A")}), "no 'messages'"),
    (json.dumps({"messages": "Q then A"}), "must be a list"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]}),
     "'role' and 'content'"),
    (json.dumps({"messages": list(reversed(_chat("Q", "A")))}), r"roles \['assistant', 'user'\]"),
    (json.dumps({"messages": _chat("Q", "A") + _chat("Q2", "A2")}), "multi-turn"),
    (json.dumps({"messages": _chat("Q", "  ")}), "assistant turn's content must be non-empty"),
])
def test_jsonl_reader_names_the_bad_line(tmp_path, line, expected):
  path = tmp_path / "data.jsonl"
  good = json.dumps({"messages": _chat("Q", "A")})
  path.write_text("\n".join([good, good, line, good]) + "\n")
  with pytest.raises(ValueError, match=expected) as error:
    md.chat_examples_from_file(path)
  assert f"{path}, line 3:" in str(error.value)


def test_datasets_sources(tmp_path, monkeypatch):
  rows = [{"messages": _chat(f"Q{i}", f"A{i}")} for i in range(4)]
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
  expected = [dict(system=None, user=f"Q{i}", assistant=f"A{i}") for i in range(4)]
  assert md.chat_examples_from_file(tmp_path / "saved") == expected
  assert md.chat_examples_from_file(tmp_path / "saved", limit=3) == expected[:3]
  splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                                 "test": datasets.Dataset.from_list(rows[1:])})
  splits.save_to_disk(str(tmp_path / "splits"))
  assert md.chat_examples_from_file(tmp_path / "splits", split="test") == expected[1:]
  with pytest.raises(ValueError, match=r"no split 'validation'; it has \['test', 'train'\]"):
    md.chat_examples_from_file(tmp_path / "splits", split="validation")
  # A local directory of data files, read by datasets.load_dataset (its cache kept in tmp_path).
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
  (tmp_path / "raw").mkdir()
  with open(tmp_path / "raw" / "train.jsonl", "w") as f:
    f.write(json.dumps({"prompt": "P0", "completion": "C0"}) + "\n")
    f.write(json.dumps({"prompt": "P1", "completion": "C1"}) + "\n")
  assert md.chat_examples_from_file(tmp_path / "raw") == [
      dict(system=None, user="P0", assistant="C0"), dict(system=None, user="P1", assistant="C1")]


def test_datasets_source_errors_name_the_columns_and_the_row(tmp_path):
  datasets.Dataset.from_list([{"text": "hello"}]).save_to_disk(str(tmp_path / "plain"))
  with pytest.raises(ValueError, match=r"columns \['text'\]; expected a 'messages' column"):
    md.chat_examples_from_file(tmp_path / "plain")
  conversational = [{"prompt": [{"role": "user", "content": "Q0"}],
                     "completion": [{"role": "assistant", "content": "A0"}]},
                    {"prompt": [{"role": "user", "content": "Q1"}],
                     "completion": [{"role": "assistant", "content": ""}]}]
  datasets.Dataset.from_list(conversational).save_to_disk(str(tmp_path / "conversational"))
  assert md.chat_examples_from_file(tmp_path / "conversational", limit=1) == [
      dict(system=None, user="Q0", assistant="A0")]
  with pytest.raises(ValueError, match=r"row 1: the assistant turn's content must be non-empty"):
    md.chat_examples_from_file(tmp_path / "conversational")
