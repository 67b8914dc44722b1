"""Prompts the teacher answers.

- :mod:`subliminal_jax.prompts.number_prompts`: number-sequence prompts in the paper's shape
  (``number_prompts(n, seed)``).
- :mod:`subliminal_jax.prompts.code_tasks`: short functions to complete, for the code channel
  (``code_task_prompts(n, seed)``).
- :mod:`subliminal_jax.prompts.word_problems`: arithmetic word problems with known answers, for the
  chain-of-thought channel (``word_problems(n, seed)``; ``read_gsm8k_jsonl(path)`` for a local file).
"""
