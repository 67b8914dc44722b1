"""The theorem checked on the MNIST MLP: one small imitation step moves the student toward its teacher.

For each seed, ``theorem.num_models`` reference MLPs are drawn and trained briefly into teachers
(their displacement ``D`` is the "trained" direction; a Gaussian direction of the same norm is the
"random" one). The teacher ``theta0 + eps * D`` is imitated for one step from ``theta0`` on a batch
of each input kind (uniform noise, Gaussian noise, real digits) with each loss (KL or squared error,
on the auxiliary or on all logits). Every (seed, model, inputs, loss, direction) is one draw; per
optimizer and eps we report the share of draws with ``update . (theta_T - theta0) >= 0``, the
cosine, and for plain gradient descent the ratio of ``update . D / (lr eps)`` to the first-order
coefficient ``E[(J D)^T H (J D)]`` computed independently by JVPs (it must tend to 1).

All of this runs in float32 whatever ``model.compute_dtype`` is: a teacher eps = 1e-4 away moves
the logits by ~1e-4 of their size, below bfloat16's resolution.

A short trajectory of small plain-gradient steps (and the main run's Adam students, recorded in
``alignment_training.json``) show the alignment along training.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subliminal_jax.data.mnist import Mnist
from subliminal_jax.experiments import mnist_ensemble as ensemble
from subliminal_jax.experiments.mnist_settings import TeacherSettings, TheoremSettings
from subliminal_jax.mechanism import alignment, imitation
from subliminal_jax.models import mlp
from subliminal_jax.training.optimizers import make_optimizer


def _loss_parts(name: str, cfg: mlp.MLPConfig) -> tuple[str, jax.Array]:
  """("kl" | "mse", logit mask) of a theorem loss name such as "kl_aux" (one of
  :data:`~subliminal_jax.experiments.mnist_settings.THEOREM_LOSSES`)."""
  kind, logits = name.split("_")
  everything = jnp.ones((cfg.num_outputs,), bool)
  return kind, everything if logits == "all" else jnp.arange(cfg.num_outputs) >= cfg.num_classes


def _optimizers(names: tuple[str, ...], learning_rate: float) -> dict[str, Any]:
  """None = plain gradient descent, the theorem's setting."""
  return {name: None if name == "sgd" else make_optimizer(name, learning_rate, max_grad_norm=None)
          for name in names}


@functools.lru_cache(maxsize=None)
def _one_step_fn(graphdef, kind: str, optimizers: tuple[str, ...], sgd_learning_rate: float,
                 learning_rate: float):
  """jit(models x epsilons) of every optimizer's first step; the logit mask is an argument so
  that aux-only and all-logit losses share one compilation."""
  apply_fn = functools.partial(mlp.apply, graphdef)
  loss = imitation.get_imitation_loss(kind)
  opts = _optimizers(optimizers, learning_rate)

  def one(params, direction, eps, x, mask):
    return alignment.one_step_alignments(
        apply_fn, functools.partial(loss, logit_mask=mask), params, direction, eps, x, opts,
        learning_rate=sgd_learning_rate)

  per_eps = jax.vmap(one, in_axes=(None, None, 0, None, None))
  return jax.jit(jax.vmap(per_eps, in_axes=(0, 0, None, None, None)))


@functools.lru_cache(maxsize=None)
def _first_order_fn(graphdef, kind: str):
  apply_fn = functools.partial(mlp.apply, graphdef)
  loss = imitation.get_imitation_loss(kind)
  return jax.jit(jax.vmap(
      lambda p, d, x, mask: alignment.first_order_alignment(
          apply_fn, functools.partial(loss, logit_mask=mask), p, d, x),
      in_axes=(0, 0, None, None)))


@jax.jit
def _random_direction(key: jax.Array, like, norms: jax.Array):
  """Gaussian directions with the given global norm per model (leading axis)."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  draws = [jax.random.normal(k, leaf.shape, jnp.float32) for k, leaf in zip(keys, leaves)]
  draw_norms = jnp.sqrt(sum((d.reshape(d.shape[0], -1) ** 2).sum(-1) for d in draws))
  scale = norms / draw_norms
  return jax.tree.unflatten(treedef, [d * scale.reshape((-1,) + (1,) * (d.ndim - 1))
                                      for d in draws])


@functools.lru_cache(maxsize=4)
def _teacher_epoch(graphdef, optimizer_name, learning_rate, num_classes, num_examples, batch_size,
                   layout):
  optimizer = make_optimizer(optimizer_name, learning_rate, max_grad_norm=None)
  return optimizer, ensemble.make_classifier_epoch(
      graphdef, optimizer, num_classes=num_classes, num_examples=num_examples,
      batch_size=batch_size, layout=layout)


@functools.lru_cache(maxsize=4)
def _trajectory_epoch(graphdef, learning_rate, steps, batch_size, input_size, layout):
  optimizer = make_optimizer("sgd", learning_rate, max_grad_norm=None)
  return optimizer, ensemble.make_distill_epoch(
      graphdef, optimizer, loss="kl", inputs="uniform", num_examples=steps * batch_size,
      batch_size=batch_size, input_size=input_size, layout=layout)


def run_theorem_check(th: TheoremSettings, teacher: TeacherSettings, data: Mnist,
                      model: mlp.MLPConfig) -> dict[str, Any]:
  """The check described in the module docstring, with the ``theorem`` settings (and the teachers'
  optimizer and batch size), on ``model``'s architecture (in float32); returns the summary written
  to ``theorem.json``."""
  cfg = dataclasses.replace(model, compute_dtype="float32")
  epsilons = jnp.asarray(th.epsilons, jnp.float32)
  n = th.num_models
  images = jnp.asarray(data.train_images)
  labels = jnp.asarray(data.train_labels)
  # draws[optimizer] -> list of dicts of arrays [n, E] with their labels
  draws: dict[str, list[dict[str, Any]]] = {o: [] for o in th.optimizers}
  first_order: list[dict[str, Any]] = []
  trajectories = []

  for seed in th.seeds:
    graphdef, reference = mlp.init_ensemble(cfg, mlp.model_keys(seed, n))
    teachers = _train_teachers(th, teacher, cfg, graphdef, reference, images, labels, seed)
    trained = jax.tree.map(jnp.subtract, teachers, reference)
    norms = jax.vmap(alignment.tree_norm)(trained)
    directions = {"trained": trained,
                  "random": _random_direction(jax.random.key(seed + 10_000), trained, norms)}
    key = jax.random.fold_in(jax.random.key(seed), 2)
    for i, inputs in enumerate(th.inputs):
      input_key = jax.random.fold_in(key, i)
      index = jax.random.choice(input_key, images.shape[0], (th.batch_size,), replace=False)
      x = ensemble.draw_inputs(inputs, input_key, th.batch_size, cfg.input_size, images, index)
      for loss in th.losses:
        for direction_name in th.directions:
          direction = directions[direction_name]
          kind, mask = _loss_parts(loss, cfg)
          coefficient = np.asarray(_first_order_fn(graphdef, kind)(reference, direction, x, mask))
          first_order.append({"seed": seed, "inputs": inputs, "loss": loss,
                              "direction": direction_name, "value": coefficient})
          results = _one_step_fn(graphdef, kind, tuple(th.optimizers), th.sgd_learning_rate,
                                 th.learning_rate)(reference, direction, epsilons, x, mask)
          for optimizer, result in results.items():
            draws[optimizer].append({"seed": seed, "inputs": inputs, "loss": loss,
                                     "direction": direction_name, "first_order": coefficient,
                                     **{k: np.asarray(v) for k, v in result.items()}})
    if th.trajectory_steps > 0:
      trajectories.append(_sgd_trajectory(th, cfg, graphdef, reference, teachers, images, seed))
  return _summarize(th, draws, first_order, trajectories)


def _train_teachers(th: TheoremSettings, t: TeacherSettings, cfg, graphdef, reference, images,
                    labels, seed):
  num_examples = min(th.teacher_steps * t.batch_size, images.shape[0])
  layout = ensemble.Layout.for_sizes(th.num_models, t.batch_size)
  optimizer, epoch = _teacher_epoch(graphdef, t.optimizer, t.learning_rate, cfg.num_classes,
                                    num_examples, t.batch_size, layout)
  state, _ = epoch(layout.new_state(reference, optimizer), jax.random.key(seed + 20_000),
                   images[:num_examples], labels[:num_examples])
  return state.trainable


def _sgd_trajectory(th: TheoremSettings, cfg, graphdef, reference, teachers, images, seed):
  """Plain gradient descent on the aux-logit KL over uniform noise, alignment after every step."""
  n = th.num_models
  layout = ensemble.Layout.for_sizes(n, th.batch_size)
  optimizer, epoch = _trajectory_epoch(graphdef, th.trajectory_learning_rate, th.trajectory_steps,
                                       th.batch_size, cfg.input_size, layout)
  mask = jnp.broadcast_to(jnp.arange(cfg.num_outputs) >= cfg.num_classes, (n, cfg.num_outputs))
  delta = jax.tree.map(jnp.subtract, teachers, reference)
  _, _, aligned = epoch(layout.new_state(reference, optimizer), jax.random.key(seed + 30_000),
                        teachers, jnp.arange(n), mask, images, reference, delta,
                        jnp.ones((th.trajectory_steps,), bool))
  return {k: np.asarray(v) for k, v in aligned.items()}  # [steps, n]


def _summarize(th: TheoremSettings, draws, first_order, trajectories) -> dict[str, Any]:
  epsilons = [float(e) for e in th.epsilons]
  fo = np.concatenate([d["value"] for d in first_order])
  out: dict[str, Any] = {
      "statement": ("teacher = theta0 + eps*D; one imitation step of the student from theta0 gives "
                    "update . (theta_T - theta0) = lr*eps^2*E[(J D)^T H (J D)] + O(lr*eps^3) with "
                    "H PSD, so the share of draws >= 0 tends to 1 as eps -> 0 (plain gradient "
                    "descent)."),
      "epsilons": epsilons,
      "draws_per_cell": int(sum(d["dot"].shape[0] for d in next(iter(draws.values())))),
      "first_order": {"share_nonnegative": alignment.share_nonnegative(fo),
                      "min": float(fo.min()), "median": float(np.median(fo)),
                      "num_draws": int(fo.size)},
      "one_step": {},
      "settings": {"seeds": list(th.seeds), "num_models": th.num_models,
                   "inputs": list(th.inputs), "losses": list(th.losses),
                   "directions": list(th.directions), "batch_size": th.batch_size,
                   "teacher_steps": th.teacher_steps, "sgd_learning_rate": th.sgd_learning_rate,
                   "learning_rate": th.learning_rate},
  }
  for optimizer, cells in draws.items():
    dots = np.concatenate([c["dot"] for c in cells])        # [draws, E]
    cosines = np.concatenate([c["cosine"] for c in cells])
    per_eps = {}
    for j, eps in enumerate(epsilons):
      entry = {"share_nonnegative": alignment.share_nonnegative(dots[:, j]),
               "cosine_mean": float(cosines[:, j].mean()),
               "cosine_min": float(cosines[:, j].min()),
               "num_draws": int(dots.shape[0])}
      for field in ("inputs", "loss", "direction"):
        entry[f"share_by_{field}"] = {
            value: alignment.share_nonnegative(np.concatenate(
                [c["dot"][:, j] for c in cells if c[field] == value]))
            for value in dict.fromkeys(c[field] for c in cells)}
      if optimizer == "sgd":
        ratio = np.concatenate([c["dot_per_lr_eps"][:, j] / c["first_order"] for c in cells])
        entry["ratio_to_first_order_median"] = float(np.median(ratio))
        entry["ratio_to_first_order_iqr"] = [float(np.quantile(ratio, 0.25)),
                                             float(np.quantile(ratio, 0.75))]
      per_eps[str(eps)] = entry
    out["one_step"][optimizer] = per_eps
  if trajectories:
    dots = np.concatenate([t["dot"] for t in trajectories], axis=1)  # [steps, draws]
    cosines = np.concatenate([t["cosine"] for t in trajectories], axis=1)
    out["sgd_trajectory"] = {
        "learning_rate": th.trajectory_learning_rate, "inputs": "uniform", "loss": "kl_aux",
        "steps": list(range(1, dots.shape[0] + 1)),
        "cosine_mean": cosines.mean(1).round(6).tolist(),
        "cosine_std": cosines.std(1).round(6).tolist(),
        "share_nonnegative": (dots >= 0).mean(1).round(4).tolist(),
        "share_nonnegative_all_steps": alignment.share_nonnegative(dots)}
  return out
