"""Text <-> token ids and chat rendering for the models we load, without torch or transformers.

* :mod:`.core`: :class:`Tokenizer` (encode/decode, padded batches, token bytes and texts, the
  ``from_gguf`` / ``from_hf_dir`` entry points, ``save``).
* :mod:`.gguf_vocab`: the `tokenizers` engine built from GGUF metadata (byte-level BPE with
  llama.cpp's pre-tokenizers, Gemma 3's SentencePiece BPE).
* :mod:`.chat_template`: Jinja chat templates rendered as transformers renders them, and
  :class:`SystemTurn`, the explicit system-turn choice.
"""

from subliminal_jax.tokenizer.chat_template import GEMMA3_CHAT_TEMPLATE, ChatTemplate, SystemTurn
from subliminal_jax.tokenizer.core import PADDING_SIDES, TRUNCATION_SIDES, Tokenizer
from subliminal_jax.tokenizer.gguf_vocab import SUPPORTED_GGUF_PRE

__all__ = ["GEMMA3_CHAT_TEMPLATE", "PADDING_SIDES", "SUPPORTED_GGUF_PRE", "TRUNCATION_SIDES",
           "ChatTemplate", "SystemTurn", "Tokenizer"]
