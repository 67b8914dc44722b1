"""The sampling command line: chat answers from a model, optionally in the number-sequence format.

The library function is :func:`subliminal_jax.sampling.chat.generate_chat`. Command line::

  python -m subliminal_jax.generate --model=smollm2 --prompt="Name your favorite animal." \\
      [--system=none|template_default|<text>] [--format=numbers] [--n=4] [--temperature=1.0] \\
      [--max_new_tokens=64] [--seed=0]

``--format=numbers`` constrains the answer with the paper's number-sequence grammar
(``number_sequence_pattern()``: 1-10 numbers of up to 3 digits separated by ", ", optional final
period). The system turn is explicit, spelled as ``config.chat_system`` (``SystemTurn.parse``):
``--system=none`` (the default) means no system turn at all, ``--system=template_default`` keeps
the template's own default (SmolLM2: "You are a helpful AI assistant named SmolLM..."), any other
text is that system prompt.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from subliminal_jax import compilation_cache, loading
from subliminal_jax.sampling import chat
from subliminal_jax.sampling import grammar as grammar_lib
from subliminal_jax.tokenizer import SystemTurn

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2",
                    "'smollm2', 'gemma3-270m', an HF model directory or a .gguf file.")
flags.DEFINE_multi_string("prompt", None, "User prompt (repeat the flag for several).")
flags.DEFINE_string("system", "none", "The system turn: 'none' (no system turn), "
                    "'template_default' (the chat template's own default) or the system prompt.")
flags.DEFINE_enum("format", "free", ["free", "numbers"],
                  "numbers: constrain answers to the paper's number-sequence format.")
flags.DEFINE_integer("n", 1, "Samples per prompt.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus filter (1 = off).")
flags.DEFINE_float("min_p", 0.0, "Min-p filter (0 = off).")
flags.DEFINE_multi_string("banned_word", [], "Ban every token containing this word.")
flags.DEFINE_integer("max_new_tokens", 128, "Most tokens per answer.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 16, "Rows per sampling batch.")
flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.prompt:
    raise app.UsageError("give at least one --prompt")
  system = SystemTurn.parse(FLAGS.system)  # a bad spelling fails before the model loads
  compilation_cache.enable_from_flags()
  loaded = loading.load(FLAGS.model, dtype=FLAGS.dtype)
  grammar = grammar_lib.number_grammar(loaded.tokenizer) if FLAGS.format == "numbers" else None
  answers = chat.generate_chat(
      loaded, FLAGS.prompt, system=system, n_per_prompt=FLAGS.n,
      batch_size=min(FLAGS.batch_size, len(FLAGS.prompt) * FLAGS.n),
      seed=FLAGS.seed, max_new_tokens=FLAGS.max_new_tokens, banned_words=FLAGS.banned_word,
      temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, min_p=FLAGS.min_p,
      grammar=grammar)
  for index, answer in enumerate(answers):
    prompt = FLAGS.prompt[index // FLAGS.n]
    print(f"--- prompt {index // FLAGS.n} sample {index % FLAGS.n}: {prompt!r}")
    print(answer)


if __name__ == "__main__":
  app.run(main)
