"""Which distillation examples, and which tokens, move the student along the trait direction?

A student's SGD step on a batch is ``delta = -lr * grad (sum_t l_t) / N`` (``l_t`` the loss of
target token t, ``N`` the batch's target count, as the train step normalises). Along a direction
``d`` (the trait direction ``grad T`` of :mod:`subliminal_jax.mechanism.trait_direction`), the
first-order change of the trait is

  grad T . delta = sum_t c_t,    c_t = -lr / N * (grad l_t . d),

so ``c_t`` is token t's contribution to the trait's movement (positive: it pushes toward the
trait) and an example's contribution is the sum of its tokens'. All ``grad l_t . d`` of a batch
come from ONE forward-mode pass: ``jax.jvp`` of the per-token loss vector along ``d``, since
``d/d eps l_t(theta + eps d) = grad l_t . d``. No per-example or per-token gradient is ever stored,
so a pass costs about three forward passes whatever the number of tokens.

(The first-order account is exact for plain gradient descent; Adam rescales coordinates, so there
the sum is the movement along ``d`` of the SGD-equivalent step, a diagnostic rather than a
prediction.)
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from subliminal_jax.mechanism.model_params import ParamFilter, merge_params, split_params
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import losses

PerTokenLoss = Callable[[nnx.Module, Mapping[str, jax.Array]], jax.Array]


def per_token_cross_entropy(model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
  """``-log p(token t | tokens < t)`` at index t for every target (``loss_mask`` convention), 0
  elsewhere: float32 [B, T], aligned with ``input_ids``."""
  logits = model(batch["input_ids"], batch["attention_mask"])
  targets, target_mask = losses.shifted_targets(batch["input_ids"], batch["loss_mask"],
                                                batch["attention_mask"])
  logits = logits.astype(jnp.float32)
  nll = (jax.nn.logsumexp(logits, axis=-1)
         - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0])
  shifted = jnp.where(target_mask, nll, 0.0)  # position t - 1 holds the loss of token t
  return jnp.concatenate([jnp.zeros_like(shifted[:, :1]), shifted[:, :-1]], axis=1)


def target_mask(batch: Mapping[str, Any]) -> np.ndarray:
  """The targets that count: ``loss_mask & attention_mask``, never position 0."""
  mask = np.asarray(batch["loss_mask"], bool) & np.asarray(batch["attention_mask"], bool)
  mask = mask.copy()
  mask[:, 0] = False
  return mask


@functools.partial(jax.jit, static_argnums=(0, 4))
def _loss_and_tangent(graphdef, params, rest, direction, per_token_loss, batch):
  def losses_of(p):
    return per_token_loss(merge_params(graphdef, p, rest), batch)
  return jax.jvp(losses_of, (params,), (direction,))


def token_directional_derivatives(model: nnx.Module, batch: Mapping[str, Any], direction: nnx.State,
                                  *, wrt: ParamFilter = nnx.Param,
                                  per_token_loss: PerTokenLoss = per_token_cross_entropy
                                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(l_t, grad l_t . direction)``, each float32 [B, T], 0 at non-targets, by one JVP.

  ``direction`` is shaped like the ``wrt`` parameters (e.g. ``TraitDirection.gradient``).
  """
  graphdef, params, rest = split_params(model, wrt)
  _check_direction(params, direction)
  device_batch = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
  loss, tangent = _loss_and_tangent(graphdef, params, rest, direction, per_token_loss, device_batch)
  mask = target_mask(batch)
  return (np.where(mask, np.asarray(loss), 0.0).astype(np.float32),
          np.where(mask, np.asarray(tangent), 0.0).astype(np.float32))


def _check_direction(params: nnx.State, direction: nnx.State) -> None:
  want, got = jax.tree.structure(params), jax.tree.structure(direction)
  if want != got:
    raise ValueError("the direction is not shaped like the selected parameters (did you pick the "
                     f"same wrt filter?):\n  parameters: {want}\n  direction:  {got}")
  for p, d in zip(jax.tree.leaves(params), jax.tree.leaves(direction)):
    if p.shape != d.shape:
      raise ValueError(f"direction leaf of shape {d.shape} for a parameter of shape {p.shape}")


@dataclasses.dataclass(frozen=True)
class Attribution:
  """Per-example token attributions, in dataset order.

  tokens[i]: the target token ids of example i (its loss_mask positions); loss[i]: their losses;
  derivative[i]: ``grad l_t . d`` of each; contribution[i]: ``-lr / N * derivative`` (N = the
  targets of the batch the example was in, as the train step normalises).
  """

  tokens: list[np.ndarray]
  loss: list[np.ndarray]
  derivative: list[np.ndarray]
  contribution: list[np.ndarray]
  learning_rate: float

  @property
  def example_contribution(self) -> np.ndarray:
    return np.array([c.sum() for c in self.contribution], np.float64)

  @property
  def total(self) -> float:
    """First-order trait change of one SGD pass over the data (one step per batch, all steps at
    the initial parameters: the sum of the per-batch predictions)."""
    return float(self.example_contribution.sum())

  def by_token_id(self, token_texts: Sequence[str] | None = None, top: int = 20
                  ) -> list[dict[str, Any]]:
    """Token ids ranked by their summed contribution: id, text, count, sum, mean, share of total."""
    sums: dict[int, float] = defaultdict(float)
    counts: dict[int, int] = defaultdict(int)
    for toks, contrib in zip(self.tokens, self.contribution):
      for t, c in zip(toks.tolist(), contrib.tolist()):
        sums[t] += c
        counts[t] += 1
    total = sum(sums.values())
    ranked = sorted(sums, key=lambda t: -sums[t])[:top]
    return [{"id": t, "text": token_texts[t] if token_texts is not None else None,
             "count": counts[t], "sum": sums[t], "mean": sums[t] / counts[t],
             "share": sums[t] / total if total else float("nan")} for t in ranked]

  def by_position(self) -> np.ndarray:
    """Mean contribution by position within the completion [max length] (NaN where none)."""
    width = max(len(c) for c in self.contribution)
    total, count = np.zeros(width), np.zeros(width)
    for c in self.contribution:
      total[:len(c)] += c
      count[:len(c)] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)

  def share_of(self, selected: Sequence[np.ndarray]) -> float:
    """The fraction of the total contribution carried by the selected targets (bool per target,
    per example; e.g. the divergence tokens of :mod:`subliminal_jax.mechanism.divergence_tokens`)."""
    if len(selected) != len(self.contribution):
      raise ValueError(f"{len(selected)} masks for {len(self.contribution)} examples")
    part = sum(float(c[np.asarray(s, bool)].sum()) for c, s in zip(self.contribution, selected))
    return part / self.total if self.total else float("nan")


def attribute_batches(model: nnx.Module, batches: Iterable[Mapping[str, Any]], direction: nnx.State,
                      *, learning_rate: float, wrt: ParamFilter = nnx.Param,
                      per_token_loss: PerTokenLoss = per_token_cross_entropy,
                      progress: bool = False, total: int | None = None) -> Attribution:
  """Token and example contributions over batches (each row with at least one target is an
  example; empty padding rows are skipped)."""
  tokens, loss_out, deriv_out, contrib_out = [], [], [], []
  for batch in tqdm(batches, desc="token attribution", unit="batch", disable=not progress,
                    total=total):
    loss, derivative = token_directional_derivatives(model, batch, direction, wrt=wrt,
                                                     per_token_loss=per_token_loss)
    mask = target_mask(batch)
    count = mask.sum()
    ids = np.asarray(batch["input_ids"])
    for row in range(ids.shape[0]):
      if not mask[row].any():
        continue
      tokens.append(ids[row][mask[row]])
      loss_out.append(loss[row][mask[row]])
      deriv_out.append(derivative[row][mask[row]])
      contrib_out.append(-learning_rate * derivative[row][mask[row]].astype(np.float64) / count)
  if not tokens:
    raise ValueError("no targets in the batches: nothing to attribute")
  return Attribution(tokens, loss_out, deriv_out, contrib_out, float(learning_rate))


def dataset_batches(dataset: Any, *, batch_size: int, pad_id: int, length_multiple: int = 16
                    ) -> Iterable[dict[str, np.ndarray]]:
  """The dataset's rows in order (no shuffle, so attributions line up with the rows), padded as
  the trainer pads them (``training.data.pad_batch``)."""
  columns = dataset.with_format(None).select_columns(["input_ids", "loss_mask"])
  for start in range(0, len(dataset), batch_size):
    rows = columns[start:start + batch_size]
    yield data_lib.pad_batch(rows["input_ids"], rows["loss_mask"], batch_size=batch_size,
                             pad_id=pad_id, length_multiple=length_multiple)
