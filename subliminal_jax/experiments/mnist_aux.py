"""Subliminal learning on MNIST through auxiliary logits (Cloud et al., section 5), and its ablations.

  python -m subliminal_jax.main --config=configs/mnist_aux.py --workdir=workdir/mnist
  python -m subliminal_jax.main --config=configs/mnist_sweep.py:width --workdir=workdir/sweep_width

Per seed, N reference MLPs (784-256-256-(10+m)) are initialised. Teachers start from them and learn
MNIST with cross-entropy on the 10 class logits; the m auxiliary logits are never trained. Students
learn only to imitate their teacher's auxiliary logits (or all logits) on noise images: they never
see a digit or a label, yet, sharing the teacher's init, they classify digits far above chance. A
cross-init student (starting from another reference model, a derangement) learns nothing useful.

Rows (``results.json``, accuracies as fractions of the 10k test set, mean and std over all models
of all seeds): reference, teacher, student_same_init_aux, student_same_init_all,
student_cross_init_aux, student_cross_init_all. Along training, every student's displacement is
compared with its teacher's (``alignment_training.json``); the ``theorem`` stage checks the
first-order statement after one small step (``theorem.json``, see
:mod:`subliminal_jax.experiments.mnist_theorem`). ``report.md`` and PNG plots summarise them.

Stages: ``train`` (the rows), ``theorem`` (the one-step check), ``report`` (from the JSON files
already in the workdir). A config with ``sweep.points`` runs one training per point, each in
``WORKDIR/points/<label>/``, and writes one table (``sweep.md``, ``sweep.json``) and one plot.
:func:`run` reads the config once (:mod:`subliminal_jax.experiments.mnist_settings`, every point of
a sweep included); the functions below it take those typed settings.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict
from tqdm import tqdm

from subliminal_jax import artifacts, files, jsonable
from subliminal_jax.data.mnist import Mnist, load_mnist
from subliminal_jax.experiments import mnist_ensemble as ensemble
from subliminal_jax.experiments import mnist_report, mnist_settings, mnist_theorem
from subliminal_jax.experiments.mnist_settings import (STUDENT_VARIANTS, MnistSettings,
                                                       StudentVariant, SweepPoint)
from subliminal_jax.models import mlp
from subliminal_jax.training import data as data_lib
from subliminal_jax.training.optimizers import make_optimizer

STAGES = ("train", "theorem", "report")
ROWS = ("reference", "teacher") + tuple(f"student_{v}" for v in STUDENT_VARIANTS)


def optimizer_for(key: tuple[str, float, float, float]):
  """The optimizer of a section's ``optimizer_key`` (no clipping unless asked: the paper has
  none)."""
  name, learning_rate, momentum, max_grad_norm = key
  return make_optimizer(name, learning_rate, max_grad_norm=max_grad_norm or None,
                        momentum=momentum)


# Epoch programs are built once per shape and recipe, so later seeds reuse the compilation.
@functools.lru_cache(maxsize=8)
def _classifier_epoch(graphdef, opt_key, num_classes, num_examples, batch_size, layout):
  return ensemble.make_classifier_epoch(graphdef, optimizer_for(opt_key), num_classes=num_classes,
                                        num_examples=num_examples, batch_size=batch_size,
                                        layout=layout)


@functools.lru_cache(maxsize=8)
def _distill_epoch(graphdef, opt_key, loss, inputs, num_examples, batch_size, input_size, layout):
  return ensemble.make_distill_epoch(graphdef, optimizer_for(opt_key), loss=loss, inputs=inputs,
                                     num_examples=num_examples, batch_size=batch_size,
                                     input_size=input_size, layout=layout)


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
  """A uniformly random permutation of 0..n-1 with no fixed point (rejection sampling)."""
  if n < 2:
    raise ValueError(f"a cross-init student needs another model's init: num_models must be >= 2, "
                     f"got {n}")
  while True:
    perm = rng.permutation(n)
    if not np.any(perm == np.arange(n)):
      return perm


def _record_mask(epoch: int, steps: int, every: int, first: int) -> np.ndarray:
  """Which steps of this epoch record alignment (global step counted from 1 after the update)."""
  global_steps = epoch * steps + np.arange(1, steps + 1)
  return (global_steps <= first) | (global_steps % every == 0) | (
      np.arange(steps) == steps - 1)


class TeacherCache:
  """Trained teachers kept in memory across the points of a sweep that share their recipe."""

  def __init__(self):
    self._entries: dict[str, Any] = {}

  @staticmethod
  def key(settings: MnistSettings, seed: int) -> str:
    """What the teachers of ``seed`` depend on (the sections as the ConfigDict gave them)."""
    return json.dumps({"model": settings.model.record(), "teacher": settings.teacher.record(),
                       "n": settings.num_models, "seed": seed, "data": settings.data_dir},
                      sort_keys=True, default=list)

  def get(self, key: str):
    return self._entries.get(key)

  def put(self, key: str, value) -> None:
    self._entries.clear()  # one recipe at a time: a sweep changes either teachers or students
    self._entries[key] = value


def train_seed(settings: MnistSettings, data: Mnist, seed: int, *,
               teacher_cache: TeacherCache | None = None) -> dict[str, Any]:
  """One seed: references, teachers, all student variants. Returns accuracies per row [N] and the
  alignment history of the students."""
  cfg = settings.model.mlp_config()
  n = settings.num_models
  variants = settings.student.student_variants
  timings: dict[str, float] = {}
  start = time.time()

  graphdef, reference = mlp.init_ensemble(cfg, mlp.model_keys(seed, n))
  accuracy = functools.partial(ensemble.accuracy, graphdef, images=data.test_images,
                               labels=data.test_labels, num_classes=cfg.num_classes)
  accuracies = {"reference": accuracy(reference)}
  images = jnp.asarray(data.train_images)
  labels = jnp.asarray(data.train_labels)
  teacher_key, student_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1))

  cache_key = TeacherCache.key(settings, seed)
  cached = teacher_cache.get(cache_key) if teacher_cache else None
  if cached is not None:
    teachers, teacher_losses = cached
    logging.info("seed %d: teachers reused from an earlier sweep point", seed)
  else:
    teachers, teacher_losses = _train_teachers(settings, graphdef, reference, images, labels,
                                               teacher_key, seed)
    if teacher_cache is not None:
      teacher_cache.put(cache_key, (teachers, teacher_losses))
  accuracies["teacher"] = accuracy(teachers)
  timings["teachers"] = time.time() - start

  start = time.time()
  history: dict[str, Any] = {"steps": [], "dot": [], "cosine": [], "loss": []}
  if variants:
    students, history = _train_students(settings, graphdef, reference, teachers, images,
                                        student_key, seed, variants)
    student_accuracy = accuracy(students)
    for i, variant in enumerate(variants):
      accuracies[f"student_{variant.name}"] = student_accuracy[i * n:(i + 1) * n]
  timings["students"] = time.time() - start
  return {"accuracies": accuracies, "history": history, "variants": [v.name for v in variants],
          "teacher_losses": teacher_losses, "timings": timings}


def _train_teachers(settings: MnistSettings, graphdef, reference, images, labels, key: jax.Array,
                    seed: int) -> tuple[Any, np.ndarray]:
  """N teachers from the reference inits: ``(parameters, mean loss per step [steps])``."""
  t, n = settings.teacher, settings.num_models
  layout = ensemble.Layout.for_sizes(n, t.batch_size)
  state = layout.new_state(reference, optimizer_for(t.optimizer_key))
  epoch_fn = _classifier_epoch(graphdef, t.optimizer_key, settings.model.mlp_config().num_classes,
                               images.shape[0], t.batch_size, layout)
  teacher_losses = []
  bar = tqdm(range(t.epochs), desc=f"seed {seed} teachers (N={n})", unit="epoch",
             disable=not settings.progress)
  for epoch in bar:
    state, losses = epoch_fn(state, jax.random.fold_in(key, epoch), images, labels)
    teacher_losses.append(np.asarray(losses).mean(-1))
    bar.set_postfix(loss=f"{teacher_losses[-1][-1]:.3f}")
  return state.trainable, np.concatenate(teacher_losses) if teacher_losses else np.zeros((0,))


def _train_students(settings: MnistSettings, graphdef, reference, teachers, images,
                    key: jax.Array, seed: int, variants: Sequence[StudentVariant]
                    ) -> tuple[Any, dict[str, Any]]:
  """Every variant's N students stacked into one ensemble of K = len(variants) * N models:
  ``(parameters, alignment history)``."""
  cfg, n, s = settings.model.mlp_config(), settings.num_models, settings.student
  rng = np.random.default_rng([seed, 7])
  init_index, teacher_index, masks = [], [], []
  aux_mask = np.arange(cfg.num_outputs) >= cfg.num_classes
  for variant in variants:
    init_index.append(derangement(n, rng) if variant.cross_init else np.arange(n))
    teacher_index.append(np.arange(n))
    masks.append(np.broadcast_to(aux_mask if variant.aux_only else np.ones_like(aux_mask),
                                 (n, cfg.num_outputs)))
  k = len(variants) * n
  layout = ensemble.Layout.for_sizes(k, s.batch_size)
  init_index = jnp.asarray(np.concatenate(init_index))
  teacher_index = jnp.asarray(np.concatenate(teacher_index))
  logit_mask = jnp.asarray(np.concatenate(masks))
  state = layout.new_state(mlp.take_models(reference, init_index), optimizer_for(s.optimizer_key))
  student_init = layout.place(mlp.take_models(reference, init_index))
  teacher_delta = layout.place(mlp.take_models(
      jax.tree.map(jnp.subtract, teachers, reference), teacher_index))
  epoch_fn = _distill_epoch(graphdef, s.optimizer_key, s.loss, s.inputs, s.examples_per_epoch,
                            s.batch_size, cfg.input_size, layout)
  steps = data_lib.steps_per_epoch(s.examples_per_epoch, s.batch_size)
  history: dict[str, Any] = {"steps": [], "dot": [], "cosine": [], "loss": []}
  bar = tqdm(range(s.epochs), desc=f"seed {seed} students (K={k})", unit="epoch",
             disable=not settings.progress)
  for epoch in bar:
    record = _record_mask(epoch, steps, settings.alignment.record_every,
                          settings.alignment.record_first)
    state, losses, aligned = epoch_fn(
        state, jax.random.fold_in(key, epoch), teachers, teacher_index, logit_mask, images,
        student_init, teacher_delta, jnp.asarray(record))
    losses, aligned = np.asarray(losses), jax.tree.map(np.asarray, aligned)
    history["steps"].extend((epoch * steps + np.flatnonzero(record) + 1).tolist())
    history["dot"].append(aligned["dot"][record])
    history["cosine"].append(aligned["cosine"][record])
    history["loss"].append(losses.mean(0))
    bar.set_postfix(loss=f"{losses[-1].mean():.2e}")
  if history["dot"]:
    history["dot"] = np.concatenate(history["dot"])  # [records, K]
    history["cosine"] = np.concatenate(history["cosine"])
    history["loss"] = np.stack(history["loss"])  # [epochs, K]
  return state.trainable, history


def summarize_rows(per_seed: Sequence[Mapping[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
  """Mean and std (ddof=0) over every model of every seed, per row; also the per-seed means."""
  rows: dict[str, dict[str, Any]] = {}
  for row in ROWS:
    values = [np.asarray(seed_rows[row]) for seed_rows in per_seed if row in seed_rows]
    if not values:
      continue
    flat = np.concatenate(values)
    rows[row] = {"mean": float(flat.mean()), "std": float(flat.std()), "num_models": int(flat.size),
                 "seed_means": [float(v.mean()) for v in values],
                 "accuracies": [round(float(a), 5) for a in flat]}
  return rows


def summarize_alignment(seed_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per student variant and recorded step: mean/std cosine, mean dot, share of dot >= 0."""
  first = seed_results[0]
  if not len(first["history"]["steps"]):
    return {}
  steps = first["history"]["steps"]
  out: dict[str, Any] = {"steps": steps}
  n_variants = len(first["variants"])
  for i, name in enumerate(first["variants"]):
    dots = np.concatenate([np.split(r["history"]["dot"], n_variants, axis=1)[i]
                           for r in seed_results], axis=1)
    cosines = np.concatenate([np.split(r["history"]["cosine"], n_variants, axis=1)[i]
                              for r in seed_results], axis=1)
    out[f"student_{name}"] = {
        "cosine_mean": cosines.mean(1).round(6).tolist(),
        "cosine_std": cosines.std(1).round(6).tolist(),
        "dot_mean": dots.mean(1).tolist(),
        "share_dot_nonnegative": (dots >= 0).mean(1).round(4).tolist()}
  return out


def device_description() -> dict[str, Any]:
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "device_count": len(devices), "cpu_count": os.cpu_count(),
          "processor": platform.processor() or platform.machine(), "jax": jax.__version__}


def run_training(settings: MnistSettings, workdir: pathlib.Path, data: Mnist, *,
                 teacher_cache: TeacherCache | None = None) -> dict[str, Any]:
  """The train stage: every seed, then results.json, alignment_training.json, run_info.json."""
  start = time.time()
  seed_results = [train_seed(settings, data, seed, teacher_cache=teacher_cache)
                  for seed in settings.seeds]
  wall = time.time() - start
  rows = summarize_rows([r["accuracies"] for r in seed_results])
  workdir.mkdir(parents=True, exist_ok=True)
  _write_json(workdir / "results.json", rows)
  _write_json(workdir / "alignment_training.json", summarize_alignment(seed_results))
  info = {"config": settings.record(), "wall_seconds": round(wall, 1),
          "seconds_per_seed": [{k: round(v, 1) for k, v in r["timings"].items()}
                               for r in seed_results],
          "device": device_description(), "data_source": data.source,
          "teacher_final_loss": [float(r["teacher_losses"][-1]) if len(r["teacher_losses"])
                                 else None for r in seed_results]}
  _write_json(workdir / "run_info.json", info)
  for row, stats in rows.items():
    logging.info("%-24s %.4f +- %.4f (%d models)", row, stats["mean"], stats["std"],
                 stats["num_models"])
  logging.info("train stage: %.1f s", wall)
  return rows


def _write_json(path: pathlib.Path, value: Any) -> None:
  files.write_json(path, value, default=jsonable.json_default)


def _check_stages(stages: Sequence[str] | None) -> tuple[str, ...]:
  if stages is None:
    return STAGES
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stages {unknown}; this experiment has {STAGES}")
  return tuple(stages)


def run_sweep(settings: MnistSettings, points: Sequence[SweepPoint], workdir: pathlib.Path,
              stages: tuple[str, ...]) -> None:
  """One training per point of the sweep (``settings.sweep``); one table, one plot."""
  if "train" in stages:
    data = load_mnist(settings.data_dir or None)
    cache = TeacherCache()
    for point in points:
      logging.info("sweep %s: point %s %s", settings.sweep.name, point.label, point.overrides)
      start = time.time()
      run_training(point.settings, workdir / "points" / point.directory, data, teacher_cache=cache)
      logging.info("sweep point %s: %.1f s", point.label, time.time() - start)
  if "report" in stages:
    mnist_report.write_sweep_report(workdir, settings.sweep.name, settings.sweep.value_name,
                                    [(point.label, point.overrides,
                                      workdir / "points" / point.directory) for point in points])


def run(config: ConfigDict, workdir: str, stages: Sequence[str] | None = None) -> None:
  """Entry point of ``subliminal_jax.main`` for ``config.experiment == "mnist_aux"``."""
  stages = _check_stages(stages)
  # Every value checked (every sweep point's too) before the workdir is touched.
  settings = mnist_settings.from_config(config)
  points = mnist_settings.sweep_points(config)
  # The marker (and lock) keep this experiment's results.json and report.md apart from another
  # experiment's in the same directory.
  marked = artifacts.Workdir(workdir, "mnist_aux", {})
  workdir = marked.path
  if points:
    run_sweep(settings, points, workdir, stages)
    return
  theorem = settings.theorem
  data = None
  if "train" in stages or ("theorem" in stages and theorem.enabled):
    data = load_mnist(settings.data_dir or None)
  if "train" in stages:
    run_training(settings, workdir, data)
  if "theorem" in stages and theorem.enabled:
    start = time.time()
    result = mnist_theorem.run_theorem_check(theorem, settings.teacher, data,
                                             settings.model.mlp_config())
    result["wall_seconds"] = round(time.time() - start, 1)
    _write_json(workdir / "theorem.json", result)
    logging.info("theorem stage: %.1f s", result["wall_seconds"])
  if "report" in stages:
    mnist_report.write_report(workdir)
