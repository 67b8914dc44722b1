"""Text <-> token ids and chat rendering for the models we load (see :mod:`.core`)."""

from subliminal_jax.tokenizer.core import (GEMMA3_CHAT_TEMPLATE, PADDING_SIDES, SUPPORTED_GGUF_PRE,
                                           TRUNCATION_SIDES, Tokenizer, system_choice, system_turn)

__all__ = ["GEMMA3_CHAT_TEMPLATE", "PADDING_SIDES", "SUPPORTED_GGUF_PRE", "TRUNCATION_SIDES",
           "Tokenizer", "system_choice", "system_turn"]
