"""Divergence tokens of a finished dataset: where the teacher and the base would choose differently.

Schrodi et al. (arXiv 2509.23886): the subliminal signal sits in a few "divergence tokens". Given
completions already sampled from the teacher, both models are run teacher-forced on the SAME
completion tokens, each after its own prompt: the teacher is the base with the trait system prompt
(or a finetuned model), the reference is the base without it (the student's own prompt). At every
completion target t:

* ``divergent``: the teacher's argmax for token t differs from the reference's (over ``allowed``
  token ids when given, e.g. the digits and separators a number grammar allows), the share of
  completion tokens the issue asks for;
* ``teacher_choice``: divergent AND the completion's token is the teacher's argmax: the token the
  teacher would pick greedily where the base would not (Schrodi's divergence tokens proper);
* ``kl``: KL(teacher || reference) of the next-token distributions (over ``allowed`` if given).

This is the teacher-forced counterpart of the sampler's online divergence filter
(:mod:`subliminal_jax.sampling.divergence`, whose ``divergence_step`` it reuses). To remove the
tokens from the student's loss, :func:`mask_targets` turns their ``loss_mask`` entries off in the
student's tokenized dataset (a ``datasets.Dataset`` from ``training.data.tokenize_chat_examples``),
which then trains through ``fit`` unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from typing import Any, Mapping, Sequence

import datasets
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from subliminal_jax import padding
from subliminal_jax.sampling import divergence as sampling_divergence
from subliminal_jax.tokenizer import SystemTurn
from subliminal_jax.training import data as data_lib

SELECTIONS = ("divergent", "teacher_choice")


@dataclasses.dataclass(frozen=True)
class DivergenceResult:
  """Per example (dataset order), per completion target: the token, both argmaxes, the flags."""

  tokens: list[np.ndarray]
  teacher_argmax: list[np.ndarray]
  reference_argmax: list[np.ndarray]
  kl: list[np.ndarray]

  @property
  def divergent(self) -> list[np.ndarray]:
    return [t != r for t, r in zip(self.teacher_argmax, self.reference_argmax)]

  @property
  def teacher_choice(self) -> list[np.ndarray]:
    return [(t != r) & (tok == t) for tok, t, r in
            zip(self.tokens, self.teacher_argmax, self.reference_argmax)]

  def selection(self, which: str = "divergent") -> list[np.ndarray]:
    if which not in SELECTIONS:
      raise ValueError(f"unknown selection {which!r}; expected one of {list(SELECTIONS)}")
    return self.divergent if which == "divergent" else self.teacher_choice

  def stats(self, token_texts: Sequence[str] | None = None, top: int = 10) -> dict[str, Any]:
    """Shares over all completion tokens, per-example counts and the most frequent divergence
    tokens (by completion token id)."""
    flat = lambda arrays: np.concatenate(arrays) if arrays else np.zeros((0,))
    tokens, teacher, reference = flat(self.tokens), flat(self.teacher_argmax), flat(self.reference_argmax)
    divergent, chosen = flat(self.divergent).astype(bool), flat(self.teacher_choice).astype(bool)
    n = int(tokens.size)
    per_example = np.array([d.sum() for d in self.divergent])
    top_ids = Counter(tokens[chosen].astype(int).tolist()).most_common(top)
    return {
        "examples": len(self.tokens),
        "completion_tokens": n,
        "share_divergent": float(divergent.mean()) if n else float("nan"),
        "share_teacher_choice": float(chosen.mean()) if n else float("nan"),
        "share_token_is_teacher_argmax": float((tokens == teacher).mean()) if n else float("nan"),
        "share_token_is_reference_argmax": float((tokens == reference).mean()) if n else float("nan"),
        "share_examples_with_divergence": float((per_example > 0).mean()),
        "mean_divergent_per_example": float(per_example.mean()),
        "mean_kl": float(flat(self.kl).mean()) if n else float("nan"),
        "mean_kl_at_divergent": float(flat(self.kl)[divergent].mean()) if divergent.any() else float("nan"),
        "top_teacher_choice_tokens": [
            {"id": t, "text": token_texts[t] if token_texts is not None else None, "count": c}
            for t, c in top_ids],
    }


@functools.partial(jax.jit, static_argnums=(0, 2))
def _divergence(teacher_graphdef, teacher_state, reference_graphdef, reference_state,
                teacher_ids, teacher_mask, teacher_pos, reference_ids, reference_mask, reference_pos,
                allowed):
  teacher = nnx.merge(teacher_graphdef, teacher_state)
  reference = nnx.merge(reference_graphdef, reference_state)

  def picked(model, ids, mask, pos):  # logits predicting each target: [B, K, V]
    hidden, _ = model.hidden_states(ids, mask)
    return model.logits_from_hidden(jnp.take_along_axis(hidden, pos[..., None], axis=1))

  t_logits = picked(teacher, teacher_ids, teacher_mask, teacher_pos)
  r_logits = picked(reference, reference_ids, reference_mask, reference_pos)
  b, k, v = t_logits.shape
  step = sampling_divergence.divergence_step(
      t_logits.reshape(b * k, v), r_logits.reshape(b * k, v),
      None if allowed is None else jnp.broadcast_to(allowed, (b * k, v)))
  kl = step["kl_raw"] if allowed is None else step["kl_allowed"]
  return (step["teacher_argmax"].reshape(b, k), step["reference_argmax"].reshape(b, k),
          kl.reshape(b, k))


def _target_positions(rows_ids: Sequence[Sequence[int]], rows_mask: Sequence[Sequence[bool]]
                      ) -> list[np.ndarray]:
  out = []
  for i, mask in enumerate(rows_mask):
    idx = np.flatnonzero(np.asarray(mask, bool))
    if idx.size and idx[0] == 0:
      raise ValueError(f"row {i}: position 0 is marked as a target; nothing predicts it")
    out.append(idx)
  return out


def _pack(rows_ids, positions, width_multiple: int, pad_id: int):
  ids, mask = padding.pad_rows(rows_ids, pad_value=pad_id, multiple=width_multiple)
  # The position before a target predicts it.
  pos, _ = padding.pad_rows([np.asarray(p) - 1 for p in positions],
                            width=max(1, max(len(p) for p in positions)))
  return ids, mask, pos


def completion_divergence(teacher_model: nnx.Module, reference_model: nnx.Module,
                          teacher_rows: Mapping[str, Sequence], reference_rows: Mapping[str, Sequence],
                          *, allowed: np.ndarray | None = None, batch_size: int = 8, pad_id: int = 0,
                          progress: bool = False) -> DivergenceResult:
  """Divergence of each completion target, teacher-forced.

  ``teacher_rows`` and ``reference_rows`` have columns ``input_ids`` and ``loss_mask`` (lists, one
  per example, as in a tokenized dataset): the same completions after each model's own prompt.
  The k-th target of a teacher row must be the same token as the k-th target of its reference
  row. ``allowed``: bool [vocab] restricting both argmaxes (and the KL) to those ids.
  """
  t_ids, r_ids = list(teacher_rows["input_ids"]), list(reference_rows["input_ids"])
  if len(t_ids) != len(r_ids):
    raise ValueError(f"{len(t_ids)} teacher rows but {len(r_ids)} reference rows")
  if not t_ids:
    raise ValueError("no rows given")
  t_pos = _target_positions(t_ids, teacher_rows["loss_mask"])
  r_pos = _target_positions(r_ids, reference_rows["loss_mask"])
  tokens = []
  for i, (ti, ri, tp, rp) in enumerate(zip(t_ids, r_ids, t_pos, r_pos)):
    t_tok, r_tok = np.asarray(ti)[tp], np.asarray(ri)[rp]
    if t_tok.shape != r_tok.shape or (t_tok != r_tok).any():
      raise ValueError(f"example {i}: the teacher's completion targets {t_tok.tolist()[:20]} differ "
                       f"from the reference's {r_tok.tolist()[:20]}; both must score the same tokens")
    tokens.append(t_tok.astype(np.int32))
  vocab = teacher_model.config.vocab_size
  if reference_model.config.vocab_size != vocab:
    raise ValueError(f"teacher vocabulary {vocab} != reference vocabulary "
                     f"{reference_model.config.vocab_size}")
  allowed_dev = None
  if allowed is not None:
    allowed = np.asarray(allowed, bool)
    if allowed.shape != (vocab,):
      raise ValueError(f"allowed has shape {allowed.shape}; expected ({vocab},)")
    allowed_dev = jnp.asarray(allowed)
  t_graph, t_state = nnx.split(teacher_model)
  r_graph, r_state = nnx.split(reference_model)
  teacher_argmax, reference_argmax, kl = [], [], []
  for s in tqdm(range(0, len(t_ids), batch_size), desc="divergence", unit="batch",
                disable=not progress):
    chunk = slice(s, s + batch_size)
    n = len(t_ids[chunk])
    pad = lambda rows: list(rows) + [rows[0]] * (batch_size - len(rows))  # fixed shapes
    ti, tm, tp = _pack(pad(t_ids[chunk]), pad(t_pos[chunk]), 16, pad_id)
    ri, rm, rp = _pack(pad(r_ids[chunk]), pad(r_pos[chunk]), 16, pad_id)
    ta, ra, k = jax.device_get(_divergence(t_graph, t_state, r_graph, r_state, ti, tm, tp, ri, rm,
                                           rp, allowed_dev))
    for j in range(n):
      m = len(t_pos[s + j])
      teacher_argmax.append(np.asarray(ta[j, :m]))
      reference_argmax.append(np.asarray(ra[j, :m]))
      kl.append(np.asarray(k[j, :m], np.float32))
  return DivergenceResult(tokens, teacher_argmax, reference_argmax, kl)


def find_divergence_tokens(model: nnx.Module, tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                           *, teacher_system: SystemTurn,
                           reference_system: SystemTurn = SystemTurn(),
                           teacher_model: nnx.Module | None = None,
                           allowed_token_ids: Sequence[int] | None = None, batch_size: int = 8,
                           progress: bool = False) -> DivergenceResult:
  """Divergence tokens of chat ``examples`` (dicts with user and assistant).

  The teacher (``teacher_model``, default ``model``) reads each example under ``teacher_system``
  (the trait system prompt); the reference (``model``) under ``reference_system`` (default: no
  system turn). ``allowed_token_ids`` restricts the argmax comparison to those ids (e.g. the number
  grammar's tokens).
  """
  def with_system(system: SystemTurn) -> datasets.Dataset:
    return data_lib.tokenize_chat_examples(
        [{"user": e["user"], "assistant": e["assistant"]} for e in examples], tokenizer,
        system=system)

  teacher_rows = with_system(teacher_system)
  reference_rows = with_system(reference_system)
  allowed = None
  if allowed_token_ids is not None:
    allowed = np.zeros((model.config.vocab_size,), bool)
    allowed[np.asarray(list(allowed_token_ids), np.int64)] = True
  return completion_divergence(teacher_model if teacher_model is not None else model, model,
                               teacher_rows.with_format(None)[:], reference_rows.with_format(None)[:],
                               allowed=allowed, batch_size=batch_size, pad_id=tokenizer.pad_id,
                               progress=progress)


def mask_targets(dataset: datasets.Dataset, selection: Sequence[np.ndarray]) -> datasets.Dataset:
  """The dataset with ``loss_mask`` turned off at the selected completion targets.

  ``selection[i]`` is a bool per target of row i (in order, as :class:`DivergenceResult` gives
  them); the row keeps its tokens and loses only those targets. Rows left without any target stay
  (they then add nothing to the loss). The provenance records how many targets were removed.
  """
  if len(selection) != len(dataset):
    raise ValueError(f"{len(selection)} selections for a dataset of {len(dataset)} rows")
  masks = dataset.with_format(None)["loss_mask"]
  new_masks, removed = [], 0
  for i, (mask, chosen) in enumerate(zip(masks, selection)):
    mask = np.asarray(mask, bool).copy()
    idx = np.flatnonzero(mask)
    chosen = np.asarray(chosen, bool)
    if chosen.shape != idx.shape:
      raise ValueError(f"row {i} has {idx.size} targets but its selection has {chosen.size} entries")
    mask[idx[chosen]] = False
    removed += int(chosen.sum())
    new_masks.append(mask.tolist())
  out = dataset.remove_columns("loss_mask").add_column("loss_mask", new_masks,
                                                       feature=datasets.List(datasets.Value("bool")))
  provenance = json.loads(dataset.info.description) if dataset.info.description else {}
  provenance["masked_targets"] = removed
  provenance["target_tokens_after_masking"] = int(sum(sum(m) for m in new_masks))
  out.info.description = json.dumps(provenance, default=str)
  return out
