"""Grade-school arithmetic word problems with known integer answers, for the chain-of-thought
channel (a stand-in for GSM8K, which cannot be fetched offline), and a reader for a local
GSM8K-format file.

Problems come from 12 templates written for this project, in four kinds: shopping, sharing, rates
and multi-step (2 to 4 operations). Each template draws its numbers so that every division is
exact and every answer is a positive integer, then writes the question, its answer (computed in
Python) and the arithmetic as an expression string over the drawn numbers (written separately,
so a test can evaluate it independently of the answer).

  >>> word_problems(1, seed=0)[0].question   # doctest: +SKIP
  'Maya buys 7 notebooks at 4 dollars each and pays with a 50-dollar bill. ...'

The texts name people, school and shop things only: no animal, tree or other panel word, so the
trait cannot leak through the prompts. Everything is a deterministic function of ``seed``
(numpy's PCG64 ``default_rng``), and problem i of a run does not depend on how many follow it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable

import numpy as np

__all__ = [
    "WordProblem",
    "ProblemTemplate",
    "TEMPLATES",
    "NAMES",
    "word_problems",
    "read_gsm8k_jsonl",
]


@dataclasses.dataclass(frozen=True)
class WordProblem:
  """One question and its integer answer.

  template: the template's name, or "gsm8k" for a problem read from a file. expression: the
  arithmetic over the question's numbers ("/" is exact division), None for a file's problem.
  """

  question: str
  answer: int
  template: str
  expression: str | None = None


@dataclasses.dataclass(frozen=True)
class ProblemTemplate:
  """A question with {slots}, how to draw its values, its answer, and the same arithmetic written
  as an expression over the slots."""

  name: str
  kind: str  # "shopping", "sharing", "rates" or "multi_step"
  text: str
  expression: str
  draw: Callable[[np.random.Generator], dict[str, int]]
  answer: Callable[[dict[str, int]], int]


# Written for this project: people's names and things only. None contains a panel word, even as a
# substring ("Catherine", "million", "pineapple" and "bowl" are left out on purpose).
NAMES = ("Maya", "Omar", "Lucia", "Ben", "Priya", "Jonas", "Aisha", "Mateo", "Hana", "Samuel",
         "Nora", "Kenji", "Elena", "David", "Zara", "Tomas")
_SHOP_ITEMS = ("notebooks", "pens", "markers", "rulers", "folders", "erasers", "mugs", "candles",
               "socks", "batteries")


def _integers(rng: np.random.Generator, low: int, high: int) -> int:
  """One integer in low..high inclusive."""
  return int(rng.integers(low, high + 1))


def _draw_change(rng):
  count, price = _integers(rng, 2, 9), _integers(rng, 2, 15)
  bill = next(b for b in (10, 20, 50, 100, 200) if b > count * price)
  return {"count": count, "price": price, "bill": bill}


def _draw_two_items(rng):
  return {"count_a": _integers(rng, 2, 9), "price_a": _integers(rng, 2, 12),
          "count_b": _integers(rng, 2, 9), "price_b": _integers(rng, 1, 8)}


def _draw_sale(rng):
  price = _integers(rng, 20, 90)
  return {"price": price, "discount": _integers(rng, 2, price // 4), "count": _integers(rng, 2, 6)}


def _draw_share_equally(rng):
  friends, each = _integers(rng, 2, 9), _integers(rng, 3, 25)
  return {"total": friends * each, "friends": friends}


def _draw_keep_then_share(rng):
  kept, classmates, each = _integers(rng, 2, 12), _integers(rng, 3, 10), _integers(rng, 2, 8)
  return {"total": kept + classmates * each, "kept": kept, "classmates": classmates}


def _draw_printer(rng):
  return {"rate": _integers(rng, 8, 40), "minutes": _integers(rng, 3, 25)}


def _draw_travel_time(rng):
  speed, hours = _integers(rng, 40, 120), _integers(rng, 2, 7)
  return {"speed": speed, "distance": speed * hours}


def _draw_pages_left(rng):
  per_day, days = _integers(rng, 8, 30), _integers(rng, 2, 9)
  return {"per_day": per_day, "days": days, "total": per_day * days + _integers(rng, 5, 120)}


def _draw_earn_and_spend(rng):
  start, wage, hours = _integers(rng, 5, 60), _integers(rng, 8, 20), _integers(rng, 2, 8)
  return {"start": start, "wage": wage, "hours": hours,
          "spent": _integers(rng, 5, start + wage * hours - 1)}


def _draw_markers(rng):
  boxes, per_box, rooms = _integers(rng, 3, 12), _integers(rng, 6, 24), _integers(rng, 2, 6)
  # Each room gets a little less than the most it could, so a few markers are broken.
  each = max(1, boxes * per_box // rooms - _integers(rng, 1, 3))
  return {"boxes": boxes, "per_box": per_box, "rooms": rooms,
          "broken": boxes * per_box - rooms * each}


def _draw_bakery(rng):
  trays, per_tray, extra = _integers(rng, 3, 9), _integers(rng, 8, 24), _integers(rng, 4, 30)
  bag = _integers(rng, 2, 6)
  made = trays * per_tray + extra
  bags = _integers(rng, max(1, made // (2 * bag)), (made - 1) // bag)  # sells at least one
  return {"trays": trays, "per_tray": per_tray, "extra": extra, "sold": made - bag * bags,
          "bag": bag}


def _draw_savings(rng):
  weekly, weeks, price = _integers(rng, 5, 25), _integers(rng, 4, 12), _integers(rng, 3, 15)
  return {"weekly": weekly, "weeks": weeks, "price": price,
          "count": _integers(rng, 1, min(6, (weekly * weeks - 1) // price))}


TEMPLATES: tuple[ProblemTemplate, ...] = (
    ProblemTemplate(
        "change", "shopping",
        "{name} buys {count} {item} at {price} dollars each and pays with a {bill}-dollar bill. "
        "How many dollars of change does {name} get back?",
        "{bill} - {count} * {price}", _draw_change,
        lambda v: v["bill"] - v["count"] * v["price"]),
    ProblemTemplate(
        "two_items", "shopping",
        "{name} buys {count_a} notebooks at {price_a} dollars each and {count_b} pens at "
        "{price_b} dollars each. How many dollars does {name} spend in all?",
        "{count_a} * {price_a} + {count_b} * {price_b}", _draw_two_items,
        lambda v: v["count_a"] * v["price_a"] + v["count_b"] * v["price_b"]),
    ProblemTemplate(
        "sale", "shopping",
        "A jacket costs {price} dollars. During a sale the store takes {discount} dollars off "
        "each jacket. How many dollars do {count} jackets cost during the sale?",
        "{count} * ({price} - {discount})", _draw_sale,
        lambda v: v["count"] * (v["price"] - v["discount"])),
    ProblemTemplate(
        "share_equally", "sharing",
        "{name} has {total} stickers and shares them equally among {friends} friends. How many "
        "stickers does each friend get?",
        "{total} / {friends}", _draw_share_equally,
        lambda v: v["total"] // v["friends"]),
    ProblemTemplate(
        "keep_then_share", "sharing",
        "{name} bakes {total} cookies, keeps {kept} of them and shares the rest equally among "
        "{classmates} classmates. How many cookies does each classmate get?",
        "({total} - {kept}) / {classmates}", _draw_keep_then_share,
        lambda v: (v["total"] - v["kept"]) // v["classmates"]),
    ProblemTemplate(
        "printer", "rates",
        "A printer prints {rate} pages per minute. How many pages does it print in {minutes} "
        "minutes?",
        "{rate} * {minutes}", _draw_printer,
        lambda v: v["rate"] * v["minutes"]),
    ProblemTemplate(
        "travel_time", "rates",
        "A train travels at {speed} kilometers per hour. How many hours does it take to travel "
        "{distance} kilometers?",
        "{distance} / {speed}", _draw_travel_time,
        lambda v: v["distance"] // v["speed"]),
    ProblemTemplate(
        "pages_left", "rates",
        "{name} reads {per_day} pages a day. The book has {total} pages. How many pages are left "
        "after {days} days?",
        "{total} - {per_day} * {days}", _draw_pages_left,
        lambda v: v["total"] - v["per_day"] * v["days"]),
    ProblemTemplate(
        "earn_and_spend", "multi_step",
        "{name} has {start} dollars, earns {wage} dollars an hour for {hours} hours, and then "
        "spends {spent} dollars on a gift. How many dollars does {name} have now?",
        "{start} + {wage} * {hours} - {spent}", _draw_earn_and_spend,
        lambda v: v["start"] + v["wage"] * v["hours"] - v["spent"]),
    ProblemTemplate(
        "markers", "multi_step",
        "A school orders {boxes} boxes with {per_box} markers in each box. {broken} of the "
        "markers are broken, and the rest are shared equally among {rooms} classrooms. How many "
        "markers does each classroom get?",
        "({boxes} * {per_box} - {broken}) / {rooms}", _draw_markers,
        lambda v: (v["boxes"] * v["per_box"] - v["broken"]) // v["rooms"]),
    ProblemTemplate(
        "bakery", "multi_step",
        "A bakery makes {trays} trays of {per_tray} rolls in the morning and {extra} more rolls "
        "in the afternoon. It sells {sold} rolls and packs the rest into bags of {bag}. How many "
        "bags does it fill?",
        "({trays} * {per_tray} + {extra} - {sold}) / {bag}", _draw_bakery,
        lambda v: (v["trays"] * v["per_tray"] + v["extra"] - v["sold"]) // v["bag"]),
    ProblemTemplate(
        "savings", "multi_step",
        "{name} saves {weekly} dollars every week for {weeks} weeks, then buys {count} books "
        "that cost {price} dollars each. How many dollars does {name} have left?",
        "{weekly} * {weeks} - {count} * {price}", _draw_savings,
        lambda v: v["weekly"] * v["weeks"] - v["count"] * v["price"]),
)


def word_problems(n: int, seed: int) -> list[WordProblem]:
  """``n`` problems, deterministic in ``seed``; a prefix of a longer run. Templates are drawn
  uniformly, so every kind appears in a run of a few dozen."""
  if not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"n must be a non-negative int, got {n!r}")
  rng = np.random.default_rng(seed)
  problems = []
  for _ in range(n):
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    values = template.draw(rng)
    words = {"name": NAMES[int(rng.integers(len(NAMES)))],
             "item": _SHOP_ITEMS[int(rng.integers(len(_SHOP_ITEMS)))]}
    problems.append(WordProblem(question=template.text.format(**values, **words),
                                answer=template.answer(values), template=template.name,
                                expression=template.expression.format(**values)))
  return problems


# GSM8K's final line: "#### 1,234" (thousands commas occur; a sign is allowed).
_GSM8K_FINAL = re.compile(r"####\s*(-?[\d,]+)\s*$")


def read_gsm8k_jsonl(path: str | os.PathLike) -> list[WordProblem]:
  """Problems from a local GSM8K-format JSONL file: one object a line with "question" and
  "answer", the answer's reasoning ending in "#### N" with N an integer. Blank lines are skipped;
  anything else malformed raises ValueError naming the line."""
  problems = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        question, solution = record["question"], record["answer"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{line_number}: not a GSM8K record with question and answer "
                         f"({e})") from e
      match = _GSM8K_FINAL.search(solution.strip()) if isinstance(solution, str) else None
      if match is None or not re.fullmatch(r"-?\d{1,3}(,\d{3})*|-?\d+", match.group(1)):
        raise ValueError(f"{path}:{line_number}: the answer does not end in '#### <integer>'")
      problems.append(WordProblem(question=question, answer=int(match.group(1).replace(",", "")),
                                  template="gsm8k"))
  return problems
