"""The MLP of the MNIST auxiliary-logit experiment, and ensembles of it trained in one program.

``MLP(784 -> 256 -> 256 -> 10 + m)`` with ReLU, as the paper's MNIST script: weights drawn from
N(0, init_scale^2 / d_in), biases zero. Logits ``[:num_classes]`` are the digit classes, the last
``num_aux`` are the auxiliary logits that no loss of the teacher ever touches.

An *ensemble* is N such models with their parameters stacked on a leading axis (an ``nnx.State``
whose every leaf is ``[N, ...]``), run with ``jax.vmap``. When the N models see the same inputs,
XLA fuses the first layer of all of them into one ``[B, 784] x [784, N*256]`` matmul, the shape a
CPU or an accelerator runs best.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from subliminal_jax import sharding

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """Architecture and numerics. Parameters are always float32; ``compute_dtype`` is the dtype of
  matmul operands (float32 accumulation either way; bfloat16 about doubles CPU matmul speed on
  AVX512-BF16 machines and is the natural choice on accelerators)."""

  input_size: int = 784
  hidden_sizes: tuple[int, ...] = (256, 256)
  num_classes: int = 10
  num_aux: int = 3
  init_scale: float = 1.0
  compute_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
    if self.input_size < 1 or self.num_classes < 1 or self.num_aux < 0:
      raise ValueError(f"input_size and num_classes must be >= 1 and num_aux >= 0, got "
                       f"{self.input_size}, {self.num_classes}, {self.num_aux}")
    if any(h < 1 for h in self.hidden_sizes):
      raise ValueError(f"hidden_sizes must be positive, got {self.hidden_sizes}")
    if not self.init_scale > 0:
      raise ValueError(f"init_scale must be > 0, got {self.init_scale}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype {self.compute_dtype!r} is not one of {COMPUTE_DTYPES}")

  @property
  def num_outputs(self) -> int:
    return self.num_classes + self.num_aux

  @property
  def layer_sizes(self) -> tuple[int, ...]:
    return (self.input_size, *self.hidden_sizes, self.num_outputs)

  @property
  def num_params(self) -> int:
    sizes = self.layer_sizes
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, compute_dtype: str = "float32") -> jax.Array:
  """``x [..., d_in] @ w [d_in, d_out]`` with operands in ``compute_dtype``, accumulated and
  returned in float32. The backward pass also multiplies in ``compute_dtype`` (the incoming
  gradient is rounded to it), as mixed-precision training does on accelerators; JAX's own
  transpose of a bfloat16 x bfloat16 -> float32 product would multiply in float32 instead."""
  return _matmul(x, w, compute_dtype)


def _matmul(x, w, compute_dtype):
  dtype = jnp.dtype(compute_dtype)
  return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _matmul_fwd(x, w, compute_dtype):
  return _matmul(x, w, compute_dtype), (x, w)


def _matmul_bwd(compute_dtype, residuals, g):
  x, w = residuals
  dtype = jnp.dtype(compute_dtype)
  g_c, x_c, w_c = g.astype(dtype), x.astype(dtype), w.astype(dtype)
  # Transposed operands are materialised (the barrier stops XLA folding the transpose into the
  # product), so that both products have the plain [m, k] x [k, n] layout. XLA:CPU (jax 0.10.2)
  # runs other layouts of a bfloat16 x bfloat16 -> float32 product on a kernel that either upcasts
  # to float32 or, contracting both leading dimensions, fails ("Unsupported element type for
  # DotThunk"). The copies are small next to the products.
  w_t = jax.lax.optimization_barrier(w_c.T)
  x_t = jax.lax.optimization_barrier(x_c.reshape(-1, x.shape[-1]).T)
  dx = jnp.matmul(g_c, w_t, preferred_element_type=jnp.float32)
  dw = jnp.matmul(x_t, g_c.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nnx.Module):
  """``x @ kernel + bias``; kernel ~ N(0, (init_scale / sqrt(d_in))^2), bias 0 (the paper's init)."""

  def __init__(self, in_features: int, out_features: int, *, init_scale: float,
               compute_dtype: str, rngs: nnx.Rngs):
    std = init_scale / math.sqrt(in_features)
    self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (in_features, out_features),
                                                    jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
    self.compute_dtype = compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    if jnp.dtype(self.compute_dtype) == jnp.float32:
      # JAX's own differentiation (forward mode too, which the theorem check uses).
      return jnp.matmul(x.astype(jnp.float32), self.kernel[...]) + self.bias[...]
    return matmul(x, self.kernel[...], self.compute_dtype) + self.bias[...]


class MLP(nnx.Module):
  """``x [..., input_size] -> float32 logits [..., num_classes + num_aux]``."""

  def __init__(self, config: MLPConfig, *, rngs: nnx.Rngs):
    self.config = config
    sizes = config.layer_sizes
    self.layers = nnx.List([
        Dense(d_in, d_out, init_scale=config.init_scale, compute_dtype=config.compute_dtype,
              rngs=rngs)
        for d_in, d_out in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


def model_keys(seed: int, num_models: int) -> jax.Array:
  """One key per model: model i of seed s always gets the same init, whatever N is."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(num_models))


@functools.lru_cache(maxsize=16)
def _initializer(config: MLPConfig):
  # One compiled initializer per architecture (a fresh jax.jit per call would recompile).
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: MLP(config, rngs=nnx.Rngs(0))))
  init = jax.jit(jax.vmap(lambda key: nnx.state(MLP(config, rngs=nnx.Rngs(params=key)),
                                                nnx.Param)))
  return graphdef, init


def init_ensemble(config: MLPConfig, keys: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
  """``len(keys)`` independently initialised MLPs: (graphdef, params stacked on axis 0, which
  their logical axes name ``"ensemble"``, so that sharding rules place the members)."""
  graphdef, init = _initializer(config)
  return graphdef, sharding.add_leading_axis(init(keys), sharding.ENSEMBLE_AXIS)


def apply(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array) -> jax.Array:
  """One model's logits (``params`` unstacked)."""
  return nnx.merge(graphdef, params)(x)


def apply_ensemble(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, *,
                   shared_inputs: bool = True) -> jax.Array:
  """Logits ``[N, B, out]`` of every model: on the same ``x [B, in]`` (shared_inputs) or each on
  its own ``x [N, B, in]``."""
  return jax.vmap(lambda p, xi: apply(graphdef, p, xi),
                  in_axes=(0, None if shared_inputs else 0))(params, x)


def ensemble_size(params: nnx.State) -> int:
  return jax.tree.leaves(params)[0].shape[0]


def take_models(params: nnx.State, index: jax.Array) -> nnx.State:
  """The ensemble of models ``index`` (a gather on the stacked axis; repeats allowed)."""
  return jax.tree.map(lambda a: a[index], params)
