"""The MNIST experiment's ensembles of MLPs, trained on the ensemble engine an epoch per program.

Teachers learn the digit classes (cross-entropy on the first ``num_classes`` logits); students
imitate their teachers' logits (all of them, or only the auxiliary ones) on noise or on images.
Both are epochs of :func:`subliminal_jax.training.ensemble.make_ensemble_epoch`: the train step of
:mod:`subliminal_jax.training.train_step` vmapped over the stacked models and scanned over the
epoch's batches, which are gathered (or drawn) inside the program. All models of an ensemble see
the same batch (the ensemble's diversity is its inits), so the first layers of all of them form one
large matmul. A partial last batch is padded and weighted zero, which averages over its real
examples exactly as a PyTorch DataLoader with ``drop_last=False`` does.

Placement (:class:`Layout`): on several devices the model axis is split when the device count
divides it; otherwise the batch is (data parallel, gradients reduced by XLA).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from subliminal_jax import sharding
from subliminal_jax.data.mnist import to_symmetric
from subliminal_jax.mechanism import alignment, imitation
from subliminal_jax.models import mlp
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import ensemble
from subliminal_jax.training import train_step as train_step_lib
from subliminal_jax.training.train_step import TrainState

DISTILL_INPUTS = ("uniform", "gaussian", "mnist")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where an ensemble of ``num_models`` MLPs trained on batches of ``batch_size`` lives: a mesh
  of all devices and the rules of :func:`ensemble.ensemble_rules`."""

  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]

  @classmethod
  def for_sizes(cls, num_models: int, batch_size: int, mesh: Mesh | None = None) -> "Layout":
    mesh = mesh or sharding.make_mesh()
    return cls(mesh, ensemble.ensemble_rules(num_models, batch_size, mesh))

  @property
  def shards_models(self) -> bool:
    return dict(self.rules)[ensemble.ENSEMBLE_AXIS] is not None

  @property
  def shards_batch(self) -> bool:
    return dict(self.rules)["batch"] is not None

  def place(self, stacked: nnx.State) -> nnx.State:
    """Places a stacked state (teachers, inits, displacements) as the members are."""
    with sharding.use_rules(self.rules):
      return train_step_lib.place_state(stacked, self.mesh)

  def new_state(self, params: nnx.State, optimizer: optax.GradientTransformation) -> TrainState:
    """The ensemble's train state starting from ``params`` (copied: the caller's stay valid)."""
    with sharding.use_rules(self.rules):
      return ensemble.stacked_train_state(params, optimizer, mesh=self.mesh)

  def constrain_batch(self, x: jax.Array) -> jax.Array:
    """Inside the program: ``x`` split over the devices by its leading (batch) axis, if the batch
    is what is split."""
    return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1)) if self.shards_batch else x


def _epoch_order(key: jax.Array | None, num_examples: int, batch_size: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Example indices [steps, B] (a fresh permutation, or in order without a key) and weights."""
  steps = data_lib.steps_per_epoch(num_examples, batch_size)
  order = (jax.random.permutation(key, num_examples) if key is not None
           else jnp.arange(num_examples))
  pad = steps * batch_size - num_examples
  order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).reshape(steps, batch_size)
  weights = jnp.concatenate([jnp.ones((num_examples,), jnp.float32),
                             jnp.zeros((pad,), jnp.float32)]).reshape(steps, batch_size)
  return order, weights


# The objectives return their batch's weighted MEAN (``mean_loss=True``: the weights normalise it
# over the real examples, the padded ones weigh 0), as the paper's script does, rather than the
# step's usual sum and count: the gradients are then those of per-model training to the bit.
def _mean(value: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
  return value, weights.sum().astype(jnp.int32), {}


def make_classifier_epoch(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                          num_classes: int, num_examples: int, batch_size: int,
                          layout: Layout) -> Callable:
  """``epoch(state, key, images_u8, labels) -> (state, losses [steps, N])``: one shuffled pass of
  cross-entropy on the first ``num_classes`` logits (the teacher)."""

  def loss_fn(model, batch, rng, aux):
    logp = jax.nn.log_softmax(model(batch["x"])[..., :num_classes], axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1)[:, 0]
    return _mean((nll * batch["weights"]).sum() / batch["weights"].sum(), batch["weights"])

  def make_batch(context, inputs):
    index, weights = inputs
    return {"x": layout.constrain_batch(to_symmetric(context["images"][index])),
            "labels": context["labels"][index], "weights": layout.constrain_batch(weights)}

  epoch = ensemble.make_ensemble_epoch(
      graphdef, optimizer, loss_fn=loss_fn,
      epoch_inputs=lambda context: _epoch_order(context["key"], num_examples, batch_size),
      make_batch=make_batch, mean_loss=True, metrics=("loss",), mesh=layout.mesh,
      rules=layout.rules)

  def run(state, key, images, labels):
    state, metrics, _ = epoch(state, {"key": key, "images": images, "labels": labels})
    return state, metrics["loss"]

  return run


def draw_inputs(kind: str, key: jax.Array, batch_size: int, input_size: int,
                images: jax.Array | None = None, index: jax.Array | None = None) -> jax.Array:
  """A distillation batch: uniform [-1, 1] or standard Gaussian noise, or real images[index]."""
  if kind == "uniform":
    return jax.random.uniform(key, (batch_size, input_size), jnp.float32, -1.0, 1.0)
  if kind == "gaussian":
    return jax.random.normal(key, (batch_size, input_size), jnp.float32)
  if kind == "mnist":
    return to_symmetric(images[index])
  raise ValueError(f"unknown distillation inputs {kind!r}; expected one of {DISTILL_INPUTS}")


def make_distill_epoch(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                       loss: str, inputs: str, num_examples: int, batch_size: int,
                       input_size: int, layout: Layout) -> Callable:
  """``epoch(state, key, teachers, teacher_index, logit_mask, images_u8, student_init,
  teacher_delta, record) -> (state, losses [steps, K], alignment {dot, cosine} [steps, K])``.

  Student k imitates teacher ``teacher_index[k]`` on the logits ``logit_mask[k]`` selects; all
  students and teachers see the same inputs (fresh noise every step, or a fresh permutation of
  the real images). After the steps where ``record[step]`` is True, each student's displacement
  ``params - student_init`` is compared with its teacher's ``teacher_delta``.
  """
  if inputs not in DISTILL_INPUTS:
    raise ValueError(f"unknown distillation inputs {inputs!r}; expected one of {DISTILL_INPUTS}")
  imitation_loss = imitation.get_imitation_loss(loss)

  def loss_fn(model, batch, rng, aux):
    return _mean(imitation_loss(model(batch["x"]), batch["teacher_logits"], batch["logit_mask"],
                                batch["weights"]), batch["weights"])

  def epoch_inputs(context):
    permutation_key, noise_key = jax.random.split(context["key"])
    order, weights = _epoch_order(permutation_key if inputs == "mnist" else None,
                                  num_examples, batch_size)
    return jax.random.split(noise_key, order.shape[0]), order, weights, context["record"]

  def make_batch(context, step_inputs):
    step_key, index, weights, _ = step_inputs
    x = draw_inputs(inputs, step_key, batch_size, input_size, context["images"], index)
    x = layout.constrain_batch(x)
    teacher_logits = jax.lax.stop_gradient(
        mlp.apply_ensemble(graphdef, context["teachers"], x))[context["teacher_index"]]
    return {"x": x, "teacher_logits": teacher_logits, "logit_mask": context["logit_mask"],
            "weights": layout.constrain_batch(weights)}

  measure = jax.vmap(lambda p, p0, d: alignment.alignment(alignment.tree_sub(p, p0), d))

  def record(state, context, step_inputs):
    zeros = jnp.zeros((context["teacher_index"].shape[0],))
    return jax.lax.cond(
        step_inputs[3],
        lambda: measure(state.trainable, context["student_init"], context["teacher_delta"]),
        lambda: {"dot": zeros, "cosine": zeros})

  epoch = ensemble.make_ensemble_epoch(
      graphdef, optimizer, loss_fn=loss_fn, epoch_inputs=epoch_inputs, make_batch=make_batch,
      batch_axes={"x": None, "teacher_logits": 0, "logit_mask": 0, "weights": None},
      record=record, mean_loss=True, metrics=("loss",), mesh=layout.mesh, rules=layout.rules)

  def run(state, key, teachers, teacher_index, logit_mask, images, student_init, teacher_delta,
          record_steps):
    context = {"key": key, "teachers": teachers, "teacher_index": teacher_index,
               "logit_mask": logit_mask, "images": images, "student_init": student_init,
               "teacher_delta": teacher_delta, "record": record_steps}
    state, metrics, aligned = epoch(state, context)
    return state, metrics["loss"], aligned

  return run


@functools.partial(jax.jit, static_argnames=("graphdef", "num_classes", "chunk"))
def _accuracy(graphdef, params, images, labels, *, num_classes, chunk):
  num = images.shape[0]
  steps = num // chunk
  images = images[:steps * chunk].reshape(steps, chunk, -1)
  labels = labels[:steps * chunk].reshape(steps, chunk)

  def body(correct, batch):
    x, y = batch
    logits = mlp.apply_ensemble(graphdef, params, to_symmetric(x))[..., :num_classes]
    return correct + (logits.argmax(-1) == y).sum(-1), None

  correct, _ = jax.lax.scan(body, jnp.zeros((mlp.ensemble_size(params),), jnp.int32),
                            (images, labels))
  return correct


def accuracy(graphdef: nnx.GraphDef, params: nnx.State, images: np.ndarray, labels: np.ndarray, *,
             num_classes: int, chunk: int = 1000) -> np.ndarray:
  """Test accuracy (fraction) of every model: argmax over the first ``num_classes`` logits."""
  num = images.shape[0]
  chunk = math.gcd(num, chunk)  # equal chunks that tile the set exactly
  correct = _accuracy(graphdef, params, jnp.asarray(images), jnp.asarray(labels),
                      num_classes=num_classes, chunk=chunk)
  return np.asarray(correct, np.float64) / num
