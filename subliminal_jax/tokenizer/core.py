"""Text <-> token ids for the models we load, without torch or transformers.

One :class:`Tokenizer` wraps a `tokenizers` engine (byte-level BPE, or Gemma's SentencePiece BPE)
plus what the rest of the project needs around it: special ids (eos, pad, end-of-turn), the chat
template (rendered by :mod:`.chat_template` with an explicit :class:`SystemTurn`), padded batches as
numpy arrays, and each token's decoded text for the constrained-decoding grammar.

Two sources:

* ``Tokenizer.from_gguf(path)`` builds the tokenizer from a GGUF file's metadata (vocabulary,
  merges, token types, special ids, chat template; the engine is built by :mod:`.gguf_vocab`).
* ``Tokenizer.from_hf_dir(path)`` reads a Hugging Face tokenizer directory (``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``, ``chat_template.jinja``). Only a
  directory without ``tokenizer.json`` falls back to ``transformers.AutoTokenizer`` to convert it
  (transformers imports torch where torch is installed).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tokenizers

from subliminal_jax import padding
from subliminal_jax.tokenizer import gguf_vocab
from subliminal_jax.tokenizer.chat_template import (GEMMA3_CHAT_TEMPLATE, ChatTemplate, SystemTurn,
                                                    check_messages)

# Texts of tokens that end an assistant turn in the chat formats we know (ChatML, Llama 3, Gemma,
# Phi-3); those present as special tokens join eos in ``end_of_turn_ids``.
_END_OF_TURN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>",
                      "<end_of_turn>", "<|end|>")

PADDING_SIDES = padding.PADDING_SIDES
TRUNCATION_SIDES = ("left", "right")


class Tokenizer:
  """Byte-level BPE tokenizer with explicit special ids and a chat template.

  Build it with :meth:`from_gguf` or :meth:`from_hf_dir`. ``encode`` never adds special tokens;
  special-token text in the input (``<|im_start|>``) is matched whole, as transformers does.
  """

  def __init__(self, engine: tokenizers.Tokenizer, *, eos_id: int, pad_id: int | None = None,
               bos_id: int | None = None, unk_id: int | None = None, chat_template: str | None,
               end_of_turn_ids: Iterable[int] = (), source: str = "") -> None:
    engine.no_padding()
    engine.no_truncation()
    self._engine = engine
    self.vocab_size: int = engine.get_vocab_size(with_added_tokens=True)
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id), ("bos_id", bos_id),
                        ("unk_id", unk_id)):
      if value is not None and not 0 <= value < self.vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size}).")
    self.eos_id: int = int(eos_id)
    self.pad_id: int = int(pad_id) if pad_id is not None else self.eos_id
    self.bos_id: int | None = None if bos_id is None else int(bos_id)
    self.unk_id: int | None = None if unk_id is None else int(unk_id)
    self.chat_template: str = chat_template or ""
    self.source = source
    added = engine.get_added_tokens_decoder()
    self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
    ends = [self.eos_id] + [int(i) for i in end_of_turn_ids]
    ends += [i for text in _END_OF_TURN_TEXTS
             if (i := engine.token_to_id(text)) is not None and i in self.special_ids]
    self.end_of_turn_ids: tuple[int, ...] = tuple(dict.fromkeys(ends))
    self._token_texts: list[str] | None = None
    self._chat: ChatTemplate | None = None
    self._template_kwargs = {
        name: self.id_to_token(i) for name, i in (
            ("bos_token", self.bos_id), ("eos_token", self.eos_id),
            ("unk_token", self.unk_id), ("pad_token", self.pad_id)) if i is not None}

  def __repr__(self) -> str:
    return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id},"
            f" pad_id={self.pad_id}, bos_id={self.bos_id}, end_of_turn_ids={self.end_of_turn_ids})")

  @property
  def engine(self) -> tokenizers.Tokenizer:
    """The underlying `tokenizers.Tokenizer` (no padding, no truncation, no post-processing)."""
    return self._engine

  # --- construction ---

  @classmethod
  def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
    """Build the tokenizer from a GGUF file's metadata (reads no tensor data)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"GGUF file not found: {path!r}")
    from subliminal_jax.weights.gguf_file import GGUFFile  # local: only this source needs it

    fields = GGUFFile(path).fields  # a ValueError naming the file if it is not a complete GGUF

    engine = gguf_vocab.engine_from_gguf(fields, where=path)
    chat_template = fields.get("tokenizer.chat_template")
    if gguf_vocab.is_gemma_sentencepiece(fields):
      # Gemma GGUFs often omit the template; this is the one Google ships with Gemma 3.
      chat_template = chat_template or GEMMA3_CHAT_TEMPLATE
    return cls(engine,
               eos_id=fields.get("tokenizer.ggml.eos_token_id"),
               pad_id=fields.get("tokenizer.ggml.padding_token_id"),
               bos_id=fields.get("tokenizer.ggml.bos_token_id"),
               unk_id=fields.get("tokenizer.ggml.unknown_token_id"),
               chat_template=chat_template,
               end_of_turn_ids=[i for key in ("tokenizer.ggml.eot_token_id",
                                              "tokenizer.ggml.eom_token_id")
                                if (i := fields.get(key)) is not None],
               source=path)

  @classmethod
  def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
    """Load a Hugging Face tokenizer directory (``tokenizer.json`` and its configs)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"Tokenizer directory not found: {path!r}")
    config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
    special_map = _read_json(os.path.join(path, "special_tokens_map.json")) or {}
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer_file):
      engine = tokenizers.Tokenizer.from_file(tokenizer_file)
    else:
      engine = _convert_with_transformers(path)

    def special_id(name: str) -> int | None:
      token = config.get(name, special_map.get(name))
      if isinstance(token, Mapping):
        token = token.get("content")
      if token is None:
        return None
      token_id = engine.token_to_id(token)
      if token_id is None:
        raise ValueError(f"{path!r}: {name} {token!r} is not in the vocabulary.")
      return token_id

    eos_id = special_id("eos_token")
    if eos_id is None:
      raise ValueError(f"{path!r}: no eos_token in tokenizer_config.json or special_tokens_map.json.")
    generation = _read_json(os.path.join(path, "generation_config.json")) or {}
    generation_eos = generation.get("eos_token_id")
    if isinstance(generation_eos, int):
      generation_eos = [generation_eos]
    return cls(engine, eos_id=eos_id, pad_id=special_id("pad_token"),
               bos_id=special_id("bos_token"), unk_id=special_id("unk_token"),
               chat_template=_read_chat_template(path, config),
               end_of_turn_ids=generation_eos or (), source=path)

  # --- encoding and decoding ---

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``; no special tokens are added."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}: {text!r:.80}")
    return self._engine.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """``encode`` of each text (in parallel inside `tokenizers`)."""
    texts = _check_texts(texts)
    return [e.ids for e in self._engine.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of ``ids`` (byte-level mapping undone; invalid UTF-8 becomes U+FFFD)."""
    array = np.asarray(ids, dtype=np.int64)
    if array.ndim > 1:
      raise ValueError(f"decode takes one sequence of ids, got an array of shape {array.shape}; "
                       "decode each row.")
    ids = array.reshape(-1).tolist()
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}).")
    return self._engine.decode(ids, skip_special_tokens=skip_special_tokens)

  def id_to_token(self, token_id: int) -> str:
    """The vocabulary entry (byte-level spelling, e.g. 'Ġ1') of one id."""
    token = self._engine.id_to_token(int(token_id))
    if token is None:
      raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size}).")
    return token

  def token_bytes(self) -> list[bytes]:
    """Exact bytes of each id on its own; special tokens give their UTF-8 text."""
    added = self._engine.get_added_tokens_decoder()
    if getattr(self._engine.model, "byte_fallback", False):
      return [gguf_vocab.sentencepiece_token_bytes(self._engine.id_to_token(i) or "", i in added)
              for i in range(self.vocab_size)]
    to_byte = gguf_vocab.unicode_to_byte()
    out = []
    for i in range(self.vocab_size):
      token = self._engine.id_to_token(i)
      if i in added or token is None or any(ch not in to_byte for ch in token):
        # Added tokens are stored as plain text, not in the byte alphabet.
        out.append((token or "").encode("utf-8"))
      else:
        out.append(bytes(to_byte[ch] for ch in token))
    return out

  def token_texts(self) -> list[str]:
    """Decoded text of each id on its own: ``'Ġ1'`` -> ``' 1'``, ``'Ċ'`` -> ``'\\n'``.

    A token holding part of a multi-byte UTF-8 character decodes to U+FFFD (as
    ``decode([id])``); special tokens give their literal text (e.g. ``'<|im_end|>'``), see
    ``special_ids``. Cached; the list is shared, do not modify it.
    """
    if self._token_texts is None:
      self._token_texts = [b.decode("utf-8", errors="replace") for b in self.token_bytes()]
    return self._token_texts

  def batch_encode(self, texts: Sequence[str], padding_side: str = "left",
                   max_length: int | None = None, *, truncation: str | None = None,
                   pad_to_multiple_of: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode and pad: ``(ids int32 [B, T], mask bool [B, T])``, pad id ``pad_id``.

    T is the longest row (rounded up to ``pad_to_multiple_of``). A row longer than ``max_length``
    is an error unless ``truncation`` says which end to cut: "right" keeps the first
    ``max_length`` tokens, "left" the last.
    """
    if padding_side not in PADDING_SIDES:
      raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}.")
    if truncation is not None and truncation not in TRUNCATION_SIDES:
      raise ValueError(f"truncation must be None or one of {TRUNCATION_SIDES}, got {truncation!r}.")
    if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 1):
      raise ValueError(f"max_length must be a positive int or None, got {max_length!r}.")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
      raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}.")
    rows = self.encode_batch(texts)
    if max_length is not None:
      for index, row in enumerate(rows):
        if len(row) > max_length:
          if truncation is None:
            raise ValueError(
                f"text {index} is {len(row)} tokens, longer than max_length={max_length}; pass "
                "truncation='right' or 'left' to cut it, or a larger max_length.")
          rows[index] = row[:max_length] if truncation == "right" else row[len(row) - max_length:]
    return padding.pad_rows(rows, pad_value=self.pad_id, side=padding_side,
                            multiple=pad_to_multiple_of or 1)

  # --- chat ---

  def render_chat(self, messages: Sequence[Mapping[str, Any]], *, system: SystemTurn = SystemTurn(),
                  add_generation_prompt: bool = True) -> str:
    """The chat as the model's template writes it, with the system turn ``system`` (default: none
    at all, even where the template would insert its default; see :class:`SystemTurn`).
    ``messages`` must not contain a "system" message; pass the text as ``SystemTurn(text)``.
    """
    if not isinstance(system, SystemTurn):
      raise TypeError(f"system must be a SystemTurn (SystemTurn(text) for a system prompt, "
                      f"SystemTurn.parse(spec) for a config's spelling), got "
                      f"{type(system).__name__}: {system!r:.80}")
    messages = check_messages(messages)
    if not self.chat_template:
      raise ValueError(f"Tokenizer from {self.source!r} has no chat template.")
    return self._chat_renderer().render(messages, system=system,
                                        add_generation_prompt=add_generation_prompt)

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, system: SystemTurn = SystemTurn(),
                  add_generation_prompt: bool = True) -> list[int]:
    """``encode(render_chat(...))``."""
    return self.encode(self.render_chat(messages, system=system,
                                        add_generation_prompt=add_generation_prompt))

  @property
  def default_system_block(self) -> str:
    """The text the template inserts when no system message is given ("" if it inserts none)."""
    return self._chat_renderer().default_system_block

  def _chat_renderer(self) -> ChatTemplate:
    # Keyed by the text: chat_template is a public attribute, and a new one is probed afresh.
    if self._chat is None or self._chat.source != self.chat_template:
      self._chat = ChatTemplate(self.chat_template, self._template_kwargs, where=self.source)
    return self._chat

  # --- saving ---

  def save(self, out_dir: str | os.PathLike) -> None:
    """Write tokenizer.json, tokenizer_config.json (chat template included), special_tokens_map.json
    and chat_template.jinja, loadable by ``transformers.AutoTokenizer.from_pretrained(out_dir)``
    and by :meth:`from_hf_dir`."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    self._engine.save(os.path.join(out_dir, "tokenizer.json"))
    special = {name: self.id_to_token(i) for name, i in (
        ("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.unk_id),
        ("pad_token", self.pad_id)) if i is not None}
    added = self._engine.get_added_tokens_decoder()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(added.items())},
        **special,
    }
    if self.chat_template:
      config["chat_template"] = self.chat_template
      with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(self.chat_template)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


# --- helpers -------------------------------------------------------------------------------------

def _convert_with_transformers(path: str) -> tokenizers.Tokenizer:
  """A directory without tokenizer.json (vocab.json/merges.txt, sentencepiece): let transformers
  convert it. Imports transformers, which imports torch where installed."""
  try:
    from transformers import AutoTokenizer
  except ImportError as e:
    raise ImportError(f"{path!r} has no tokenizer.json; converting its tokenizer files needs "
                      "transformers: pip install 'subliminal-jax[transformers]'") from e

  hf = AutoTokenizer.from_pretrained(path)
  backend = getattr(hf, "backend_tokenizer", None)
  if backend is None:
    raise ValueError(f"{path!r}: transformers gave a tokenizer with no fast backend ({type(hf)}).")
  return tokenizers.Tokenizer.from_str(backend.to_str())


def _read_chat_template(path: str, config: Mapping[str, Any]) -> str | None:
  jinja_file = os.path.join(path, "chat_template.jinja")
  if os.path.isfile(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      return f.read()
  template = (_read_json(os.path.join(path, "chat_template.json")) or {}).get("chat_template")
  if template is None:
    template = config.get("chat_template")
  if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
    named = {entry["name"]: entry["template"] for entry in template}
    template = named.get("default")
  return template


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, data: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, ensure_ascii=False)
    f.write("\n")


def _check_texts(texts: Sequence[str]) -> list[str]:
  if isinstance(texts, str):
    raise TypeError("batch_encode expects a sequence of str, got a single str; wrap it in a list.")
  texts = list(texts)
  if not texts:
    raise ValueError("batch_encode needs at least one text, got an empty sequence.")
  for index, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"text {index} is a {type(text).__name__}, expected str: {text!r:.80}")
  return texts
