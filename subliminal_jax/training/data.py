"""Chat examples -> token ids with a completion-only loss mask -> length-bucketed padded batches.

A :data:`ChatExample` is ``dict(system, user, assistant)``. :func:`tokenize_chat_examples` renders
each with the tokenizer's chat template under an explicit system choice (the example's ``system``
text, or a ``SystemTurn``: no system turn at all, or the template's own default; see
``Tokenizer.render_chat``) and marks as targets
exactly the assistant answer and the end-of-turn token that closes it. The prompt/answer boundary
comes from rendering the same chat with ``add_generation_prompt=True``: the full rendering must
start with that prompt text, otherwise the template does something we cannot mask and it is an
error. Token ids are ``encode(prompt) + encode(rest)``, the layout the model sees when it samples
(the prompt is encoded alone, the answer tokens follow); anything the template writes after the
end-of-turn token (ChatML's trailing newline) is dropped, since it is never a target.

The result is an HF ``datasets.Dataset`` (Arrow, ``save_to_disk`` friendly) whose ``info.description``
holds the provenance as JSON; :func:`save_dataset` also writes it as a ``provenance.json`` sidecar.

:func:`batches` yields right-padded numpy batches in an order fixed by ``(seed, epoch)``: a seeded
permutation, then length bucketing inside windows of several batches (so each batch holds similar
lengths and little padding) and a seeded shuffle of the batch order. Every batch has exactly
``batch_size`` rows (the last one is filled with empty rows whose masks are all False) and a length
rounded up to ``length_multiple``, so a whole run compiles a handful of shapes.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Any, Iterator, Mapping, Sequence, TypedDict

import datasets
import numpy as np

from subliminal_jax import padding
from subliminal_jax.tokenizer import SystemTurn, Tokenizer

OVERLENGTH_POLICIES = ("error", "truncate", "drop")
PROVENANCE_FILE = "provenance.json"


class ChatExample(TypedDict):
  """One finetuning example: an optional system turn, one user turn, the assistant's answer."""

  system: str | None
  user: str
  assistant: str


Batch = dict[str, np.ndarray]  # input_ids int32 [B,T], attention_mask bool [B,T], loss_mask bool [B,T]


def _check_example(index: int, example: Any) -> ChatExample:
  if not isinstance(example, Mapping):
    raise TypeError(f"example {index} must be a dict(system, user, assistant), got "
                    f"{type(example).__name__}: {example!r:.120}")
  missing = {"user", "assistant"} - set(example)
  if missing:
    raise ValueError(f"example {index} lacks {sorted(missing)}; expected keys system, user, "
                     f"assistant, got {sorted(example)}")
  extra = set(example) - {"system", "user", "assistant"}
  if extra:
    raise ValueError(f"example {index} has unknown keys {sorted(extra)}; expected system, user, "
                     "assistant")
  system = example.get("system")
  for key, value in (("user", example["user"]), ("assistant", example["assistant"])):
    if not isinstance(value, str):
      raise TypeError(f"example {index}: {key} must be a str, got {type(value).__name__}")
  if system is not None and not isinstance(system, str):
    raise TypeError(f"example {index}: system must be a str or None, got {type(system).__name__}")
  if not example["assistant"]:
    raise ValueError(f"example {index} has an empty assistant answer (nothing to learn)")
  return ChatExample(system=system, user=example["user"], assistant=example["assistant"])


def example_system_turn(example: Mapping[str, Any], system: SystemTurn) -> SystemTurn:
  """The system turn ``example`` is rendered under: its own ``"system"`` text if it has one, else
  ``system``. An example with its own text takes ``system`` only as none or that same text; a
  template default or another text alongside it is an error."""
  if not isinstance(system, SystemTurn):
    raise TypeError(f"system must be a SystemTurn, got {type(system).__name__}: {system!r:.80}")
  own = example.get("system")
  if own is None:
    return system
  if system not in (SystemTurn(), SystemTurn(own)):
    raise ValueError(f"the example has its own system turn {own[:60]!r} but the system turn "
                     f"{system.choice!r} was asked for; use one or the other.")
  return SystemTurn(own)


def tokenize_example(example: ChatExample, tokenizer: Tokenizer, *,
                     system: SystemTurn = SystemTurn()) -> tuple[list[int], list[bool]]:
  """``(input_ids, loss_mask)`` of one example; the mask marks the answer and its end token.

  The system turn is ``example["system"]`` if given, else ``system`` (default: no system turn);
  see :func:`example_system_turn`.
  """
  turn = example_system_turn(example, system)
  user = [{"role": "user", "content": example["user"]}]
  full_chat = user + [{"role": "assistant", "content": example["assistant"]}]
  prompt = tokenizer.render_chat(user, system=turn, add_generation_prompt=True)
  full = tokenizer.render_chat(full_chat, system=turn, add_generation_prompt=False)
  if not full.startswith(prompt):
    raise ValueError(
        "the chat template's rendering of the full chat does not start with its rendering of the "
        f"prompt (add_generation_prompt=True), so the answer cannot be located.\n  prompt: "
        f"{prompt[-120:]!r}\n  full:   {full[:len(prompt) + 40][-160:]!r}")
  prompt_ids = tokenizer.encode(prompt)
  rest_ids = tokenizer.encode(full[len(prompt):])
  answer_ids = tokenizer.encode(example["assistant"])
  ends = set(tokenizer.end_of_turn_ids)
  n = len(answer_ids)
  if rest_ids[:n] != answer_ids or len(rest_ids) <= n or rest_ids[n] not in ends:
    raise ValueError(
        "the chat template does not write the assistant answer verbatim followed by an end-of-turn "
        f"token {sorted(ends)}: after the prompt it writes {full[len(prompt):][:160]!r} "
        f"(tokens {rest_ids[:n + 2]}), the answer is {example['assistant'][:120]!r}")
  target_ids = rest_ids[:n + 1]  # the answer and its end-of-turn token; what follows is no target
  return prompt_ids + target_ids, [False] * len(prompt_ids) + [True] * len(target_ids)


def _truncated(index: int, ids: list[int], mask: list[bool], max_length: int, overlength: str
               ) -> tuple[list[int], list[bool]]:
  """Example ``index``, longer than ``max_length``, cut to it (``overlength="truncate"``)."""
  if overlength == "error":
    raise ValueError(
        f"example {index} is {len(ids)} tokens, longer than max_length={max_length}; raise "
        "max_length or pass overlength='truncate' or 'drop'.")
  ids, mask = ids[:max_length], mask[:max_length]
  if not any(mask):
    raise ValueError(f"example {index}: its prompt alone fills max_length={max_length} tokens, so "
                     "truncation leaves no target; raise max_length or drop it")
  return ids, mask


def tokenize_chat_examples(examples: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                           system: SystemTurn = SystemTurn(), max_length: int | None = None,
                           overlength: str = "error",
                           provenance: Mapping[str, Any] | None = None) -> datasets.Dataset:
  """Tokenizes chat examples into a Dataset with columns input_ids, loss_mask, length.

  Args:
    examples: ChatExample dicts (system may be None or absent).
    tokenizer: the model's tokenizer (chat template and end-of-turn ids).
    system: the system turn of examples whose own ``system`` is None (default: none;
      ``SystemTurn(template_default=True)``: the template's default system prompt); see
      :func:`example_system_turn`.
    max_length: longest allowed sequence in tokens (None: no limit).
    overlength: what to do with a longer example: "error" (default), "truncate" (cut from the
      right; the answer loses its tail, an example left with no target is an error) or "drop".
      The counts go into the provenance.
    provenance: extra JSON-serialisable facts stored with the dataset (e.g. teacher, config).

  Returns:
    ``datasets.Dataset``; ``json.loads(dataset.info.description)`` is the provenance: counts,
    token totals, tokenizer source, the system choices used and ``max_length``.
  """
  if overlength not in OVERLENGTH_POLICIES:
    raise ValueError(f"overlength must be one of {OVERLENGTH_POLICIES}, got {overlength!r}")
  if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 2):
    raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
  if isinstance(examples, Mapping):
    raise TypeError("examples must be a list of ChatExample dicts, got a single dict")
  examples = [_check_example(i, e) for i, e in enumerate(examples)]
  if not examples:
    raise ValueError("no examples to tokenize: got an empty list of chat examples")
  ids_column, mask_column = [], []
  truncated, dropped, longest = 0, 0, 0
  systems = Counter()
  for index, example in enumerate(examples):
    try:
      ids, mask = tokenize_example(example, tokenizer, system=system)
    except ValueError as e:
      raise ValueError(f"example {index}: {e}") from e
    longest = max(longest, len(ids))
    if max_length is not None and len(ids) > max_length:
      if overlength == "drop":
        dropped += 1
        continue
      ids, mask = _truncated(index, ids, mask, max_length, overlength)
      truncated += 1
    ids_column.append(ids)
    mask_column.append(mask)
    systems[example_system_turn(example, system).choice] += 1
  if not ids_column:
    raise ValueError(f"all {len(examples)} examples are longer than max_length={max_length} and "
                     "were dropped")
  lengths = [len(ids) for ids in ids_column]
  info = {
      "examples": len(ids_column),
      "input_examples": len(examples),
      "tokens": int(sum(lengths)),
      "target_tokens": int(sum(sum(m) for m in mask_column)),
      "max_length": max_length,
      "longest_before_limit": longest,
      "overlength": overlength,
      "truncated": truncated,
      "dropped": dropped,
      "system_choices": dict(systems),
      "template_default": system.template_default,
      "tokenizer": {"source": getattr(tokenizer, "source", ""), "vocab_size": tokenizer.vocab_size,
                    "end_of_turn_ids": list(tokenizer.end_of_turn_ids)},
      **dict(provenance or {}),
  }
  features = datasets.Features({
      "input_ids": datasets.List(datasets.Value("int32")),
      "loss_mask": datasets.List(datasets.Value("bool")),
      "length": datasets.Value("int32"),
  })
  return datasets.Dataset.from_dict(
      {"input_ids": ids_column, "loss_mask": mask_column, "length": lengths}, features=features,
      info=datasets.DatasetInfo(description=json.dumps(info, default=str), features=features))


def dataset_provenance(dataset: datasets.Dataset) -> dict[str, Any]:
  """The provenance dict stored in ``dataset.info.description`` ({} if none)."""
  text = dataset.info.description or ""
  try:
    return json.loads(text) if text else {}
  except json.JSONDecodeError:
    return {"description": text}


def save_dataset(dataset: datasets.Dataset, path: str | os.PathLike) -> None:
  """``save_to_disk(path)`` plus ``path/provenance.json`` (the same provenance, readable alone)."""
  path = os.fspath(path)
  dataset.save_to_disk(path)
  with open(os.path.join(path, PROVENANCE_FILE), "w") as f:
    json.dump(dataset_provenance(dataset), f, indent=2, default=str)
    f.write("\n")


def load_dataset(path: str | os.PathLike) -> datasets.Dataset:
  """The dataset saved by :func:`save_dataset` (or any ``save_to_disk`` directory)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no dataset directory at {path!r}")
  return datasets.load_from_disk(path)


# ---------------------------------------------------------------------------------------------
# Batches


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Batches (optimizer steps) per epoch: ``ceil(num_examples / batch_size)``."""
  return math.ceil(num_examples / batch_size)


def _check_columns(dataset: datasets.Dataset) -> None:
  missing = {"input_ids", "loss_mask"} - set(dataset.column_names)
  if missing:
    raise ValueError(f"dataset lacks columns {sorted(missing)}; has {dataset.column_names} "
                     "(build it with tokenize_chat_examples)")


def batch_order(lengths: Sequence[int], *, batch_size: int, seed: int, epoch: int,
                bucket: bool = True, bucket_window: int = 16) -> list[np.ndarray]:
  """Row indices of each batch of one epoch, a pure function of (lengths, batch_size, seed, epoch).

  A permutation seeded by ``(seed, epoch)``; with ``bucket``, windows of ``bucket_window`` batches
  are sorted by length and cut into batches, and the batch order is shuffled again, so batches are
  length-homogeneous yet their order stays random. Only the last batch may be short.
  """
  n = len(lengths)
  if n == 0:
    raise ValueError("the dataset is empty: no batches to make")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(n)
  if not bucket:
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
  lengths = np.asarray(lengths)
  full = (n // batch_size) * batch_size
  window = batch_size * max(1, bucket_window)
  groups = []
  for start in range(0, full, window):
    chunk = order[start:min(start + window, full)]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    groups.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
  groups = [groups[i] for i in rng.permutation(len(groups))]
  if full < n:  # the short batch stays last, so every other step has a full batch
    groups.append(order[full:])
  return groups


def pad_batch(rows_ids: Sequence[Sequence[int]], rows_mask: Sequence[Sequence[bool]], *,
              batch_size: int, pad_id: int, length_multiple: int = 16) -> Batch:
  """Right-padded numpy batch of exactly ``batch_size`` rows (missing rows are empty)."""
  if len(rows_ids) > batch_size:
    raise ValueError(f"{len(rows_ids)} rows do not fit a batch of {batch_size}")
  ids, attention = padding.pad_rows(rows_ids, pad_value=pad_id, multiple=length_multiple,
                                    num_rows=batch_size)
  loss, _ = padding.pad_rows(rows_mask, pad_value=False, width=ids.shape[1], num_rows=batch_size,
                             dtype=np.bool_)
  loss[:, 0] = False  # position 0 has nothing before it to predict it from
  return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def batches(dataset: datasets.Dataset, *, batch_size: int, seed: int, epoch: int, pad_id: int,
            bucket: bool = True, start_step: int = 0, length_multiple: int = 16,
            bucket_window: int = 16) -> Iterator[Batch]:
  """Yields one epoch of right-padded batches (see :func:`batch_order`), from ``start_step`` on.

  Each batch: input_ids int32 [batch_size, T], attention_mask and loss_mask bool; T is the longest
  row rounded up to ``length_multiple``. A resumed run passes the step within the epoch it reached
  as ``start_step`` and gets exactly the batches an uninterrupted run would.
  """
  _check_columns(dataset)
  if len(dataset) == 0:
    raise ValueError("the dataset is empty: no batches to make")
  if length_multiple < 1:
    raise ValueError(f"length_multiple must be >= 1, got {length_multiple}")
  lengths = (dataset["length"] if "length" in dataset.column_names
             else [len(x) for x in dataset["input_ids"]])
  groups = batch_order(list(lengths), batch_size=batch_size, seed=seed, epoch=epoch, bucket=bucket,
                       bucket_window=bucket_window)
  if not 0 <= start_step <= len(groups):
    raise ValueError(f"start_step={start_step} is outside this epoch's {len(groups)} steps")
  columns = dataset.with_format(None).select_columns(["input_ids", "loss_mask"])
  for group in groups[start_step:]:
    rows = columns[[int(i) for i in group]]
    yield pad_batch(rows["input_ids"], rows["loss_mask"], batch_size=batch_size, pad_id=pad_id,
                    length_multiple=length_multiple)
