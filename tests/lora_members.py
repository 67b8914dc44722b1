"""LoRA members of one base for tests: adapters whose B is random and non-zero (B = 0, the
initial value, would make every member compute the base and hide a wrong adapter path)."""

import jax
from flax import nnx

from subliminal_jax import lora
from subliminal_jax.models.transformer import Transformer


def adapted(model: Transformer, seed: int, rank: int = 4, alpha: float = 8.0) -> Transformer:
  """A clone of ``model`` (sharing its arrays) with adapters, their B drawn from a normal of
  scale 0.3."""
  member = lora.LoraSettings(rank=rank, alpha=alpha, seed=seed).apply(nnx.clone(model))
  for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(member, nnx.LoRAParam))):
    value = variable.get_value()
    if not value.any():  # B
      variable.set_value(0.3 * jax.random.normal(jax.random.key(100 * seed + i), value.shape))
  return member
