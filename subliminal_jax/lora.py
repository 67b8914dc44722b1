"""LoRA adapters on the decoder's projections, as peft and tunix do them.

``apply_lora`` gives each targeted :class:`~subliminal_jax.models.transformer.Linear` two
``nnx.LoRAParam`` matrices, stacked over layers like the kernel they adapt:

  A: [layers, in, rank]   logical axes (layers, <kernel's in axis>, lora_rank), drawn as peft's
                           default ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(in), 1/sqrt(in))
  B: [layers, rank, out]  logical axes (layers, lora_rank, <kernel's out axis>), zeros

and the layer computes ``x @ W + scale * (x @ A) @ B`` with ``scale = alpha / rank`` (or
``alpha / sqrt(rank)`` for rsLoRA). B = 0 makes the adapted model start exactly at the base model.

``seed`` alone determines A (each target draws from its own fold of the seed, independent of which
other targets are chosen), so a student can start with the teacher's adapter init: the "shared
init" knob of the subliminal-learning experiments. Train only the adapters with
``create_train_state(model, opt, trainable=nnx.LoRAParam)``; ``merge_lora`` folds them into the
kernels (``W + scale * A @ B``) and removes them, for export or faster inference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from subliminal_jax import sharding
from subliminal_jax.models.transformer import Linear, Transformer

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
  if isinstance(targets, str):
    raise ValueError(f"targets must be a sequence of names, got the string {targets!r}")
  targets = tuple(targets)
  if not targets:
    raise ValueError(f"targets is empty; choose among {list(LORA_TARGETS)}")
  unknown = [t for t in targets if t not in LORA_TARGETS]
  if unknown:
    raise ValueError(f"unknown LoRA target(s) {unknown}; valid targets: {list(LORA_TARGETS)}")
  if len(set(targets)) != len(targets):
    raise ValueError(f"duplicate LoRA targets in {list(targets)}")
  return targets


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """The LoRA adapters of a finetune (a training config's ``lora`` section); rank 0 = full
  finetuning. Checked when built, so a bad value fails before any work."""

  rank: int = 0
  alpha: float = 8.0
  targets: tuple[str, ...] = LORA_TARGETS
  rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
  seed: int = 0  # the adapters' init (A); see the module docstring

  def __post_init__(self):
    for name, kind in (("rank", int), ("alpha", float), ("targets", tuple), ("rslora", bool),
                       ("seed", int)):
      object.__setattr__(self, name, kind(getattr(self, name)))
    if self.rank < 0:
      raise ValueError(f"lora.rank must be >= 0 (0 = full finetuning), got {self.rank}")
    if self.rank and not self.alpha > 0:
      raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
    _check_targets(self.targets)

  def apply(self, model: Transformer) -> Transformer:
    """Adds these adapters to ``model`` in place (nothing for rank 0); returns ``model``."""
    if self.rank > 0:
      apply_lora(model, rank=self.rank, alpha=self.alpha, targets=self.targets,
                 rslora=self.rslora, seed=self.seed)
    return model


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
  """peft's ``scaling``: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
  return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _place_like(value: jax.Array, variable: nnx.Variable, reference: jax.Array) -> jax.Array:
  """Puts a new adapter on the mesh of the kernel it adapts (by its own logical axes)."""
  ref_sharding = getattr(reference, "sharding", None)
  if isinstance(ref_sharding, NamedSharding):
    spec = sharding.variable_spec(variable, ref_sharding.mesh)
    return jax.device_put(value, NamedSharding(ref_sharding.mesh, spec))
  return value


def _linears(model: Transformer, targets: Sequence[str]) -> list[tuple[str, Linear]]:
  if not isinstance(model, Transformer):
    raise TypeError(f"LoRA applies to a subliminal_jax Transformer, got {type(model).__name__}")
  return [(name, getattr(model.layers, name)) for name in targets]


def apply_lora(model: Transformer, *, rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS,
               rslora: bool = False, seed: int = 0) -> Transformer:
  """Adds LoRA adapters to ``targets`` of every layer, in place; returns ``model``."""
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
  if not alpha > 0:
    raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
  targets = _check_targets(targets)
  base_key = jax.random.key(seed)
  for name, linear in _linears(model, targets):
    if linear.lora_a is not None:
      raise ValueError(f"{name} already has LoRA adapters; merge_lora first or start from a fresh model")
    kernel = linear.kernel.get_value()
    if kernel.ndim != 3:
      raise ValueError(f"{name}.kernel has shape {kernel.shape}; expected [layers, in, out]")
    num_layers, d_in, d_out = kernel.shape
    axes = linear.kernel.get_metadata().get("logical_axes") or ("layers", None, None)
    if rank > min(d_in, d_out):
      raise ValueError(f"LoRA rank {rank} exceeds min(in, out) = {min(d_in, d_out)} of {name}")
    # Each target has its own key (its index among all possible targets), so A of q_proj is the
    # same whatever else is targeted.
    key = jax.random.fold_in(base_key, LORA_TARGETS.index(name))
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(key, (num_layers, d_in, rank), jnp.float32, -bound, bound).astype(kernel.dtype)
    b = jnp.zeros((num_layers, rank, d_out), kernel.dtype)
    a_var = nnx.LoRAParam(a, logical_axes=(axes[0], axes[1], "lora_rank"))
    b_var = nnx.LoRAParam(b, logical_axes=(axes[0], "lora_rank", axes[2]))
    a_var.set_value(_place_like(a, a_var, kernel))
    b_var.set_value(_place_like(b, b_var, kernel))
    linear.lora_a = a_var
    linear.lora_b = b_var
    linear.lora_scale = lora_scale(rank, alpha, rslora)
  return model


def lora_targets(model: Transformer) -> tuple[str, ...]:
  """The projections of ``model`` that currently carry adapters."""
  return tuple(name for name, linear in _linears(model, LORA_TARGETS) if linear.lora_a is not None)


@jax.jit
def _merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
  delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge_lora(model: Transformer) -> Transformer:
  """Folds every adapter into its kernel (W + scale * A @ B) and removes it, in place; returns
  ``model``. The merged model computes the adapted model's function without the LoRA branch."""
  for name, linear in _linears(model, LORA_TARGETS):
    if linear.lora_a is None:
      continue
    kernel = linear.kernel.get_value()
    merged = _merged_kernel(kernel, linear.lora_a.get_value(), linear.lora_b.get_value(),
                            jnp.float32(linear.lora_scale))
    if isinstance(getattr(kernel, "sharding", None), NamedSharding):
      merged = jax.device_put(merged, kernel.sharding)
    linear.kernel.set_value(merged)
    linear.lora_a = None
    linear.lora_b = None
    linear.lora_scale = 0.0
  return model

