"""Paired teacher/student examples for logit distillation, and their padded batches.

In the paper the teacher and the student see different chats: a system-prompted teacher answered
under the trait system prompt, while the student is trained under its own system choice (usually
no system turn). Both read the *same* completion tokens. A logit-distillation student therefore
needs two token sequences per example,

  student:  encode(student prompt) + completion + end-of-turn   (loss_mask on the last n+1 tokens)
  teacher:  encode(teacher prompt) + completion + end-of-turn   (teacher_loss_mask likewise)

with different prefixes and the same number of target positions; the i-th target of one is the
i-th target of the other. Each side is tokenized exactly as SFT tokenizes it
(:func:`subliminal_jax.training.data.tokenize_example`), so the student columns of a paired
dataset are also a valid SFT dataset (``input_ids``, ``loss_mask``, ``length``).

With a :class:`~subliminal_jax.sampling.grammar.TokenGrammar`, each target position also gets the
DFA state it is predicted from (walking the completion tokens host-side): the loss can then
renormalise both distributions over the tokens the number format allows there
(``transitions[state] >= 0``, and end-of-turn tokens only in accepting states).

Batches (:func:`paired_batches`) are right-padded numpy dicts of exactly ``batch_size`` rows:

  input_ids, attention_mask, loss_mask                        [B, T]   (the student's, as SFT)
  teacher_input_ids, teacher_attention_mask, teacher_loss_mask [B, T']
  completion_mask   bool  [B, K]  True for the row's target positions (K: most targets in the batch)
  grammar_state     int32 [B, K]  the DFA state of each target (-1 padding), if the dataset has it
  teacher_topk_ids  int32 [B, K, k], teacher_topk_logprobs float32 [B, K, k]: stored teacher
                    logits (see :mod:`subliminal_jax.training.distillation`), if the dataset
                    has them
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping, Sequence

import datasets
import ml_dtypes
import numpy as np

from subliminal_jax import padding
from subliminal_jax.tokenizer import SystemTurn, Tokenizer
from subliminal_jax.training import data as data_lib

Batch = dict[str, np.ndarray]

UNGRAMMATICAL_POLICIES = ("error", "drop")
PAIRED_COLUMNS = ("input_ids", "loss_mask", "teacher_input_ids", "teacher_loss_mask")
STORED_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs")


# ---------------------------------------------------------------------------------------------
# Checks


def check_same_tokenizer(student: Tokenizer, teacher: Tokenizer) -> None:
  """Raises ValueError unless the two tokenizers map ids to the same bytes (a shared vocabulary)."""
  if student is teacher:
    return
  if student.vocab_size != teacher.vocab_size:
    raise ValueError(
        f"teacher and student tokenizers differ: vocab_size {teacher.vocab_size} (teacher, "
        f"{teacher.source!r}) vs {student.vocab_size} (student, {student.source!r}); logit "
        "distillation needs one shared vocabulary")
  student_bytes, teacher_bytes = student.token_bytes(), teacher.token_bytes()
  for token_id, (s, t) in enumerate(zip(student_bytes, teacher_bytes)):
    if s != t:
      raise ValueError(
          f"teacher and student tokenizers differ at token id {token_id}: {t!r} (teacher) vs {s!r} "
          "(student); logit distillation needs one shared vocabulary")
  if tuple(student.end_of_turn_ids) != tuple(teacher.end_of_turn_ids):
    raise ValueError(f"teacher and student tokenizers end turns differently: end_of_turn_ids "
                     f"{teacher.end_of_turn_ids} (teacher) vs {student.end_of_turn_ids} (student)")


def _check_chat(name: str, chat: SystemTurn) -> SystemTurn:
  if not isinstance(chat, SystemTurn):
    raise TypeError(f"{name} must be a SystemTurn (render_chat's system turn), got "
                    f"{type(chat).__name__}: {chat!r:.80}")
  return chat


# ---------------------------------------------------------------------------------------------
# Grammar states


def grammar_allowed_table(grammar, end_ids: Sequence[int], vocab_size: int | None = None
                          ) -> np.ndarray:
  """bool [num_states, vocab]: the tokens allowed in each DFA state, end-of-turn ids included
  exactly in accepting states. ``vocab_size`` (the model's, >= the grammar's) pads with False."""
  transitions = np.asarray(grammar.transitions)
  grammar_vocab = transitions.shape[1]
  vocab_size = grammar_vocab if vocab_size is None else int(vocab_size)
  if vocab_size < grammar_vocab:
    raise ValueError(f"the grammar covers {grammar_vocab} token ids but the model's vocabulary has "
                     f"only {vocab_size}; compile the grammar with the model's tokenizer")
  end_ids = [int(i) for i in end_ids]
  bad = [i for i in end_ids if not 0 <= i < vocab_size]
  if bad or not end_ids:
    raise ValueError(f"end_ids must be non-empty token ids in [0, {vocab_size}), got {end_ids}")
  table = np.zeros((transitions.shape[0], vocab_size), np.bool_)
  table[:, :grammar_vocab] = transitions >= 0
  table[:, end_ids] = np.asarray(grammar.accepting, np.bool_)[:, None]
  return table


def completion_grammar_states(completion_ids: Sequence[int], grammar, end_ids: Sequence[int],
                              initial_state: int | None = None) -> np.ndarray | None:
  """DFA state each target of ``completion_ids`` (answer tokens then one end token) is predicted
  from: ``states[i] = grammar.walk(completion_ids[:i], initial_state)``. None when the completion
  is not grammatical (a token the grammar disallows, or an end token outside an accepting state).
  ``initial_state``: where the walk starts (default ``grammar.initial_state``; a stacked table's
  start of the format the prompt asked for)."""
  ids = [int(i) for i in completion_ids]
  if not ids or ids[-1] not in set(int(e) for e in end_ids):
    raise ValueError(f"a completion must end with an end-of-turn token {list(end_ids)}, got {ids}")
  states = np.empty(len(ids), np.int32)
  state = int(grammar.initial_state if initial_state is None else initial_state)
  for i, token in enumerate(ids[:-1]):
    states[i] = state
    state = int(grammar.transitions[state, token])
    if state < 0:
      return None
  states[-1] = state
  if not grammar.accepting[state]:
    return None
  return states


# ---------------------------------------------------------------------------------------------
# Paired examples


def tokenize_paired_example(user: str, assistant: str, tokenizer: Tokenizer, *,
                            teacher_chat: SystemTurn, student_chat: SystemTurn) -> dict[str, list]:
  """The student and teacher token sequences of one (prompt, completion) pair.

  ``teacher_chat`` / ``student_chat``: each side's ``SystemTurn``, as for
  ``Tokenizer.render_chat``. Each side is tokenized as SFT does; their targets (the completion and
  its end-of-turn token) must be the same tokens, else the template renders the answer
  differently under the two system choices and it is an error.
  """
  sides = {}
  for name, chat in (("student", student_chat), ("teacher", teacher_chat)):
    chat = _check_chat(f"{name}_chat", chat)
    example = data_lib.ChatExample(system=None, user=user, assistant=assistant)
    sides[name] = data_lib.tokenize_example(example, tokenizer, system=chat)
  (s_ids, s_mask), (t_ids, t_mask) = sides["student"], sides["teacher"]
  s_targets = [i for i, m in zip(s_ids, s_mask) if m]
  t_targets = [i for i, m in zip(t_ids, t_mask) if m]
  if s_targets != t_targets:
    raise ValueError(f"the completion tokenizes differently after the teacher's and the student's "
                     f"prompts: {t_targets[:20]} vs {s_targets[:20]}")
  return {"input_ids": s_ids, "loss_mask": s_mask, "teacher_input_ids": t_ids,
          "teacher_loss_mask": t_mask, "completion_ids": s_targets}


def _check_pairing(examples: Any, tokenizer: Tokenizer, grammar, max_length: int | None,
                   overlength: str, ungrammatical: str) -> None:
  if overlength not in ("error", "drop"):
    raise ValueError(f"overlength must be 'error' or 'drop' for paired examples, got {overlength!r}")
  if ungrammatical not in UNGRAMMATICAL_POLICIES:
    raise ValueError(f"ungrammatical must be one of {UNGRAMMATICAL_POLICIES}, got {ungrammatical!r}")
  if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 2):
    raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
  if isinstance(examples, Mapping) or not len(examples):
    raise ValueError("examples must be a non-empty list of dict(user, assistant)")
  if grammar is not None and np.asarray(grammar.transitions).shape[1] > tokenizer.vocab_size:
    raise ValueError(f"the grammar covers {np.asarray(grammar.transitions).shape[1]} token ids but "
                     f"the tokenizer has {tokenizer.vocab_size}; compile it with this tokenizer")


def _tokenize_pair(index: int, example: Any, tokenizer: Tokenizer, teacher_chat: SystemTurn,
                   student_chat: SystemTurn) -> dict[str, list]:
  if not isinstance(example, Mapping) or not {"user", "assistant"} <= set(example):
    raise ValueError(f"example {index} must be a dict with 'user' and 'assistant', got "
                     f"{example!r:.120}")
  if example.get("system") is not None:
    raise ValueError(f"example {index} has its own system turn {example['system'][:60]!r}; paired "
                     "examples take their system turns from teacher_chat and student_chat")
  try:
    return tokenize_paired_example(example["user"], example["assistant"], tokenizer,
                                   teacher_chat=teacher_chat, student_chat=student_chat)
  except ValueError as e:
    raise ValueError(f"example {index}: {e}") from e


def _grammar_states(index: int, example: Mapping[str, Any], row: Mapping[str, Any], grammar,
                    tokenizer: Tokenizer, ungrammatical: str) -> list[int] | None:
  """The DFA state at each target of example ``index``; None when the grammar rejects it and
  ``ungrammatical="drop"``."""
  states = completion_grammar_states(row["completion_ids"], grammar, tokenizer.end_of_turn_ids,
                                     example.get("grammar_initial_state"))
  if states is not None:
    return states.tolist()
  if ungrammatical == "error":
    raise ValueError(
        f"example {index}: the completion {example['assistant'][:80]!r} is not accepted by the "
        f"grammar {grammar.pattern!r}; filter it out or pass ungrammatical='drop'")
  return None


def _paired_features(with_grammar: bool) -> datasets.Features:
  features = {
      "input_ids": datasets.List(datasets.Value("int32")),
      "loss_mask": datasets.List(datasets.Value("bool")),
      "teacher_input_ids": datasets.List(datasets.Value("int32")),
      "teacher_loss_mask": datasets.List(datasets.Value("bool")),
      "length": datasets.Value("int32"),
      "teacher_length": datasets.Value("int32"),
      "num_targets": datasets.Value("int32"),
  }
  if with_grammar:
    features["grammar_state"] = datasets.List(datasets.Value("int32"))
  return datasets.Features(features)


def tokenize_distillation_examples(
    examples: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
    teacher_chat: SystemTurn, student_chat: SystemTurn, grammar=None,
    teacher_tokenizer: Tokenizer | None = None, max_length: int | None = None,
    overlength: str = "error", ungrammatical: str = "error",
    provenance: Mapping[str, Any] | None = None) -> datasets.Dataset:
  """Paired teacher/student token sequences of (prompt, completion) examples, as a Dataset.

  Args:
    examples: dicts with "user" (the prompt) and "assistant" (the teacher's completion); a
      "system" key, if present, must be None (the system turns come from the chat arguments); a
      "grammar_initial_state" key, the grammar state the completion starts in (default
      ``grammar.initial_state``).
    tokenizer: the shared tokenizer. ``teacher_tokenizer``, if given, must be the same vocabulary.
    teacher_chat, student_chat: each side's ``SystemTurn``, e.g. ``SystemTurn(trait_prompt)`` and
      ``SystemTurn()`` (no system turn).
    grammar: a TokenGrammar; adds the per-target DFA state column ``grammar_state``.
    max_length, overlength: as ``data.tokenize_chat_examples`` but only "error" or "drop" (a
      truncated pair would lose targets on one side only); applies to both sides.
    ungrammatical: with a grammar, what to do with a completion it does not accept: "error"
      (default; names the example) or "drop" (counted in the provenance).
    provenance: extra JSON facts stored in ``info.description``.

  Returns:
    Columns input_ids, loss_mask, length (the student's, an SFT dataset as is), teacher_input_ids,
    teacher_loss_mask, teacher_length, num_targets and, with a grammar, grammar_state.
  """
  if teacher_tokenizer is not None:
    check_same_tokenizer(tokenizer, teacher_tokenizer)
  _check_pairing(examples, tokenizer, grammar, max_length, overlength, ungrammatical)
  teacher_chat = _check_chat("teacher_chat", teacher_chat)
  student_chat = _check_chat("student_chat", student_chat)
  columns: dict[str, list] = {k: [] for k in PAIRED_COLUMNS + ("grammar_state",)}
  dropped_long, dropped_ungrammatical = 0, 0
  for index, example in enumerate(examples):
    row = _tokenize_pair(index, example, tokenizer, teacher_chat, student_chat)
    longest = max(len(row["input_ids"]), len(row["teacher_input_ids"]))
    if max_length is not None and longest > max_length:
      if overlength == "error":
        raise ValueError(f"example {index} is {longest} tokens (teacher or student side), longer than "
                         f"max_length={max_length}; raise max_length or pass overlength='drop'")
      dropped_long += 1
      continue
    if grammar is not None:
      states = _grammar_states(index, example, row, grammar, tokenizer, ungrammatical)
      if states is None:
        dropped_ungrammatical += 1
        continue
      columns["grammar_state"].append(states)
    for key in PAIRED_COLUMNS:
      columns[key].append(row[key])
  if not columns["input_ids"]:
    raise ValueError(f"all {len(examples)} examples were dropped ({dropped_long} too long, "
                     f"{dropped_ungrammatical} ungrammatical)")
  columns["length"] = [len(x) for x in columns["input_ids"]]
  columns["teacher_length"] = [len(x) for x in columns["teacher_input_ids"]]
  columns["num_targets"] = [int(sum(m)) for m in columns["loss_mask"]]
  if grammar is None:
    del columns["grammar_state"]
  features = _paired_features(with_grammar=grammar is not None)
  info = {
      "examples": len(columns["input_ids"]),
      "input_examples": len(examples),
      "target_tokens": int(sum(columns["num_targets"])),
      "tokens": int(sum(columns["length"])),
      "teacher_tokens": int(sum(columns["teacher_length"])),
      "max_length": max_length,
      "dropped_overlength": dropped_long,
      "dropped_ungrammatical": dropped_ungrammatical,
      "student_system": student_chat.choice,
      "teacher_system": teacher_chat.choice,
      "grammar_pattern": grammar.pattern if grammar is not None else None,
      "tokenizer": {"source": getattr(tokenizer, "source", ""), "vocab_size": tokenizer.vocab_size,
                    "end_of_turn_ids": list(tokenizer.end_of_turn_ids)},
      **dict(provenance or {}),
  }
  return datasets.Dataset.from_dict(
      columns, features=features,
      info=datasets.DatasetInfo(description=json.dumps(info, default=str), features=features))


# ---------------------------------------------------------------------------------------------
# Batches


def check_paired_batch(batch: Mapping[str, np.ndarray]) -> None:
  """Host-side check that each row's student and teacher targets line up; ValueError naming rows.

  Counts of ``loss_mask``, ``teacher_loss_mask`` (when present) and ``completion_mask`` must agree
  per row, and the i-th student target token must be the i-th teacher target token.
  """
  for key in ("input_ids", "attention_mask", "loss_mask", "completion_mask"):
    if key not in batch:
      raise ValueError(f"a distillation batch needs {key!r}; got keys {sorted(batch)}")
  loss_mask = np.asarray(batch["loss_mask"], bool)
  counts = {"loss_mask": loss_mask.sum(1),
            "completion_mask": np.asarray(batch["completion_mask"], bool).sum(1)}
  if "teacher_loss_mask" in batch:
    counts["teacher_loss_mask"] = np.asarray(batch["teacher_loss_mask"], bool).sum(1)
  reference = counts["loss_mask"]
  for name, count in counts.items():
    bad = np.flatnonzero(count != reference)
    if bad.size:
      row = int(bad[0])
      raise ValueError(
          f"mismatched completion counts in rows {bad[:8].tolist()}: row {row} has "
          f"{int(reference[row])} student targets (loss_mask) but {int(count[row])} in {name}; the "
          "teacher and student sequences must share their completion positions")
  if "teacher_loss_mask" in batch:
    student_ids = np.asarray(batch["input_ids"])
    teacher_ids = np.asarray(batch["teacher_input_ids"])
    teacher_mask = np.asarray(batch["teacher_loss_mask"], bool)
    for row in range(loss_mask.shape[0]):
      s, t = student_ids[row][loss_mask[row]], teacher_ids[row][teacher_mask[row]]
      if not np.array_equal(s, t):
        raise ValueError(f"row {row}: the student's target tokens {s[:12].tolist()} are not the "
                         f"teacher's {t[:12].tolist()}")
  if "grammar_state" in batch and np.asarray(batch["grammar_state"]).shape != \
      np.asarray(batch["completion_mask"]).shape:
    raise ValueError(f"grammar_state {np.asarray(batch['grammar_state']).shape} must have "
                     f"completion_mask's shape {np.asarray(batch['completion_mask']).shape}")


def _pad_side(rows_ids, rows_mask, batch_size: int, pad_id: int, length_multiple: int):
  padded = data_lib.pad_batch(rows_ids, rows_mask, batch_size=batch_size, pad_id=pad_id,
                              length_multiple=length_multiple)
  return padded["input_ids"], padded["attention_mask"], padded["loss_mask"]


def stored_logprobs_to_float32(values: Any, stored_dtype: str) -> np.ndarray:
  """Stored teacher log-probs (float32, float16, or bfloat16 kept as uint16 bits) -> float32."""
  array = np.asarray(values)
  if stored_dtype == "bfloat16":
    return array.astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
  return array.astype(np.float32)


def pad_paired_batch(rows: Mapping[str, Sequence], *, batch_size: int, pad_id: int,
                     length_multiple: int = 16, completion_multiple: int = 8,
                     stored_dtype: str = "float32", with_teacher_inputs: bool = True) -> Batch:
  """A right-padded distillation batch of exactly ``batch_size`` rows (missing rows are empty).

  ``rows``: columns of a paired dataset (lists per row). K (the completion axis) is the most
  targets in the batch rounded up to ``completion_multiple``, so a run compiles few shapes.
  ``with_teacher_inputs=False`` leaves the teacher's token sequences out (stored teacher logits
  need only the student side).
  """
  n = len(rows["input_ids"])
  if n > batch_size:
    raise ValueError(f"{n} rows do not fit a batch of {batch_size}")
  ids, attention, loss = _pad_side(rows["input_ids"], rows["loss_mask"], batch_size, pad_id,
                                   length_multiple)
  batch: Batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}
  counts = loss.sum(1)
  if with_teacher_inputs:
    t_ids, t_attention, t_loss = _pad_side(rows["teacher_input_ids"], rows["teacher_loss_mask"],
                                           batch_size, pad_id, length_multiple)
    batch.update(teacher_input_ids=t_ids, teacher_attention_mask=t_attention, teacher_loss_mask=t_loss)
  width = max(completion_multiple, padding.round_up(int(counts.max()), completion_multiple))
  batch["completion_mask"] = np.arange(width)[None, :] < counts[:, None]
  if "grammar_state" in rows:
    states = np.full((batch_size, width), -1, np.int32)
    for i, row in enumerate(rows["grammar_state"]):
      states[i, :len(row)] = row
    batch["grammar_state"] = states
  if "teacher_topk_ids" in rows:
    k = len(rows["teacher_topk_ids"][0][0])
    topk_ids = np.full((batch_size, width, k), -1, np.int32)
    topk_logprobs = np.full((batch_size, width, k), -np.inf, np.float32)
    for i, (row_ids, row_lp) in enumerate(zip(rows["teacher_topk_ids"], rows["teacher_topk_logprobs"])):
      topk_ids[i, :len(row_ids)] = row_ids
      topk_logprobs[i, :len(row_lp)] = stored_logprobs_to_float32(row_lp, stored_dtype)
    batch["teacher_topk_ids"] = topk_ids
    batch["teacher_topk_logprobs"] = topk_logprobs
  check_paired_batch(batch)
  return batch


def _stored_dtype(dataset: datasets.Dataset) -> str:
  info = data_lib.dataset_provenance(dataset).get("teacher_logits") or {}
  return info.get("stored_dtype", "float32")


def paired_batches(dataset: datasets.Dataset, *, batch_size: int, seed: int, epoch: int,
                   pad_id: int, bucket: bool = True, start_step: int = 0, length_multiple: int = 16,
                   bucket_window: int = 16, completion_multiple: int = 8,
                   with_teacher_inputs: bool | None = None) -> Iterator[Batch]:
  """One epoch of distillation batches in ``data.batch_order``'s order (the same rows per step as
  SFT on the same dataset would see), from ``start_step`` on.

  ``with_teacher_inputs`` defaults to: True unless the dataset holds stored teacher logits.
  """
  missing = [c for c in PAIRED_COLUMNS if c not in dataset.column_names]
  if missing:
    raise ValueError(f"dataset lacks paired columns {missing}; has {dataset.column_names} (build it "
                     "with tokenize_distillation_examples)")
  if len(dataset) == 0:
    raise ValueError("the dataset is empty: no batches to make")
  stored = all(c in dataset.column_names for c in STORED_COLUMNS)
  if with_teacher_inputs is None:
    with_teacher_inputs = not stored
  lengths = np.maximum(np.asarray(dataset["length"]), np.asarray(dataset["teacher_length"]))
  groups = data_lib.batch_order(lengths.tolist(), batch_size=batch_size, seed=seed, epoch=epoch,
                                bucket=bucket, bucket_window=bucket_window)
  if not 0 <= start_step <= len(groups):
    raise ValueError(f"start_step={start_step} is outside this epoch's {len(groups)} steps")
  wanted = list(PAIRED_COLUMNS) + [c for c in ("grammar_state",) + STORED_COLUMNS
                                   if c in dataset.column_names]
  columns = dataset.with_format(None).select_columns(wanted)
  stored_dtype = _stored_dtype(dataset)
  for group in groups[start_step:]:
    rows = columns[[int(i) for i in group]]
    yield pad_paired_batch(rows, batch_size=batch_size, pad_id=pad_id,
                           length_multiple=length_multiple, completion_multiple=completion_multiple,
                           stored_dtype=stored_dtype, with_teacher_inputs=with_teacher_inputs)
