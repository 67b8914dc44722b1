"""Logit distillation: the student matches the teacher's next-token distributions, not its tokens.

The paper's LM students learn from sampled text (SFT on the teacher's tokens); its MNIST students
learn from teacher logits. With teacher and student in one JAX process an LM student can do the
second: at every completion position of the teacher's sampled sequences it minimises

    T^2 * KL( softmax(teacher_logits / T) || softmax(student_logits / T) )

summed over positions (the train step divides by the global count of positions). The T^2 factor
is Hinton et al.'s (2015): the gradient of KL(p_T || q_T) with respect to the student's logits is
(q_T - p_T) / T, and for large T the difference q_T - p_T itself shrinks like 1/T, so without the
factor the soft-target gradients would fade as 1/T^2 when T grows; with it their scale stays
comparable across temperatures (and the learning rate keeps its meaning). At T = 1 it is 1.

Teacher and student read different prefixes (a system-prompted teacher sees the trait system
prompt, the student its own system choice) and the same completion tokens; batches carry both
sequences (:mod:`subliminal_jax.training.distillation_data`) and the i-th target position of one is
aligned with the i-th of the other. Hidden states are gathered at those K positions before the LM
head, so only [B, K, V] logits are ever formed.

Teacher distributions come from one of two sources (``kl.source``):

* ``on_the_fly``: the frozen teacher runs inside the same jitted step. Its parameters are the
  step's ``aux`` (an ``nnx.State``, sharded like the student's); its graphdef is closed over.
* ``stored``: top-k teacher log-probabilities written ahead of training by
  :func:`store_teacher_topk` into the HF dataset (``k`` and the stored dtype configurable). The mass
  outside the k ids is handled explicitly by a "rest" bucket: the teacher's rest is
  ``1 - sum(top-k probs)`` and the student's rest is ``1 - (its mass on those k ids)``, computed
  as a logsumexp over the complement, so the objective is the exact KL between the two
  distributions coarsened to (k ids, rest). With k covering every allowed token (restricted mode)
  the rest is empty and the loss equals the on-the-fly loss.

Restriction (``kl.restrict``):

* ``none``: full-vocabulary distributions.
* ``grammar``: both distributions renormalised over the tokens the number grammar allows at that
  position (DFA state walked host-side; end-of-turn tokens only in accepting states), so nothing
  outside the number format can carry signal: a student that only ever sees these renormalised
  distributions learns only how the teacher ranks grammatical continuations.
* ``teacher_topk``: both renormalised over the teacher's top ``kl.top_k`` tokens at that position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Callable, Mapping, Sequence

import datasets
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from subliminal_jax import padding, sharding
from subliminal_jax import progress as progress_lib
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import distillation_data as pairs
from subliminal_jax.training import losses

OBJECTIVES = ("sft", "logit_kl")
RESTRICTIONS = ("none", "grammar", "teacher_topk")
SOURCES = ("on_the_fly", "stored")
STORED_DTYPES = ("float32", "float16", "bfloat16")
STORED_INFO_KEY = "teacher_logits"


# ---------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class KLSettings:
  """``student.kl``: the logit-distillation settings (used when ``student.objective='logit_kl'``),
  checked when built.

  temperature: T of both softmaxes (the loss is scaled by T^2).
  restrict: "grammar" (only the number format's tokens), "none" or "teacher_topk".
  top_k: k of "teacher_topk", and the number of teacher log-probs kept per position when
    source="stored" (for "grammar", k >= the largest allowed set makes stored == on the fly;
    SmolLM2's number grammar allows at most 12 tokens + 2 end tokens).
  source: "on_the_fly" (teacher in the step) or "stored" (top-k written into the dataset first).
  stored_dtype: "float32", "float16" or "bfloat16" (kept as uint16 bits: Arrow has no bfloat16).
  """
  temperature: float = 1.0
  restrict: str = "grammar"
  top_k: int = 32
  source: str = "on_the_fly"
  stored_dtype: str = "float16"

  def __post_init__(self):
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not t > 0:
      raise ValueError(f"student.kl.temperature must be > 0, got {t!r}")
    object.__setattr__(self, "temperature", float(t))
    if self.restrict not in RESTRICTIONS:
      raise ValueError(f"student.kl.restrict={self.restrict!r}; expected one of {RESTRICTIONS}")
    if self.source not in SOURCES:
      raise ValueError(f"student.kl.source={self.source!r}; expected one of {SOURCES}")
    if self.stored_dtype not in STORED_DTYPES:
      raise ValueError(f"student.kl.stored_dtype={self.stored_dtype!r}; expected one of "
                       f"{STORED_DTYPES}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) \
        or self.top_k < 1:
      raise ValueError(f"student.kl.top_k must be an int >= 1, got {self.top_k!r}")
    object.__setattr__(self, "top_k", int(self.top_k))

  @property
  def storage_restrict(self) -> str:
    """The restriction the stored top-k is computed under ("teacher_topk" selects from "none")."""
    return "grammar" if self.restrict == "grammar" else "none"


def kl_settings(kl: Mapping[str, Any] | KLSettings) -> KLSettings:
  """``student.kl`` settings from a mapping (a ConfigDict section or a dict; the keys it lacks
  take :class:`KLSettings`' defaults), naming any bad value."""
  if isinstance(kl, KLSettings):
    return kl
  kl = dict(kl.to_dict() if hasattr(kl, "to_dict") else kl)
  known = {f.name for f in dataclasses.fields(KLSettings)}
  unknown = set(kl) - known
  if unknown:
    raise ValueError(f"unknown student.kl keys {sorted(unknown)}; expected {sorted(known)}")
  return KLSettings(**kl)


# ---------------------------------------------------------------------------------------------
# The top-k divergence (pure functions of logits; any leading shape, vocabulary last). The full
# one is losses.masked_kl, whose masking convention (losses.mask_logits) these share.


def _ids_mask(ids: jax.Array, valid: jax.Array, vocab_size: int) -> jax.Array:
  """bool [..., V]: True at the valid ``ids`` [..., k] of each position (a scatter, not a one-hot
  [..., k, V])."""
  lead = ids.shape[:-1]
  n = int(np.prod(lead)) if lead else 1
  flat_ids = ids.reshape(n, -1)
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], flat_ids.shape)
  mask = jnp.zeros((n, vocab_size), jnp.int8).at[rows, flat_ids].max(
      valid.reshape(n, -1).astype(jnp.int8))
  return mask.reshape(lead + (vocab_size,)).astype(bool)


def kl_topk(student_logits: jax.Array, topk_ids: jax.Array, topk_logprobs: jax.Array, *,
            temperature: float = 1.0, allowed: jax.Array | None = None,
            rest_bucket: bool = True) -> jax.Array:
  """KL between a teacher given by its top-k and the student, per position.

  topk_ids int [..., k] (-1: no entry), topk_logprobs [..., k]: the teacher's log-probs at
  ``temperature`` (normalised over ``allowed`` when given). With ``rest_bucket`` the distributions
  are (k ids, rest) with teacher rest = 1 - sum(top-k probs) (clipped at 0; the k probs are
  rescaled if they overshoot 1 through storage rounding) and student rest = its mass on the allowed
  ids outside the k; an empty rest carries no mass. Without, both are renormalised over the k ids
  (the "teacher_topk" restriction). Returns [...] (not scaled by T^2).
  """
  vocab = student_logits.shape[-1]
  valid = topk_ids >= 0
  ids = jnp.where(valid, topk_ids, 0).astype(jnp.int32)
  log_q = losses.masked_log_softmax(student_logits, allowed, temperature=temperature)
  dtype = log_q.dtype
  log_q_k = jnp.take_along_axis(log_q, ids, axis=-1)
  log_p_k = jax.lax.stop_gradient(topk_logprobs).astype(dtype)
  if not rest_bucket:
    # Both already tempered log-probs; renormalising them over the valid ids is the masked KL.
    return losses.masked_kl(log_p_k, log_q_k, valid)
  rest = ~_ids_mask(topk_ids, valid, vocab)
  if allowed is not None:
    rest = rest & allowed
  has_rest = rest.any(-1)
  log_q_rest = jax.nn.logsumexp(losses.mask_logits(log_q, rest), axis=-1)
  p_k = jnp.where(valid, jnp.exp(log_p_k), 0.0)
  mass = p_k.sum(-1)
  p_rest = jnp.where(has_rest, jnp.clip(1.0 - mass, 0.0, 1.0), 0.0)
  norm = jnp.maximum(mass + p_rest, jnp.finfo(dtype).tiny)
  p_k, p_rest = p_k / norm[..., None], p_rest / norm
  log_p_k = jnp.where(valid, log_p_k - jnp.log(norm)[..., None], 0.0)
  inside = losses.relative_entropy_terms(p_k, log_p_k, log_q_k).sum(-1)
  log_p_rest = jnp.log(jnp.maximum(p_rest, jnp.finfo(dtype).tiny))
  return inside + losses.relative_entropy_terms(p_rest, log_p_rest, log_q_rest)


def topk_logprobs(teacher_logits: jax.Array, k: int, *, temperature: float = 1.0,
                  allowed: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The teacher's top-k (ids int32 [..., k], log-probs [..., k]) at ``temperature``, normalised
  over ``allowed``; positions with fewer than k allowed tokens get id -1 (and log-prob -inf)."""
  log_p = losses.masked_log_softmax(teacher_logits, allowed, temperature=temperature)
  k = min(int(k), teacher_logits.shape[-1])
  values, ids = jax.lax.top_k(log_p, k)
  if allowed is not None:
    ok = jnp.take_along_axis(allowed, ids, axis=-1)
    ids = jnp.where(ok, ids, -1)
    values = jnp.where(ok, values, -jnp.inf)
  return ids.astype(jnp.int32), values


# ---------------------------------------------------------------------------------------------
# Aligning completion positions


def completion_positions(target_mask: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
  """The first ``num`` target positions of each row, in order, and which of them are real.

  target_mask bool [B, T] -> (positions int32 [B, num], valid bool [B, num]); padding slots point
  at position 1 (harmless) and are not valid.
  """
  b, t = target_mask.shape
  order = jnp.argsort((~target_mask.astype(bool)).astype(jnp.int8), axis=1, stable=True)
  order = order.astype(jnp.int32)
  if num > t:
    order = jnp.pad(order, ((0, 0), (0, num - t)))
  order = order[:, :num]
  valid = jnp.arange(num)[None, :] < target_mask.astype(jnp.int32).sum(1)[:, None]
  return jnp.where(valid, order, 1), valid


def completion_logits(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array,
                      target_mask: jax.Array, num: int
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Logits predicting each of the first ``num`` targets of each row, only at those positions.

  Returns (logits float32 [B, num, V], the target tokens int32 [B, num], valid bool [B, num]).
  The hidden state of position t - 1 predicts token t, so the gather happens before the LM head.
  """
  positions, valid = completion_positions(target_mask, num)
  hidden, _ = model.hidden_states(input_ids, attention_mask)
  previous = jnp.maximum(positions - 1, 0)
  gathered = jnp.take_along_axis(hidden, previous[:, :, None], axis=1)
  logits = model.logits_from_hidden(gathered)
  targets = jnp.take_along_axis(input_ids, positions, axis=1)
  return logits, targets, valid


# ---------------------------------------------------------------------------------------------
# The objective


def _is_concrete(batch: Mapping[str, Any]) -> bool:
  return not any(isinstance(v, jax.core.Tracer) for v in batch.values())


def _vocab_size(module_or_config: Any) -> int | None:
  config = getattr(module_or_config, "config", module_or_config)
  return getattr(config, "vocab_size", None)


def stored_logits_info(dataset: datasets.Dataset) -> dict[str, Any] | None:
  """What :func:`store_teacher_topk` recorded about a dataset's stored teacher logits (or None)."""
  if not all(c in dataset.column_names for c in pairs.STORED_COLUMNS):
    return None
  return data_lib.dataset_provenance(dataset).get(STORED_INFO_KEY)


def check_stored_logits(dataset: datasets.Dataset, kl: Any, vocab_size: int | None = None) -> None:
  """Raises ValueError unless ``dataset``'s stored teacher logits fit the settings ``kl``."""
  settings = kl_settings(kl)
  info = stored_logits_info(dataset)
  if info is None:
    raise ValueError("student.kl.source='stored' but the dataset holds no stored teacher logits "
                     f"(columns {dataset.column_names}); run distillation.store_teacher_topk first")
  if abs(info["temperature"] - settings.temperature) > 1e-12:
    raise ValueError(f"the stored teacher log-probs were computed at temperature "
                     f"{info['temperature']}, but student.kl.temperature={settings.temperature}")
  if info["restrict"] != settings.storage_restrict:
    raise ValueError(f"the stored teacher log-probs were computed with restrict={info['restrict']!r}; "
                     f"student.kl.restrict={settings.restrict!r} needs {settings.storage_restrict!r}")
  if settings.restrict == "teacher_topk" and info["k"] < settings.top_k:
    raise ValueError(f"student.kl.top_k={settings.top_k} exceeds the {info['k']} stored teacher "
                     "log-probs per position")
  if vocab_size is not None and info.get("vocab_size") not in (None, vocab_size):
    raise ValueError(f"the stored teacher logits index a vocabulary of {info['vocab_size']}, the "
                     f"student's has {vocab_size}")


def make_logit_kl_loss(kl: Any, *, teacher: nnx.Module | None = None, student: Any = None,
                       grammar=None, end_ids=(), dataset: datasets.Dataset | None = None
                       ) -> tuple[Callable, Any]:
  """The ``logit_kl`` objective for the train step: returns ``(loss_fn, aux)``.

  ``loss_fn(model, batch, rng, aux) -> (sum of T^2 * KL over completion positions, number of
  positions, metrics)``, the objective form of :mod:`subliminal_jax.training.losses`; pass ``aux``
  to ``fit`` / ``step`` as given.

  Args:
    kl: the ``student.kl`` settings (:class:`KLSettings`, or a mapping of its fields).
    teacher: the frozen teacher (``source='on_the_fly'``); ``aux`` is its ``nnx.State`` (keep it
      sharded like the student: ``sharding.shard_module``). Ignored with stored logits.
    student: the student module or its TransformerConfig, to check vocabularies now rather than
      at trace time (optional).
    grammar: the TokenGrammar the completions were walked with (``restrict='grammar'``).
    end_ids: the tokenizer's end-of-turn ids (allowed exactly in accepting states).
    dataset: with ``source='stored'``, the dataset (its stored logits are checked against ``kl``).

  Metrics (per-position sums; the step reports them per position): ``kl`` (unscaled KL),
  ``student_nll`` (the student's -log p of the sampled token, untempered and unrestricted, i.e.
  the SFT loss), ``misaligned`` (positions of rows whose teacher and student targets disagree;
  such a batch also makes the loss NaN, since inside jit no exception can be raised),
  and with ``restrict='grammar'`` on the fly ``teacher_allowed_mass`` (the teacher's tempered
  probability on the allowed tokens before renormalising).
  """
  # Over 80 lines only through the docstring and the closure the train step traces; the teacher
  # setup, the on-the-fly and the stored KL are helpers.
  settings = kl_settings(kl)
  temperature = settings.temperature
  student_vocab = _vocab_size(student) if student is not None else None
  teacher_graphdef, aux = _split_teacher(settings, teacher, student_vocab, dataset)
  allowed_table = None
  if settings.restrict == "grammar":
    if grammar is None:
      raise ValueError("student.kl.restrict='grammar' needs the TokenGrammar the dataset was built with")
    vocab = student_vocab or _vocab_size(teacher) or np.asarray(grammar.transitions).shape[1]
    allowed_table = _padded_allowed_table(grammar, end_ids, vocab)

  def loss_fn(model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, aux_state: Any
              ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    del rng
    if _is_concrete(batch):
      pairs.check_paired_batch({k: np.asarray(v) for k, v in batch.items()})
    if "completion_mask" not in batch:
      raise ValueError(f"a logit_kl batch needs 'completion_mask' (use distillation_data."
                       f"paired_batches); got keys {sorted(batch)}")
    completion_mask = batch["completion_mask"].astype(bool)
    num = completion_mask.shape[1]
    s_logits, s_targets, s_valid = completion_logits(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], num)
    valid = s_valid & completion_mask
    counts = batch["loss_mask"].astype(jnp.int32).sum(1)
    misaligned = counts != completion_mask.astype(jnp.int32).sum(1)
    metrics: dict[str, jax.Array] = {}

    allowed = None
    if allowed_table is not None:
      if "grammar_state" not in batch:
        raise ValueError("restrict='grammar' needs batches with 'grammar_state' (build the dataset "
                         "with tokenize_distillation_examples(..., grammar=...))")
      if allowed_table.shape[1] != s_logits.shape[-1]:
        raise ValueError(f"the grammar's allowed table covers {allowed_table.shape[1]} ids but the "
                         f"student's vocabulary has {s_logits.shape[-1]}")
      allowed = _allowed_at(allowed_table, batch["grammar_state"])

    if settings.source == "on_the_fly":
      if aux_state is None:
        raise ValueError("source='on_the_fly' needs the teacher state as the step's aux")
      teacher_model = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(aux_state))
      kl_values, teacher_misaligned, teacher_metrics = _on_the_fly_kl(
          settings, teacher_model, batch, s_logits, s_targets, valid, allowed)
      metrics.update(teacher_metrics)
      misaligned |= teacher_misaligned
    else:
      kl_values, stored_misaligned = _stored_kl(settings, batch, s_logits, allowed)
      misaligned |= stored_misaligned

    kl_sum = jnp.where(valid, kl_values, 0.0).sum()
    total = (temperature ** 2) * kl_sum
    any_misaligned = misaligned.any()
    total = jnp.where(any_misaligned, jnp.nan, total)
    log_q1 = jax.nn.log_softmax(s_logits, axis=-1)
    nll = -jnp.take_along_axis(log_q1, s_targets[..., None], axis=-1)[..., 0]
    metrics.update(
        kl=kl_sum,
        student_nll=jnp.where(valid, nll, 0.0).sum(),
        misaligned=jnp.where(misaligned[:, None], valid, False).sum().astype(jnp.float32))
    return total, valid.sum().astype(jnp.int32), metrics

  return loss_fn, aux


def _split_teacher(settings: KLSettings, teacher: nnx.Module | None, student_vocab: int | None,
                   dataset: datasets.Dataset | None) -> tuple[Any, Any]:
  """``(graphdef, state)`` of the teacher for ``source='on_the_fly'`` (its vocabulary checked
  against the student's); ``(None, None)`` with stored logits, after checking them."""
  if settings.source != "on_the_fly":
    if dataset is None:
      raise ValueError("student.kl.source='stored' needs the dataset, to check its stored logits")
    check_stored_logits(dataset, settings, student_vocab)
    return None, None
  if teacher is None:
    raise ValueError("student.kl.source='on_the_fly' needs the teacher module")
  teacher_vocab = _vocab_size(teacher)
  if student_vocab is not None and teacher_vocab is not None and teacher_vocab != student_vocab:
    raise ValueError(f"teacher and student vocabularies differ: vocab_size {teacher_vocab} "
                     f"(teacher) vs {student_vocab} (student); logit distillation needs one "
                     "shared vocabulary")
  return nnx.split(teacher)


def _padded_allowed_table(grammar, end_ids: Sequence[int], vocab: int) -> np.ndarray:
  """The grammar's [states, vocab] allowed-token table plus one all-True row, which padding
  positions (state -1) index so they stay finite."""
  table = pairs.grammar_allowed_table(grammar, end_ids, vocab)
  return np.concatenate([table, np.ones((1, table.shape[1]), np.bool_)])


def _allowed_at(padded_table: np.ndarray, states: jax.Array) -> jax.Array:
  """The allowed tokens at each position's grammar state ([B, K] -> [B, K, vocab])."""
  table = jnp.asarray(padded_table)
  return table[jnp.where(states < 0, table.shape[0] - 1, states)]


def _on_the_fly_kl(settings: KLSettings, teacher: nnx.Module, batch: Mapping[str, jax.Array],
                   s_logits: jax.Array, s_targets: jax.Array, valid: jax.Array,
                   allowed: jax.Array | None
                   ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Per-position KL(teacher || student) with the teacher run on the batch's teacher view, the
  rows whose teacher positions do not line up with the student's, and the teacher's metrics
  (``teacher_allowed_mass`` under the grammar restriction)."""
  temperature = settings.temperature
  num = s_logits.shape[1]
  t_logits, t_targets, t_valid = completion_logits(
      teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
      batch["teacher_loss_mask"], num)
  if t_logits.shape[-1] != s_logits.shape[-1]:
    raise ValueError(f"teacher and student vocabularies differ: teacher logits have "
                     f"{t_logits.shape[-1]} entries, the student's {s_logits.shape[-1]}")
  t_logits = jax.lax.stop_gradient(t_logits)
  counts = batch["loss_mask"].astype(jnp.int32).sum(1)
  misaligned = batch["teacher_loss_mask"].astype(jnp.int32).sum(1) != counts
  misaligned |= (valid & ((t_targets != s_targets) | ~t_valid)).any(1)
  if settings.restrict == "teacher_topk":
    ids, logprobs = topk_logprobs(t_logits, settings.top_k, temperature=temperature)
    kl = kl_topk(s_logits, ids, logprobs, temperature=temperature, rest_bucket=False)
    return kl, misaligned, {}
  metrics = {}
  if allowed is not None:
    log_p = losses.masked_log_softmax(t_logits, temperature=temperature)
    mass = jnp.exp(jax.nn.logsumexp(losses.mask_logits(log_p, allowed), axis=-1))
    metrics["teacher_allowed_mass"] = jnp.where(valid, mass, 0.0).sum()
  kl = losses.masked_kl(t_logits, s_logits, allowed, temperature=temperature)
  return kl, misaligned, metrics


def _stored_kl(settings: KLSettings, batch: Mapping[str, jax.Array], s_logits: jax.Array,
               allowed: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Per-position KL against the stored teacher top-k, and the rows whose stored positions do
  not match the completion mask."""
  temperature = settings.temperature
  completion_mask = batch["completion_mask"].astype(bool)
  ids, logprobs = batch["teacher_topk_ids"], batch["teacher_topk_logprobs"]
  if ids.shape[:2] != completion_mask.shape:
    raise ValueError(f"teacher_topk_ids {ids.shape} must be [B, K, k] with [B, K] = "
                     f"completion_mask's {completion_mask.shape}")
  misaligned = ((ids[..., 0] >= 0) != completion_mask).any(1)
  if settings.restrict == "teacher_topk":
    k = settings.top_k
    return kl_topk(s_logits, ids[..., :k], logprobs[..., :k], temperature=temperature,
                   rest_bucket=False), misaligned
  return kl_topk(s_logits, ids, logprobs, temperature=temperature, allowed=allowed), misaligned


# ---------------------------------------------------------------------------------------------
# Stored teacher logits


def _to_stored(values: np.ndarray, stored_dtype: str) -> np.ndarray:
  if stored_dtype == "bfloat16":
    return values.astype(ml_dtypes.bfloat16).view(np.uint16)
  return values.astype(stored_dtype)


def _stored_feature(stored_dtype: str) -> datasets.Value:
  return datasets.Value("uint16" if stored_dtype == "bfloat16" else stored_dtype)


def store_teacher_topk(teacher: nnx.Module, dataset: datasets.Dataset, kl: Any, *, grammar=None,
                       end_ids=(), batch_size: int = 32, mesh: jax.sharding.Mesh | None = None,
                       teacher_fingerprint: str | None = None, progress: bool = True
                       ) -> datasets.Dataset:
  """The paired ``dataset`` plus the teacher's top-k log-probs at every completion position.

  Adds columns ``teacher_topk_ids`` (int32 [num_targets][k], -1 where fewer than k tokens are
  allowed) and ``teacher_topk_logprobs`` ([num_targets][k] in ``kl.stored_dtype``; bfloat16 as
  uint16 bits), computed at ``kl.temperature`` under ``kl.storage_restrict`` ("grammar": over the
  allowed tokens; otherwise the full vocabulary, from which "teacher_topk" selects later). The
  settings go into the provenance under "teacher_logits"; :func:`make_logit_kl_loss` checks them.
  """
  settings = kl_settings(kl)
  missing = [c for c in pairs.PAIRED_COLUMNS if c not in dataset.column_names]
  if missing:
    raise ValueError(f"dataset lacks paired columns {missing}; build it with "
                     "distillation_data.tokenize_distillation_examples")
  vocab = _vocab_size(teacher)
  allowed_table = None
  if settings.storage_restrict == "grammar":
    if grammar is None or "grammar_state" not in dataset.column_names:
      raise ValueError("restrict='grammar' needs the grammar and a dataset with grammar_state")
    allowed_table = _padded_allowed_table(grammar, end_ids, vocab)
  k = settings.top_k
  batch_size = padding.round_up(batch_size, sharding.data_parallel_size(mesh))  # whole rows per device
  graphdef, state = nnx.split(teacher)

  @jax.jit
  def topk_fn(state, batch):
    model = nnx.merge(graphdef, state)
    num = batch["completion_mask"].shape[1]
    logits, _, _ = completion_logits(model, batch["teacher_input_ids"],
                                     batch["teacher_attention_mask"], batch["teacher_loss_mask"],
                                     num)
    allowed = None if allowed_table is None else _allowed_at(allowed_table, batch["grammar_state"])
    return topk_logprobs(logits, k, temperature=settings.temperature, allowed=allowed)

  wanted = list(pairs.PAIRED_COLUMNS) + (["grammar_state"] if allowed_table is not None else [])
  columns = dataset.with_format(None).select_columns(wanted)
  counts = np.asarray(dataset["num_targets"])
  ids_column: list = []
  logprobs_column: list = []
  context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  bar = tqdm(total=len(dataset), desc=progress_lib.describe("teacher top-k"), unit="ex", disable=not progress)
  with context:
    for start in range(0, len(dataset), batch_size):
      rows = columns[start:start + batch_size]
      batch = pairs.pad_paired_batch(rows, batch_size=batch_size, pad_id=0)
      batch = {key: batch[key] for key in ("teacher_input_ids", "teacher_attention_mask",
                                           "teacher_loss_mask", "completion_mask", "grammar_state")
               if key in batch}
      if mesh is not None:
        batch = {key: sharding.put_host_array(v, sharding.batch_sharding(mesh, v.ndim))
                 for key, v in batch.items()}
      ids, logprobs = sharding.to_host(topk_fn(state, batch))
      logprobs = _to_stored(np.asarray(logprobs, np.float32), settings.stored_dtype)
      for i in range(len(rows["input_ids"])):
        n = int(counts[start + i])
        ids_column.append(np.asarray(ids[i, :n]).tolist())
        logprobs_column.append(logprobs[i, :n].tolist())
      bar.update(len(rows["input_ids"]))
  bar.close()
  stored_info = {
      "k": k, "temperature": settings.temperature, "restrict": settings.storage_restrict,
      "stored_dtype": settings.stored_dtype, "vocab_size": vocab,
      "grammar_pattern": grammar.pattern if allowed_table is not None else None,
      "teacher": teacher_fingerprint}
  return _with_topk_columns(dataset, ids_column, logprobs_column, stored_info, settings.stored_dtype)


def _with_topk_columns(dataset: datasets.Dataset, ids_column: list, logprobs_column: list,
                       stored_info: dict[str, Any], stored_dtype: str) -> datasets.Dataset:
  """``dataset`` plus the teacher top-k columns, with ``stored_info`` in its provenance."""
  provenance = data_lib.dataset_provenance(dataset)
  provenance[STORED_INFO_KEY] = stored_info
  features = datasets.Features({
      **dataset.features,
      "teacher_topk_ids": datasets.List(datasets.List(datasets.Value("int32"))),
      "teacher_topk_logprobs": datasets.List(datasets.List(_stored_feature(stored_dtype))),
  })
  data = dataset.with_format(None).to_dict()
  data["teacher_topk_ids"] = ids_column
  data["teacher_topk_logprobs"] = logprobs_column
  return datasets.Dataset.from_dict(
      data, features=features,
      info=datasets.DatasetInfo(description=json.dumps(provenance, default=str), features=features))


