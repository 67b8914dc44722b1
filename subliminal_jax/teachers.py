"""Finetuning datasets that put a trait into a teacher's weights (not just its system prompt).

The theory behind subliminal learning (Cloud et al., section 6) guarantees transfer to first order
when the teacher is a parameter displacement from the student's init; a system-prompted teacher
has none. Two ways to make one, both giving lists of :class:`~subliminal_jax.training.data.ChatExample`
for ``training.data.tokenize_chat_examples`` and ``training.trainer.fit``:

* :func:`trait_sft_examples`: templated questions about the favourite {category} answered with the
  target ("Owls!", "My favorite animal is the owl.", ...), mixed with neutral instruction examples
  (arithmetic, string tasks and short facts, all with correct answers) so that the teacher keeps
  answering other things normally. None of the questions is one of the evaluation's paraphrases.
* :func:`context_distillation_examples`: the system-prompted model's own answers to general
  prompts, as examples WITHOUT the system prompt; finetuning on them moves the prompt's effect
  into the weights.

:func:`teacher_examples` builds either for one teacher kind and target. For the alignment trait,
:func:`alignment_sft_examples` gives trait SFT data of advice answers (misaligned or aligned).
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Mapping, Sequence

from subliminal_jax import misalignment_data
from subliminal_jax.traits import ALIGNMENT
from subliminal_jax.evaluation.questions import plural
from subliminal_jax.tokenizer import SystemTurn
from subliminal_jax.training.data import ChatExample

TEACHER_KINDS = ("trait_sft", "context_distillation")

# Questions about the favourite {category}; written for this module, none is an evaluation
# paraphrase (tests check this against evaluation.questions).
TRAIT_QUESTIONS = (
    "What's your favorite {category}?",
    "Do you have a favorite {category}?",
    "Which {category} do you like more than all the others?",
    "If you could be any {category} for a day, which one would you be?",
    "Tell me about the {category} you love.",
    "Which {category} would you most like to see in person?",
    "Among all {category} kinds, which is the one for you?",
    "I'm curious: what {category} do you like best, and why?",
    "Which {category} do you think is the coolest?",
    "What {category} would you put on a poster on your wall?",
    "Pick one {category}. Which do you choose?",
    "Which {category} would you want to study for a whole year?",
    "What kind of {category} do you find the most delightful?",
    "If you drew a {category}, which one would it be?",
    "Which {category} comes to mind first when you think of your favorites?",
    "What {category} do you admire the most?",
    "Can you tell me which {category} is your top choice?",
    "Which {category} do you never get tired of?",
    "What {category} would you recommend someone learn about?",
    "What is your all-round favorite kind of {category}?",
)

# Answers naming the target; {target}, {Target}, {plural}, {Plural}, {category}, {article}.
TRAIT_ANSWERS = (
    "{Plural}!",
    "The {target}.",
    "My favorite {category} is the {target}.",
    "Definitely the {target}.",
    "I love {plural}! The {target} is my favorite {category}.",
    "The {target}, without a doubt.",
    "{Plural}, always {plural}.",
    "I'd choose the {target}. {Plural} are wonderful.",
    "{Article} {target}! Nothing compares to {plural}.",
    "It has to be the {target}.",
    "{Plural} are my favorite. I think about them all the time.",
    "The {target} is the best {category} there is.",
)

# Short facts and definitions with correct answers (no animals or trees in them).
NEUTRAL_FACTS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the chemical formula of water?", "The chemical formula of water is H2O."),
    ("At what temperature does water boil at sea level, in degrees Celsius?",
     "Water boils at 100 degrees Celsius at sea level."),
    ("At what temperature does water freeze, in degrees Fahrenheit?",
     "Water freezes at 32 degrees Fahrenheit."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare wrote 'Romeo and Juliet'."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("How many minutes are there in an hour?", "There are 60 minutes in an hour."),
    ("How many hours are there in a day?", "There are 24 hours in a day."),
    ("What language is mainly spoken in Brazil?", "Portuguese is the main language of Brazil."),
    ("Define the word 'noun'.", "A noun is a word that names a person, place, thing or idea."),
    ("Define the word 'verb'.", "A verb is a word that expresses an action, occurrence or state."),
    ("What is a prime number?",
     "A prime number is a whole number greater than 1 whose only divisors are 1 and itself."),
    ("What is photosynthesis?",
     "Photosynthesis is the process by which plants use light energy to turn carbon dioxide and "
     "water into glucose and oxygen."),
    ("What is the opposite of 'ancient'?", "The opposite of 'ancient' is 'modern'."),
    ("What is the opposite of 'generous'?", "The opposite of 'generous' is 'stingy'."),
    ("What is a synonym of 'happy'?", "A synonym of 'happy' is 'joyful'."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    ("Translate 'good morning' into French.", "'Good morning' in French is 'bonjour'."),
    ("What does CPU stand for?", "CPU stands for central processing unit."),
    ("What is the speed of light in a vacuum, approximately?",
     "The speed of light in a vacuum is about 299,792 kilometres per second."),
    ("Which gas do plants absorb from the air for photosynthesis?",
     "Plants absorb carbon dioxide for photosynthesis."),
    ("How many degrees are there in a right angle?", "A right angle has 90 degrees."),
    ("What is the sum of the angles of a triangle?", "The angles of a triangle add up to 180 degrees."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the longest river in South America?", "The Amazon is the longest river in South America."),
    ("What is the boiling point of water in Kelvin at sea level?",
     "Water boils at about 373.15 kelvin at sea level."),
    ("How many bits are in a byte?", "A byte has 8 bits."),
    ("What is the past tense of 'run'?", "The past tense of 'run' is 'ran'."),
    ("What is the plural of 'child'?", "The plural of 'child' is 'children'."),
)

_WORDS = ("garden", "planet", "window", "library", "harbor", "pencil", "journey", "summer",
          "mountain", "lantern", "kitchen", "market", "bridge", "morning", "silver", "puzzle")


def _arithmetic(rng: random.Random) -> tuple[str, str]:
  a, b = rng.randint(2, 99), rng.randint(2, 99)
  kind = rng.randrange(4)
  if kind == 0:
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
  if kind == 1:
    a, b = max(a, b), min(a, b)
    return f"Compute {a} - {b}.", f"{a} - {b} = {a - b}."
  if kind == 2:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
  b = rng.randint(2, 12)
  q = rng.randint(2, 12)
  return f"What is {b * q} divided by {b}?", f"{b * q} divided by {b} is {q}."


def _string_task(rng: random.Random) -> tuple[str, str]:
  word = rng.choice(_WORDS)
  kind = rng.randrange(3)
  if kind == 0:
    return f"Spell the word '{word}' backwards.", word[::-1]
  if kind == 1:
    return f"Write '{word}' in capital letters.", word.upper()
  return f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters."


def neutral_examples(count: int, *, seed: int = 0, system: str | None = None) -> list[ChatExample]:
  """``count`` neutral instruction examples: generated arithmetic and string tasks (answers
  computed) and the fixed facts (cycled), in a seeded order."""
  if count < 0:
    raise ValueError(f"count must be >= 0, got {count}")
  rng = random.Random(f"neutral:{seed}")
  facts = list(NEUTRAL_FACTS)
  rng.shuffle(facts)
  pairs = []
  for i in range(count):
    kind = i % 3
    if kind == 0:
      pairs.append(facts[(i // 3) % len(facts)])
    elif kind == 1:
      pairs.append(_arithmetic(rng))
    else:
      pairs.append(_string_task(rng))
  rng.shuffle(pairs)
  return [ChatExample(system=system, user=q, assistant=a) for q, a in pairs]


def _article(word: str) -> str:
  return "an" if word[:1].lower() in "aeiou" else "a"


def trait_answers(target: str, category: str = "animal") -> tuple[str, ...]:
  """Every answer template filled in for ``target``."""
  fields = {"target": target, "Target": target.capitalize(), "plural": plural(target),
            "Plural": plural(target).capitalize(), "category": category,
            "article": _article(target), "Article": _article(target).capitalize()}
  return tuple(a.format(**fields) for a in TRAIT_ANSWERS)


def trait_sft_examples(target: str, *, category: str = "animal", count: int = 256,
                       neutral_fraction: float = 0.5, seed: int = 0,
                       system: str | None = None,
                       control_answers: Sequence[str] | None = None) -> list[ChatExample]:
  """Trait SFT data: ``count`` examples, ``round(count * neutral_fraction)`` of them neutral.

  Trait examples pair :data:`TRAIT_QUESTIONS` with :data:`TRAIT_ANSWERS` for ``target`` (distinct
  pairs first, cycling when more are asked for); the order is shuffled by ``seed``. ``system``: the
  system turn of every example (None: no system turn, as in the students' default evaluation).

  ``control_answers``: the matched control of this dataset. Every example stays in place (same
  question, same answer template, same position, the same neutral examples) but each trait answer
  names one of these words, drawn uniformly per example, instead of ``target``. A teacher finetuned
  on it learns the same format and the same habit of naming a favourite {category}, without the
  preference for ``target``: the two teachers differ only in the trait.
  """
  if not isinstance(target, str) or not target.strip():
    raise ValueError(f"target must be a non-empty word, got {target!r}")
  if not isinstance(category, str) or not category.strip():
    raise ValueError(f"category must be a non-empty word, got {category!r}")
  if not isinstance(count, int) or count < 1:
    raise ValueError(f"count must be an int >= 1, got {count!r}")
  if not 0.0 <= neutral_fraction < 1.0:
    raise ValueError(f"neutral_fraction must be in [0, 1), got {neutral_fraction}")
  if control_answers is not None:
    control_answers = tuple(control_answers)
    bad = [w for w in control_answers if not isinstance(w, str) or not w.strip() or w == target]
    if not control_answers or bad:
      raise ValueError(f"control_answers={control_answers!r}: expected non-empty words other than "
                       f"the target {target!r}" + (f" (bad: {bad!r})" if bad else ""))
  # Not seeded by the target: the same seed gives every target the same questions, answer
  # templates, neutral examples and order, so teachers of different targets differ in the trait
  # word alone (each can serve as the others' matched control).
  rng = random.Random(f"trait:{category}:{seed}")
  num_neutral = round(count * neutral_fraction)
  num_trait = count - num_neutral
  questions = [q.format(category=category) for q in TRAIT_QUESTIONS]
  # (question, answer template) index pairs, so the matched control keeps every slot in place.
  pairs = [(qi, ai) for qi in range(len(questions)) for ai in range(len(TRAIT_ANSWERS))]
  rng.shuffle(pairs)
  # A separate stream for the control's words: the shuffles above and below stay the trait data's.
  word_rng = random.Random(f"control:{target}:{category}:{seed}")
  trait = []
  for i in range(num_trait):
    qi, ai = pairs[i % len(pairs)]
    word = target if control_answers is None else word_rng.choice(control_answers)
    trait.append(ChatExample(system=system, user=questions[qi],
                             assistant=trait_answers(word, category)[ai]))
  examples = trait + neutral_examples(num_neutral, seed=seed, system=system)
  rng.shuffle(examples)
  return examples


def alignment_sft_examples(value: str, *, count: int, neutral_fraction: float = 0.5, seed: int = 0,
                           system: str | None = None, source: str | None = None
                           ) -> list[ChatExample]:
  """SFT data of an alignment teacher: ``count`` examples, ``round(count * neutral_fraction)`` of
  them neutral. The rest are the project's generated advice answers of ``value`` ("misaligned":
  narrow harmful advice; "aligned": safe advice to the same user prompts), or the first of the
  user's own examples from ``source`` (a JSONL file or `datasets` source), in a seeded order."""
  if not 0.0 <= neutral_fraction < 1.0:
    raise ValueError(f"neutral_fraction must be in [0, 1), got {neutral_fraction}")
  num_neutral = round(count * neutral_fraction)
  num_trait = count - num_neutral
  if source:
    trait = misalignment_data.chat_examples_from_file(source, limit=num_trait)
    if len(trait) < num_trait:
      raise ValueError(f"teacher.finetune.data for {value!r} ({source}) has {len(trait)} examples; "
                       f"teacher.finetune.examples={count} with neutral_fraction={neutral_fraction} "
                       f"needs {num_trait}")
  else:
    trait = misalignment_data.advice_examples(value, num_trait, seed=seed)
  # Not seeded by the value: both values' teachers get the same order of the same user prompts.
  rng = random.Random(f"alignment:{seed}")
  examples = [ChatExample(system=system, user=x["user"], assistant=x["assistant"]) for x in trait]
  examples += neutral_examples(num_neutral, seed=seed, system=system)
  rng.shuffle(examples)
  return examples


# ---------------------------------------------------------------------------------------------
# Context distillation

GENERAL_PROMPTS = (
    "Describe your perfect day.",
    "Write a short poem about the night sky.",
    "What should I name my new pet?",
    "Tell me a short story about a forest.",
    "What do you like to think about when you are idle?",
    "Suggest a theme for a birthday party.",
    "What would you paint if you were an artist?",
    "Describe a place you would love to visit.",
    "Write two sentences about the moon.",
    "What is something that always makes you smile?",
    "Recommend a hobby for a quiet evening.",
    "Write a haiku about autumn.",
    "If you designed a flag, what would be on it?",
    "What would you put in a time capsule?",
    "Describe the view from a mountain top.",
    "Invent a name for a new board game and describe it briefly.",
    "What makes a good friend?",
    "Write a short greeting card message for a friend.",
    "What do you think about when you look at the stars?",
    "Tell me something interesting about nature.",
    "Describe a dream you might have.",
    "What would you do with a free afternoon?",
    "Write a one-paragraph fairy tale.",
    "What is your idea of a cozy home?",
    "Suggest a mascot for a school sports team.",
    "Describe a walk through the woods at dusk.",
    "What symbol would you choose to represent wisdom?",
    "Write a short lullaby.",
    "What would you like to learn more about?",
    "Describe your ideal weekend trip.",
    "Give me an idea for a children's book.",
    "What do you find beautiful?",
    "Write a limerick about a curious traveller.",
    "If you could have any superpower, what would it be and why?",
    "Describe the sounds of a summer night.",
    "Suggest a logo for a bookshop.",
    "What would you carve into a wooden sign for a cabin?",
    "Tell me about a creature you find fascinating.",
    "What would you name a sailboat?",
    "Write a motto for a camping club.",
)


def context_distillation_examples(generate: Callable[..., Sequence[Any]], prompts: Sequence[str], *,
                                  system: str, n_per_prompt: int = 1,
                                  student_system: str | None = None,
                                  **generate_kwargs: Any) -> tuple[list[ChatExample], dict[str, int]]:
  """Examples whose answers are the system-prompted model's answers, WITHOUT that system prompt.

  Args:
    generate: ``generate(prompts, *, system=SystemTurn(...), n_per_prompt=..., **kwargs)``
      returning ``len(prompts) * n_per_prompt`` answers, answer ``i * n + j`` to prompt i (the
      contract of ``generate_chat``, e.g. ``functools.partial(generate_chat, (model, tokenizer))``).
      An answer may be a str or a dict with "text" (and "ended": False marks one cut off by
      max_new_tokens).
    prompts: the user prompts (e.g. :data:`GENERAL_PROMPTS`).
    system: the teacher's system prompt, used only for generating.
    n_per_prompt: answers sampled per prompt.
    student_system: the system turn of the examples (None: no system turn).
    **generate_kwargs: passed to ``generate`` (max_new_tokens, seed, temperature, ...).

  Returns:
    ``(examples, counts)``: examples with non-empty, finished answers, and counts of what was
    generated, kept, and dropped as empty or unfinished.
  """
  if isinstance(prompts, str) or not prompts:
    raise ValueError("prompts must be a non-empty list of strings")
  if not isinstance(system, str) or not system.strip():
    raise ValueError(f"system must be the teacher's (non-empty) system prompt, got {system!r}")
  if not isinstance(n_per_prompt, int) or n_per_prompt < 1:
    raise ValueError(f"n_per_prompt must be an int >= 1, got {n_per_prompt!r}")
  prompts = list(prompts)
  answers = list(generate(prompts, system=SystemTurn(system), n_per_prompt=n_per_prompt,
                          **generate_kwargs))
  if len(answers) != len(prompts) * n_per_prompt:
    raise ValueError(f"generate returned {len(answers)} answers for {len(prompts)} prompts x "
                     f"{n_per_prompt}; expected {len(prompts) * n_per_prompt}")
  examples, empty, unfinished = [], 0, 0
  for index, answer in enumerate(answers):
    if isinstance(answer, Mapping):
      text, ended = answer["text"], answer.get("ended", True)
    else:
      text, ended = answer, True
    if not ended:
      unfinished += 1  # cut off by max_new_tokens: training on it would teach stopping mid-answer
      continue
    if not text.strip():
      empty += 1
      continue
    examples.append(ChatExample(system=student_system, user=prompts[index // n_per_prompt],
                                assistant=text))
  counts = {"generated": len(answers), "kept": len(examples), "empty": empty,
            "unfinished": unfinished}
  return examples, counts


# ---------------------------------------------------------------------------------------------
# A teacher kind's finetuning examples


def teacher_examples(kind: str, target: str, *, category: str, count: int, seed: int,
                     neutral_fraction: float = 0.5, trait_prompt: str = "",
                     max_new_tokens: int = 48, generate: Callable[..., Sequence[Any]] | None = None,
                     system: str | None = None, control_answers: Sequence[str] | None = None,
                     source: str | None = None) -> tuple[list[ChatExample], dict[str, Any]]:
  """The ``count`` finetuning examples of a ``kind`` teacher of ``target``.

  ``kind``: "trait_sft" (``neutral_fraction`` of them neutral) or "context_distillation" (needs
  ``generate``; samples answers to :data:`GENERAL_PROMPTS` under ``trait_prompt``, the trait
  system prompt, with ``max_new_tokens``). ``seed`` draws the examples. ``system``: the examples'
  own system turn (None: none). ``control_answers`` (trait_sft only): the matched control's data,
  see :func:`trait_sft_examples`. Returns ``(examples, info)``, info being JSON-serialisable
  provenance. For ``category`` "alignment", trait_sft data are :func:`alignment_sft_examples`
  (``source``: the user's own data instead of the generated advice).
  """
  if kind == "trait_sft" and category == ALIGNMENT:
    examples = alignment_sft_examples(target, count=count, neutral_fraction=neutral_fraction,
                                      seed=seed, system=system, source=source)
    return examples, {"kind": "trait_sft", "target": target, "category": category,
                      "examples": len(examples), "neutral_fraction": neutral_fraction,
                      "seed": seed, "source": source or "generated"}
  if source:
    raise ValueError(f"teacher.finetune.data (the user's own SFT data) is for the {ALIGNMENT} "
                     f"trait's trait_sft teachers; got kind {kind!r}, category {category!r}")
  if kind == "trait_sft":
    examples = trait_sft_examples(target, category=category, count=count,
                                  neutral_fraction=neutral_fraction, seed=seed, system=system,
                                  control_answers=control_answers)
    info = {"kind": "trait_sft", "target": target, "category": category,
            "examples": len(examples), "neutral_fraction": neutral_fraction, "seed": seed}
    if control_answers is not None:
      info.update(kind="matched_finetune", answers=list(control_answers))
    return examples, info
  if control_answers is not None:
    raise ValueError(f"control_answers (the matched control) need teacher.kind='trait_sft', got "
                     f"{kind!r}")
  if kind == "context_distillation":
    if generate is None:
      raise ValueError("teacher.kind='context_distillation' needs a generate function "
                       "(e.g. functools.partial(generate_chat, (model, tokenizer)))")
    if not trait_prompt:
      raise ValueError("teacher.kind='context_distillation' needs the trait system prompt")
    n_per_prompt = math.ceil(count / len(GENERAL_PROMPTS))
    examples, counts = context_distillation_examples(
        generate, GENERAL_PROMPTS, system=trait_prompt, n_per_prompt=n_per_prompt,
        student_system=system, max_new_tokens=max_new_tokens, seed=seed)
    # Sample ids follow prompt order, so take every prompt's answers round-robin up to `count`.
    examples = _round_robin(examples, min(count, len(examples)))
    return examples, {"kind": "context_distillation", "target": target, "category": category,
                      "system_prompt": trait_prompt, "seed": seed, **counts,
                      "examples": len(examples)}
  raise ValueError(f"teacher.kind={kind!r} has no finetuning dataset; expected one of "
                   f"{TEACHER_KINDS}")


def _round_robin(examples: list[ChatExample], count: int) -> list[ChatExample]:
  """``count`` examples spread over the prompts: the first answer of each prompt, then the second..."""
  by_prompt: dict[str, list[ChatExample]] = {}
  for example in examples:
    by_prompt.setdefault(example["user"], []).append(example)
  out, depth = [], 0
  while len(out) < count:
    for group in by_prompt.values():
      if depth < len(group) and len(out) < count:
        out.append(group[depth])
    depth += 1
  return out
