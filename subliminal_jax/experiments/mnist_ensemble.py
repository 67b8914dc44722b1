"""Training and evaluating ensembles of MNIST MLPs: many models in one jitted program.

Each epoch is one jitted function: a ``lax.scan`` over its batches, every step a ``jax.vmap`` over
the stacked models. All models of an ensemble see the same batch (the ensemble's diversity is its
inits), so the first layers of all of them form one large matmul. A partial last batch is padded
and weighted zero, which averages over its real examples exactly as a PyTorch DataLoader with
``drop_last=False`` does.

Placement: on a mesh of several devices the model axis is sharded when the device count divides
it; otherwise the batch is (data parallel, gradients reduced by XLA).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from subliminal_jax.data.mnist import to_symmetric
from subliminal_jax.mechanism import alignment, imitation
from subliminal_jax.models import mlp

DISTILL_INPUTS = ("uniform", "gaussian", "mnist")
MESH_AXIS = "devices"


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the stacked models and the batch live on the devices."""

  mesh: Mesh
  shard_models: bool  # model axis over the devices; otherwise the batch (when divisible)
  shard_batch: bool

  @classmethod
  def for_sizes(cls, num_models: int, batch_size: int, mesh: Mesh | None = None) -> "Placement":
    mesh = mesh or jax.make_mesh((jax.device_count(),), (MESH_AXIS,),
                                 axis_types=(jax.sharding.AxisType.Auto,))
    devices = mesh.devices.size
    shard_models = devices > 1 and num_models % devices == 0
    shard_batch = devices > 1 and not shard_models and batch_size % devices == 0
    return cls(mesh, shard_models, shard_batch)

  def models(self, ndim: int) -> NamedSharding:
    axis = tuple(self.mesh.axis_names) if self.shard_models else None
    return NamedSharding(self.mesh, PartitionSpec(axis, *(None,) * (ndim - 1)))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def put_models(self, tree):
    """Places a stacked pytree (params, optimizer state) with its leading axis on the models."""
    return jax.tree.map(lambda a: jax.device_put(a, self.models(a.ndim) if a.ndim else
                                                 self.replicated()), tree)

  def put_replicated(self, tree):
    return jax.tree.map(lambda a: jax.device_put(a, self.replicated()), tree)

  def constrain_batch(self, x: jax.Array) -> jax.Array:
    if not self.shard_batch:
      return x
    spec = PartitionSpec(tuple(self.mesh.axis_names), *(None,) * (x.ndim - 1))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return math.ceil(num_examples / batch_size)


def _epoch_batches(key: jax.Array | None, num_examples: int, batch_size: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Example indices [steps, B] (a fresh permutation, or in order without a key) and weights."""
  steps = steps_per_epoch(num_examples, batch_size)
  order = (jax.random.permutation(key, num_examples) if key is not None
           else jnp.arange(num_examples))
  pad = steps * batch_size - num_examples
  order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).reshape(steps, batch_size)
  weights = jnp.concatenate([jnp.ones((num_examples,), jnp.float32),
                             jnp.zeros((pad,), jnp.float32)]).reshape(steps, batch_size)
  return order, weights


def init_optimizer_state(optimizer: optax.GradientTransformation, params: nnx.State):
  """One optimizer state per model (vmapped, so clipping and Adam's counters stay per model)."""
  return jax.vmap(optimizer.init)(params)


def _update(optimizer, grads, opt_state, params):
  updates, opt_state = jax.vmap(optimizer.update)(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def make_classifier_epoch(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                          num_classes: int, num_examples: int, batch_size: int,
                          placement: Placement) -> Callable:
  """``epoch(params, opt_state, key, images_u8, labels) -> (params, opt_state, losses [steps, N])``:
  one shuffled pass of cross-entropy on the first ``num_classes`` logits (the teacher)."""

  def loss_fn(params, x, labels, weights):
    logits = mlp.apply(graphdef, params, x)[..., :num_classes]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return (nll * weights).sum() / weights.sum()

  grad_fn = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(0, None, None, None))

  def epoch(params, opt_state, key, images, labels):
    order, weights = _epoch_batches(key, num_examples, batch_size)

    def step(carry, batch):
      params, opt_state = carry
      index, w = batch
      x = placement.constrain_batch(to_symmetric(images[index]))
      losses, grads = grad_fn(params, x, labels[index], placement.constrain_batch(w))
      params, opt_state = _update(optimizer, grads, opt_state, params)
      return (params, opt_state), losses

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (order, weights))
    return params, opt_state, losses

  return jax.jit(epoch, donate_argnums=(0, 1))


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
                       input_size: int, placement: Placement) -> Callable:
  """``epoch(params, opt_state, key, teacher_params, teacher_index, logit_mask, images_u8,
  student_init, teacher_delta, record) -> (params, opt_state, losses [steps, K],
  alignment {dot, cosine} [steps, K])``.

  Student k imitates teacher ``teacher_index[k]`` on the logits ``logit_mask[k]`` selects; all
  students and teachers see the same inputs (fresh noise every step, or a fresh permutation of
  the real images). After the steps where ``record[step]`` is True, each student's displacement
  ``params - student_init`` is compared with its teacher's ``teacher_delta``.
  """
  if inputs not in DISTILL_INPUTS:
    raise ValueError(f"unknown distillation inputs {inputs!r}; expected one of {DISTILL_INPUTS}")
  imitation_loss = imitation.get_imitation_loss(loss)

  def loss_fn(params, x, teacher_logits, logit_mask, weights):
    return imitation_loss(mlp.apply(graphdef, params, x), teacher_logits, logit_mask, weights)

  grad_fn = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(0, None, 0, 0, None))
  measure = jax.vmap(lambda p, p0, d: alignment.alignment(alignment.tree_sub(p, p0), d))

  def epoch(params, opt_state, key, teacher_params, teacher_index, logit_mask, images,
            student_init, teacher_delta, record):
    permutation_key, noise_key = jax.random.split(key)
    order, weights = _epoch_batches(permutation_key if inputs == "mnist" else None,
                                    num_examples, batch_size)
    step_keys = jax.random.split(noise_key, order.shape[0])
    num_students = teacher_index.shape[0]

    def step(carry, batch):
      params, opt_state = carry
      step_key, index, w, record_now = batch
      x = draw_inputs(inputs, step_key, batch_size, input_size, images, index)
      x = placement.constrain_batch(x)
      teacher_logits = jax.lax.stop_gradient(
          mlp.apply_ensemble(graphdef, teacher_params, x))[teacher_index]
      losses, grads = grad_fn(params, x, teacher_logits, logit_mask, placement.constrain_batch(w))
      params, opt_state = _update(optimizer, grads, opt_state, params)
      zeros = {"dot": jnp.zeros((num_students,)), "cosine": jnp.zeros((num_students,))}
      aligned = jax.lax.cond(record_now, lambda: measure(params, student_init, teacher_delta),
                             lambda: zeros)
      return (params, opt_state), (losses, aligned)

    (params, opt_state), (losses, aligned) = jax.lax.scan(
        step, (params, opt_state), (step_keys, order, weights, record))
    return params, opt_state, losses, aligned

  return jax.jit(epoch, donate_argnums=(0, 1))


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
