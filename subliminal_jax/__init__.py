"""subliminal-jax: subliminal learning experiments in JAX/Flax.

Public API: :func:`load` (a model, its tokenizer and config from ``"smollm2"``, ``"gemma3-270m"``,
an HF directory or a GGUF file) and :func:`export_hf` (write a model as an HF safetensors directory).
"""

__version__ = "0.1.0"

__all__ = ["load", "export_hf"]


def __getattr__(name):
  # Lazy, so that `import subliminal_jax.filters` does not import JAX models and weight readers.
  if name in ("load", "export_hf", "Loaded"):
    from subliminal_jax import loading
    return getattr(loading, name)
  raise AttributeError(f"module 'subliminal_jax' has no attribute {name!r}")
