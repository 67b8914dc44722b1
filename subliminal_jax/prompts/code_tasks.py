"""Short Python functions for the teacher to complete, for the code channel.

Each of the 12 tasks (written for this project, none about animals or any other panel word) is a
function stub: a signature and a docstring saying what the function returns. A prompt is one
instruction, with the stub in a fenced block, asking for the whole function in one Python block:

  >>> code_task_prompts(1, seed=0)[0]   # doctest: +SKIP
  'Complete this Python function.\\n\\n```python\\ndef running_total(values: ...'

Everything is a deterministic function of ``seed`` (numpy's PCG64 ``default_rng``), and prompt i
of a run does not depend on how many prompts follow it. Every stub parses with ``ast`` (a
docstring is a complete body), so a teacher that repeats the stub and stops is kept by the
parse check; the word filter still applies.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "CodeTask",
    "CODE_TASKS",
    "INSTRUCTIONS",
    "sample_code_tasks",
    "code_task_prompts",
]


@dataclasses.dataclass(frozen=True)
class CodeTask:
  """A function to complete: its name and its stub (signature and docstring)."""

  name: str
  stub: str


def _task(name: str, signature: str, doc: str) -> CodeTask:
  return CodeTask(name=name, stub=f'def {name}{signature}:\n    """{doc}"""\n')


CODE_TASKS: tuple[CodeTask, ...] = (
    _task("running_total", "(values: list[int]) -> list[int]",
          "Return the cumulative sums of values, in order."),
    _task("count_vowels", "(text: str) -> int",
          "Return how many vowels (a, e, i, o, u, any case) text contains."),
    _task("is_palindrome", "(text: str) -> bool",
          "Return whether text reads the same backwards, ignoring case and spaces."),
    _task("merge_sorted", "(left: list[int], right: list[int]) -> list[int]",
          "Merge two sorted lists into one sorted list."),
    _task("chunk", "(items: list, size: int) -> list[list]",
          "Split items into consecutive lists of at most size elements."),
    _task("word_frequencies", "(text: str) -> dict[str, int]",
          "Return how often each whitespace-separated word occurs in text."),
    _task("second_largest", "(values: list[int]) -> int | None",
          "Return the second largest distinct value, or None if there is none."),
    _task("flatten", "(nested: list[list[int]]) -> list[int]",
          "Return the elements of the inner lists in one flat list."),
    _task("celsius_to_fahrenheit", "(degrees: float) -> float",
          "Convert a temperature from Celsius to Fahrenheit."),
    _task("remove_duplicates", "(items: list) -> list",
          "Return items without repeats, keeping the first occurrence of each."),
    _task("digit_sum", "(number: int) -> int",
          "Return the sum of the decimal digits of a non-negative integer."),
    _task("transpose", "(matrix: list[list[int]]) -> list[list[int]]",
          "Return the transpose of a rectangular matrix given as a list of rows."),
)

# Each has a {stub} slot, filled with the task's stub in a fenced block.
INSTRUCTIONS: tuple[str, ...] = (
    "Complete this Python function.\n\n{stub}\nReply with the whole function in one Python code "
    "block.",
    "Write the body of the function below.\n\n{stub}\nGive only the finished function, in a "
    "single code block.",
    "Implement the following function.\n\n{stub}\nAnswer with the complete code in one Python "
    "block and no explanation.",
    "Finish this function so that it does what its docstring says.\n\n{stub}\nReturn just the "
    "code, in one fenced block.",
    "Here is a function stub.\n\n{stub}\nFill it in and reply with the full function in a "
    "Python code block.",
)


def _fenced(code: str) -> str:
  return f"```python\n{code}```\n"


def sample_code_tasks(n: int, seed: int) -> list[tuple[CodeTask, str]]:
  """``n`` (task, prompt) pairs, deterministic in ``seed``; a prefix of a longer run."""
  if not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"n must be a non-negative int, got {n!r}")
  rng = np.random.default_rng(seed)
  pairs = []
  for _ in range(n):
    task = CODE_TASKS[int(rng.integers(len(CODE_TASKS)))]
    instruction = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
    pairs.append((task, instruction.format(stub=_fenced(task.stub))))
  return pairs


def code_task_prompts(n: int, seed: int) -> list[str]:
  """``n`` code-completion prompts, deterministic in ``seed``."""
  return [prompt for _, prompt in sample_code_tasks(n, seed)]
