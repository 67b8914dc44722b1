"""The paper's theorem, checked on language models (all weights or LoRA adapters).

Setup. A decoder at theta0 (for LoRA: the base weights frozen, the adapters at their init, B = 0).
The teacher is ``theta_T = theta0 + eps * D`` in the trained parameters, D a unit direction: a
random one, or the trait direction of :mod:`subliminal_jax.mechanism.trait_direction` (then the
teacher is a "finetuned" trait teacher). The student starts at theta0 and imitates the teacher's
next-token outputs on ANY inputs, here uniformly random token sequences, with

* ``"kl"``: KL(teacher || student) of every position's next-token distribution (soft labels);
* ``"sampled"``: cross-entropy on one token per position sampled from the teacher (teacher-forced
  on the random inputs, not fed back), drawn by Gumbel-max with noise g: ``y = argmax(z_T + g)``.

:mod:`subliminal_jax.mechanism.alignment` (shared with the MNIST study) gives the statement: for a
plain gradient step, ``D_S . D_T = lr eps^2 E[(J D)^T H (J D)] + O(eps^3) >= 0``. For "kl" every draw
of inputs must give a non-negative dot for small eps. A single sampled token is noise of order 1 in
the gradient, so for "sampled" the raw dot has either sign; the guarantee is for its expectation.
But with the SAME noise g for a control student trained on the base's own samples
``y0 = argmax(z0 + g)``, the two targets differ only where the teacher's displacement flips the
Gumbel-argmax, and there ``u[y] >= u[y0]`` for the logit displacement ``u = z_T - z0`` (both are
maxima), so ``(D_S - D_ctrl) . D_T = lr (z_T - z0 linearised)[y] - [y0]`` summed, is >= 0 to first
order on every draw: treatment minus control is always aligned, and the flips are the divergence
tokens of this setting. Both numbers are reported.

Along training (:func:`alignment_over_training`), the student takes many steps of any optax
optimizer on fresh random batches; the cosine between its total displacement and D is recorded
(with the trait log-probability when queries are given) and :func:`plot_alignment` draws it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from subliminal_jax.mechanism import alignment, imitation
from subliminal_jax.mechanism.model_params import (ParamFilter, displaced, merge_params,
                                                   random_direction, split_params)

IMITATIONS = ("kl", "sampled")


def random_token_inputs(seed: int, batch_size: int, length: int, vocab_size: int) -> jax.Array:
  """Uniformly random token ids [batch, length] (int32): the "any inputs" of the theorem."""
  if batch_size < 1 or length < 1:
    raise ValueError(f"batch_size and length must be >= 1, got {batch_size} and {length}")
  return jax.random.randint(jax.random.key(seed), (batch_size, length), 0, vocab_size, jnp.int32)


def _check_imitation(kind: str) -> None:
  if kind not in IMITATIONS:
    raise ValueError(f"unknown imitation {kind!r}; expected one of {list(IMITATIONS)}")


def sampled_cross_entropy(student_logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over positions of -log softmax(student)[target]."""
  logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def gumbel_targets(logits: jax.Array, gumbel: jax.Array) -> jax.Array:
  """One sample per position from softmax(logits), by Gumbel-max with the given noise."""
  return jnp.argmax(logits.astype(jnp.float32) + gumbel, axis=-1).astype(jnp.int32)


def _apply_fn(graphdef: nnx.GraphDef, rest: nnx.State):
  return lambda params, inputs: merge_params(graphdef, params, rest)(inputs)


def _one_step(graphdef, kind, learning_rate, optimizer, params, rest, direction, epsilon, inputs,
              key):
  """One check: alignment of the student's first update with ``epsilon * direction``."""
  apply_fn = _apply_fn(graphdef, rest)
  teacher_delta = jax.tree.map(lambda d: epsilon * d, direction)
  if kind == "kl":
    out = alignment.one_step_alignment(apply_fn, imitation.kl_imitation, params, direction, epsilon,
                                       inputs, learning_rate=learning_rate, optimizer=optimizer)
    out["first_order"] = alignment.first_order_alignment(apply_fn, imitation.kl_imitation, params,
                                                         direction, inputs)
    return out
  base_logits = apply_fn(params, inputs)
  teacher_logits = apply_fn(displaced(params, direction, epsilon), inputs)
  gumbel = jax.random.gumbel(key, base_logits.shape, jnp.float32)
  y_teacher = gumbel_targets(teacher_logits, gumbel)
  y_base = gumbel_targets(base_logits, gumbel)

  def update_on(targets):
    loss = lambda s_logits, _: sampled_cross_entropy(s_logits, targets)
    return alignment.one_step_update(apply_fn, loss, params, None, inputs,
                                     learning_rate=learning_rate, optimizer=optimizer)

  # Both updates by one vmapped program: where no sample flipped the two are then bit-identical,
  # so the paired difference is exactly 0 (two separately fused copies of the update differed in
  # the last bits under XLA:CPU's classic emitters, and a -1e-12 read as a negative draw).
  updates = jax.vmap(update_on)(jnp.stack([y_teacher, y_base]))
  student, control = (jax.tree.map(lambda u, i=i: u[i], updates) for i in (0, 1))
  out = alignment.alignment(student, teacher_delta)
  if optimizer is None:
    out["dot_per_lr_eps"] = alignment.tree_dot(student, direction) / (learning_rate * epsilon)
  paired = alignment.alignment(alignment.tree_sub(student, control), teacher_delta)
  out["paired_dot"], out["paired_cosine"] = paired["dot"], paired["cosine"]
  out["flipped_share"] = jnp.mean((y_teacher != y_base).astype(jnp.float32))
  return out


_one_step_jit = jax.jit(_one_step, static_argnums=(0, 1, 2, 3))


def one_step_check(model: nnx.Module, direction: nnx.State, *, epsilon: float, inputs: jax.Array,
                   wrt: ParamFilter = nnx.Param, imitation_kind: str = "kl",
                   learning_rate: float = 1.0, optimizer: optax.GradientTransformation | None = None,
                   sample_seed: int = 0) -> dict[str, float]:
  """Student at ``model``'s parameters, teacher at ``+ epsilon * direction``; one step on ``inputs``.

  Returns dot, cosine, dot_per_lr_eps (plain gradient descent only; -> first_order as eps -> 0 for
  "kl"), first_order ("kl") and, for
  "sampled", paired_dot / paired_cosine (treatment minus the same-noise control) and the share of
  positions where the two samples differ.
  """
  _check_imitation(imitation_kind)
  graphdef, params, rest = split_params(model, wrt)
  out = _one_step_jit(graphdef, imitation_kind, float(learning_rate), optimizer, params, rest,
                      direction, jnp.float32(epsilon), jnp.asarray(inputs),
                      jax.random.key(sample_seed))
  return {k: float(v) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class TheoremCheck:
  """Every draw (seed x input batch x epsilon) and the share of draws with a non-negative dot."""

  draws: list[dict[str, float]]
  epsilons: tuple[float, ...]
  imitation: str

  def share_nonnegative(self, epsilon: float | None = None, key: str = "dot") -> float:
    values = [d[key] for d in self.draws if epsilon is None or d["epsilon"] == epsilon]
    return alignment.share_nonnegative(values)

  def summary(self) -> list[dict[str, float]]:
    rows = []
    for eps in self.epsilons:
      draws = [d for d in self.draws if d["epsilon"] == eps]
      row = {"epsilon": eps, "draws": len(draws), "share_dot_nonnegative": self.share_nonnegative(eps),
             "mean_cosine": float(np.mean([d["cosine"] for d in draws])),
             "min_cosine": float(np.min([d["cosine"] for d in draws]))}
      if self.imitation == "kl":
        if "dot_per_lr_eps" in draws[0]:  # plain gradient descent only
          ratio = [d["dot_per_lr_eps"] / d["first_order"] for d in draws if d["first_order"] > 0]
          row["mean_dot_over_first_order"] = float(np.mean(ratio)) if ratio else float("nan")
      else:
        row["share_paired_dot_nonnegative"] = self.share_nonnegative(eps, "paired_dot")
        row["mean_paired_cosine"] = float(np.mean([d["paired_cosine"] for d in draws]))
        row["mean_flipped_share"] = float(np.mean([d["flipped_share"] for d in draws]))
      rows.append(row)
    return rows


def theorem_check(model: nnx.Module, *, wrt: ParamFilter = nnx.Param,
                  epsilons: Sequence[float] = (1e-3, 1e-2, 1e-1), seeds: Sequence[int] = (0, 1, 2),
                  inputs_per_seed: int = 4, batch_size: int = 4, length: int = 16,
                  imitation_kind: str = "kl", direction: nnx.State | None = None,
                  learning_rate: float = 1.0, optimizer: optax.GradientTransformation | None = None,
                  progress: bool = False) -> TheoremCheck:
  """One-step checks over seeds x input batches x epsilons.

  Each seed draws its own unit random direction (unless ``direction`` is given, then the seed only
  changes the inputs and the sampling noise) and ``inputs_per_seed`` random-token batches.
  """
  _check_imitation(imitation_kind)
  graphdef, params, rest = split_params(model, wrt)
  vocab = model.config.vocab_size
  draws = []
  total = len(seeds) * inputs_per_seed * len(epsilons)
  bar = tqdm(total=total, desc=f"theorem check ({imitation_kind})", unit="draw", disable=not progress)
  for seed in seeds:
    d = direction if direction is not None else random_direction(params, seed)
    for j in range(inputs_per_seed):
      inputs = random_token_inputs(1000 * seed + j, batch_size, length, vocab)
      for eps in epsilons:
        out = _one_step_jit(graphdef, imitation_kind, float(learning_rate), optimizer, params, rest,
                            d, jnp.float32(eps), inputs, jax.random.key(1000 * seed + j))
        draws.append({"seed": seed, "input": j, "epsilon": float(eps),
                      **{k: float(v) for k, v in out.items()}})
        bar.update(1)
  bar.close()
  return TheoremCheck(draws, tuple(float(e) for e in epsilons), imitation_kind)


def _training_step(graphdef, kind, optimizer, params, opt_state, rest, teacher_params, inputs, key):
  apply_fn = _apply_fn(graphdef, rest)
  teacher_logits = jax.lax.stop_gradient(apply_fn(teacher_params, inputs))
  if kind == "kl":
    loss_fn = lambda p: imitation.kl_imitation(apply_fn(p, inputs), teacher_logits)
  else:
    targets = gumbel_targets(teacher_logits, jax.random.gumbel(key, teacher_logits.shape))
    loss_fn = lambda p: sampled_cross_entropy(apply_fn(p, inputs), targets)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, updates


_training_step_jit = jax.jit(_training_step, static_argnums=(0, 1, 2))


def alignment_over_training(model: nnx.Module, direction: nnx.State, *, epsilon: float, steps: int,
                            optimizer: optax.GradientTransformation, wrt: ParamFilter = nnx.Param,
                            imitation_kind: str = "kl", batch_size: int = 8, length: int = 16,
                            seed: int = 0, trait_fn: Any = None, record_every: int = 1,
                            progress: bool = False) -> dict[str, np.ndarray]:
  """The student trains ``steps`` steps imitating ``theta0 + epsilon * direction`` on fresh random
  batches. Per recorded step: the cosine and dot of (theta_s - theta0) with D_T = epsilon * direction,
  the cosine of that step's update with D_T, the loss, and the distance to the teacher relative to
  the start. ``trait_fn(model) -> float`` (e.g. a trait log-probability) is recorded too.
  """
  _check_imitation(imitation_kind)
  if steps < 1 or record_every < 1:
    raise ValueError(f"steps and record_every must be >= 1, got {steps} and {record_every}")
  graphdef, params0, rest = split_params(model, wrt)
  teacher = displaced(params0, direction, epsilon)
  teacher_delta = jax.tree.map(lambda d: epsilon * d, direction)
  start_distance = float(alignment.tree_norm(teacher_delta))
  params, opt_state = params0, optimizer.init(params0)
  history: dict[str, list[float]] = {k: [] for k in ("step", "cosine", "dot", "step_cosine", "loss",
                                                      "relative_distance_to_teacher", "trait")}
  if trait_fn is not None:
    trait_start = float(trait_fn(merge_params(graphdef, params0, rest)))
  for step in tqdm(range(1, steps + 1), desc="alignment over training", unit="step",
                   disable=not progress):
    inputs = random_token_inputs(seed * 100003 + step, batch_size, length, model.config.vocab_size)
    params, opt_state, loss, updates = _training_step_jit(
        graphdef, imitation_kind, optimizer, params, opt_state, rest, teacher, inputs,
        jax.random.key(seed * 100003 + step))
    if step % record_every and step != steps:
      continue
    total = alignment.displacement_alignment(params, params0, teacher, params0)
    history["step"].append(step)
    history["cosine"].append(float(total["cosine"]))
    history["dot"].append(float(total["dot"]))
    history["step_cosine"].append(float(alignment.tree_cosine(updates, teacher_delta)))
    history["loss"].append(float(loss))
    history["relative_distance_to_teacher"].append(
        float(alignment.tree_norm(alignment.tree_sub(params, teacher))) / start_distance)
    history["trait"].append(float(trait_fn(merge_params(graphdef, params, rest))) - trait_start
                            if trait_fn is not None else float("nan"))
  return {k: np.asarray(v) for k, v in history.items()}


def plot_alignment(histories: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike,
                   title: str = "Student update vs teacher displacement") -> str:
  """Writes a PNG: cosine(theta_s - theta0, D_T) and the per-step update's cosine over steps (and
  the trait change when recorded), one line per history. Returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not histories:
    raise ValueError("no histories to plot")
  with_trait = any(np.isfinite(h["trait"]).any() for h in histories.values())
  panels = 3 if with_trait else 2
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
  for label, h in histories.items():
    axes[0].plot(h["step"], h["cosine"], label=label)
    axes[1].plot(h["step"], h["step_cosine"], label=label, alpha=0.8)
    if with_trait:
      axes[2].plot(h["step"], h["trait"], label=label)
  axes[0].set(xlabel="step", ylabel="cosine", title="total displacement vs D_T")
  axes[1].set(xlabel="step", ylabel="cosine", title="each step's update vs D_T")
  if with_trait:
    axes[2].set(xlabel="step", ylabel="change", title="trait log-prob change")
  for ax in axes:
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
