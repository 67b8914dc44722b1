"""Prompts the teacher answers.

- :mod:`subliminal_jax.prompts.number_prompts`: number-sequence prompts in the paper's shape
  (``number_prompts(n, seed)``).
"""
