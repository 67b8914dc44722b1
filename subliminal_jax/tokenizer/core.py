"""Text <-> token ids and chat rendering for the models we load, without torch or transformers.

One :class:`Tokenizer` wraps a `tokenizers` byte-level BPE engine plus what the rest of the project
needs around it: special ids (eos, pad, end-of-turn), a Jinja chat template rendered the way
transformers renders it, padded batches as numpy arrays, and each token's decoded text for the
constrained-decoding grammar.

Two sources:

* ``Tokenizer.from_gguf(path)`` builds the tokenizer from a GGUF file's metadata (vocabulary,
  merges, token types, special ids, chat template). The pre-tokenizer follows llama.cpp's
  ``tokenizer.ggml.pre``: for SmolLM2 ("smollm") each digit is split off before the GPT-2 regex,
  exactly as SmolLM2's own ``tokenizer.json`` does (transformers' GGUF loader does not do this and
  differs on whitespace runs before digits, e.g. "a  1"; see docs/tokenizer.md).
* ``Tokenizer.from_hf_dir(path)`` reads a Hugging Face tokenizer directory (``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``, ``chat_template.jinja``). Only a
  directory without ``tokenizer.json`` falls back to ``transformers.AutoTokenizer`` to convert it
  (transformers imports torch where torch is installed).

The system turn is always explicit (the paper's pitfall: SmolLM2's and Qwen2.5's templates insert a
default system prompt when none is given): ``render_chat(..., system="...")`` writes that system
turn; ``system=None`` writes NO system turn at all; ``template_default=True`` keeps the template's
own default. :func:`system_choice` names the choice for results files, and :func:`system_turn`
reads the same names from a config ("none", "template_default" or the text itself).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from subliminal_jax import padding

# GGUF token types (llama.cpp's llama_token_type).
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# Pre-tokenizer split rules, keyed by GGUF ``tokenizer.ggml.pre``. The SmolLM2 family is
# llama.cpp's {"\p{N}", GPT-2 regex}, i.e. tokenizers' Digits(individual) then the GPT-2 regex.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2 = ("gpt2", "default", "mpt", "olmo", "jais")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_REGEX = {
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
}
SUPPORTED_GGUF_PRE = tuple(sorted(set(_DIGITS_THEN_GPT2 + _GPT2 + tuple(_SPLIT_REGEX))))

# Texts of tokens that end an assistant turn in the chat formats we know (ChatML, Llama 3, Gemma,
# Phi-3); those present as special tokens join eos in ``end_of_turn_ids``.
_END_OF_TURN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>",
                      "<end_of_turn>", "<|end|>")

# The chat template Google ships with Gemma 3 (tokenizer_config.json of google/gemma-3-*): no
# system turn of its own; a system message is folded into the first user turn as "system\n\nuser".
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

PADDING_SIDES = padding.PADDING_SIDES
TRUNCATION_SIDES = ("left", "right")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces

# Stand-ins used to locate a template's system block. Plain letters, so no template filter
# (trim, escaping) alters them.
_SENTINEL_SYSTEM = "SubliminalSentinelSystemTurnQx7"
_SENTINEL_USER = "SubliminalSentinelUserTurnZk4"


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (byte-level BPE's alphabet)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  mapping, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      mapping[byte] = chr(byte)
    else:
      mapping[byte] = chr(256 + extra)
      extra += 1
  return mapping


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
  return {char: byte for byte, char in _byte_to_unicode().items()}


def system_turn(spec: str) -> dict[str, Any]:
  """``render_chat``'s system arguments (``system``, ``template_default``) from a config's
  spelling of the system turn, the names :func:`system_choice` records: "none" (no system turn),
  "template_default" (the template's own default prompt) or any other text (that system prompt,
  verbatim)."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"a system turn is 'none', 'template_default' or a non-empty system prompt, "
                     f"got {spec!r}")
  if spec == "none":
    return dict(system=None, template_default=False)
  if spec == "template_default":
    return dict(system=None, template_default=True)
  if spec == "default":  # the earlier spelling: as text it would silently become a system prompt
    raise ValueError("the system turn 'default' is spelled 'template_default' (the chat "
                     "template's own default prompt)")
  return dict(system=spec, template_default=False)


def system_choice(system: str | None, template_default: bool = False) -> str:
  """A short, stable name for the system-turn choice, to record in results.

  "none" (no system turn), "template_default" (the template's own default system prompt) or
  "custom:<first 8 hex of sha256(system)>".
  """
  _check_system_args(system, template_default)
  if template_default:
    return "template_default"
  if system is None:
    return "none"
  return "custom:" + hashlib.sha256(system.encode("utf-8")).hexdigest()[:8]


def _check_system_args(system: str | None, template_default: bool) -> None:
  if system is not None and not isinstance(system, str):
    raise TypeError(f"system must be a str or None, got {type(system).__name__}: {system!r}")
  if template_default and system is not None:
    raise ValueError(
        "Pass either system=<text> or template_default=True, not both (got system="
        f"{system[:60]!r} with template_default=True).")


# --- chat templates ------------------------------------------------------------------------------

class _GenerationBlock(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}`` (used by some templates): renders its body as is."""

  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

  def _render_body(self, caller: Any) -> str:
    return caller()


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
  # As transformers: plain json.dumps (Jinja's own tojson escapes HTML characters).
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
  """The template compiled in the sandbox transformers uses, with the same filters and globals."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(source)


# --- the tokenizer -------------------------------------------------------------------------------

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
    self._layout: tuple[str, tuple[str, str, str | None, str | None]] | None = None
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

    def value(key: str, default: Any = None) -> Any:
      return fields.get(key, default)

    model_type = value("tokenizer.ggml.model")
    architecture = value("general.architecture")
    tokens: list[str] = value("tokenizer.ggml.tokens")
    token_types = value("tokenizer.ggml.token_type")
    if not tokens:
      raise ValueError(f"{path!r}: GGUF metadata lacks tokenizer.ggml.tokens.")
    token_types = [1] * len(tokens) if token_types is None else list(token_types)
    chat_template = value("tokenizer.chat_template")
    if model_type == "gpt2":
      merges: list[str] = value("tokenizer.ggml.merges")
      if not merges:
        raise ValueError(f"{path!r}: GGUF metadata lacks tokenizer.ggml.merges.")
      pre = value("tokenizer.ggml.pre", "default")
      engine = _byte_level_bpe(tokens, merges, token_types, pre, where=path)
    elif model_type == "llama" and architecture == "gemma3":
      engine = _gemma_sentencepiece_bpe(tokens, token_types, where=path)
      # Gemma GGUFs often omit the template; this is the one Google ships with Gemma 3.
      chat_template = chat_template or GEMMA3_CHAT_TEMPLATE
    else:
      raise ValueError(f"{path!r}: tokenizer.ggml.model {model_type!r} of architecture "
                       f"{architecture!r} is not supported; supported: byte-level BPE ('gpt2'), and "
                       "SentencePiece ('llama') for architecture 'gemma3'.")
    return cls(engine,
               eos_id=value("tokenizer.ggml.eos_token_id"),
               pad_id=value("tokenizer.ggml.padding_token_id"),
               bos_id=value("tokenizer.ggml.bos_token_id"),
               unk_id=value("tokenizer.ggml.unknown_token_id"),
               chat_template=chat_template,
               end_of_turn_ids=[i for key in ("tokenizer.ggml.eot_token_id",
                                              "tokenizer.ggml.eom_token_id")
                                if (i := value(key)) is not None],
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
      return [_sentencepiece_token_bytes(self._engine.id_to_token(i) or "", i in added)
              for i in range(self.vocab_size)]
    to_byte = _unicode_to_byte()
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

  def render_chat(self, messages: Sequence[Mapping[str, Any]], *, system: str | None = None,
                  template_default: bool = False, add_generation_prompt: bool = True) -> str:
    """The chat as the model's template writes it, with the system turn under explicit control.

    ``system`` given: that system turn. ``system=None`` and ``template_default=False``: no system
    turn at all, even where the template would insert its default. ``template_default=True``:
    whatever the template does with no system message (its default system prompt, if any).
    ``messages`` must not contain a "system" message; pass the text as ``system``.
    """
    _check_system_args(system, template_default)
    messages = _check_messages(messages)
    if not self.chat_template:
      raise ValueError(f"Tokenizer from {self.source!r} has no chat template.")
    if template_default:
      return self._render(messages, add_generation_prompt)
    if system is not None:
      return self._render([{"role": "system", "content": system}] + messages,
                          add_generation_prompt)
    return self._render_without_system(messages, add_generation_prompt)

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, system: str | None = None,
                  template_default: bool = False, add_generation_prompt: bool = True) -> list[int]:
    """``encode(render_chat(...))``."""
    return self.encode(self.render_chat(messages, system=system, template_default=template_default,
                                        add_generation_prompt=add_generation_prompt))

  @property
  def default_system_block(self) -> str:
    """The text the template inserts when no system message is given ("" if it inserts none)."""
    return self._system_layout()[1]

  def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
    template = _compile_template(self.chat_template)
    return template.render(messages=messages, tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt, **self._template_kwargs)

  def _system_layout(self) -> tuple[str, str, str | None, str | None]:
    """(lead-in, default system block, sentinel system block, folded separator) of this template.

    Found by construction from three probe renders: [system S], [system S, user U], [user U]. The
    user turn is what [system S, user U] adds after [system S]; what [user U] writes before that
    user turn is the default system block, unless it is also a prefix of [system S] (e.g. a BOS
    text written before every chat): then it is a lead-in kept in every rendering, and the
    template has no default.

    Templates that fold the system text into the first user turn (Gemma: "S\n\nU" inside one
    user turn; [system S] alone renders no S) give ``("", "", None, separator)``: with no default
    system text, [user U] is [system S, user U] with "S" + separator cut out.
    """
    if self._layout is None or self._layout[0] != self.chat_template:
      system = {"role": "system", "content": _SENTINEL_SYSTEM}
      user = {"role": "user", "content": _SENTINEL_USER}
      try:
        system_only = self._render([system], False)
        system_user = self._render([system, user], False)
        user_only = self._render([user], False)
      except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"Cannot locate the system turn of the chat template of {self.source!r}: "
                         f"rendering a probe conversation failed: {e}") from e
      folded = _folded_system_separator(system_only, system_user, user_only)
      if folded is not None:
        self._layout = (self.chat_template, ("", "", None, folded))
        return self._layout[1]
      user_turn = system_user[len(system_only):]
      if (not system_user.startswith(system_only) or _SENTINEL_SYSTEM not in system_only
          or not user_turn or not user_only.endswith(user_turn)):
        raise ValueError(f"The chat template of {self.source!r} does not write the system turn as a "
                         "separate leading block; cannot render it without a system turn.")
      before_user = user_only[:len(user_only) - len(user_turn)]
      if system_only.startswith(before_user):
        layout = (before_user, "", system_only[len(before_user):], None)
      else:
        layout = ("", before_user, system_only, None)
      self._layout = (self.chat_template, layout)  # keyed: chat_template is a public attribute
    return self._layout[1]

  def _render_without_system(self, messages: list[dict], add_generation_prompt: bool) -> str:
    lead, default_block, sentinel_block, folded = self._system_layout()
    rendered = self._render(messages, add_generation_prompt)
    if folded is not None:
      # Cross-check: a sentinel system text, folded in and then cut out, gives the same text.
      with_sentinel = self._render([{"role": "system", "content": _SENTINEL_SYSTEM}] + messages,
                                   add_generation_prompt)
      if with_sentinel.replace(_SENTINEL_SYSTEM + folded, "", 1) != rendered:
        raise ValueError("Rendering without a system turn is ambiguous for this chat template: the "
                         "system text is not folded into the first user turn the same way here.")
      return rendered
    if not rendered.startswith(lead + default_block):
      raise ValueError("The chat template's default system block does not lead the rendered chat;"
                       " cannot remove it.")
    rendered = lead + rendered[len(lead) + len(default_block):]
    # Cross-check by a second construction: a sentinel system turn, then that turn cut out.
    with_sentinel = self._render([{"role": "system", "content": _SENTINEL_SYSTEM}] + messages,
                                 add_generation_prompt)
    if (not with_sentinel.startswith(lead + sentinel_block)
        or lead + with_sentinel[len(lead) + len(sentinel_block):] != rendered):
      raise ValueError("Rendering without a system turn is ambiguous for this chat template: removing"
                       " the default block and removing an explicit system turn disagree.")
    return rendered

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

def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                    pre: str, where: str) -> tokenizers.Tokenizer:
  """A byte-level BPE `tokenizers.Tokenizer` from GGUF vocabulary arrays."""
  alphabet = set(_byte_to_unicode().values())
  to_unicode = _byte_to_unicode()
  # Tokens outside the byte alphabet (rare llama.cpp spellings) are respelled byte by byte, as
  # transformers' GGUF loader does, so vocabulary and merges agree.
  vocab = {}
  for index, token in enumerate(tokens):
    if not set(token) <= alphabet:
      token = "".join(to_unicode[b] for b in token.encode("utf-8"))
    vocab.setdefault(token, index)
  merge_pairs = []
  for merge in merges:
    parts = merge.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{where!r}: malformed merge {merge!r} (expected 'left right').")
    merge_pairs.append((parts[0], parts[1]))
  engine = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False,
                                           byte_fallback=False))
  engine.pre_tokenizer = _gguf_pre_tokenizer(pre, where)
  engine.decoder = decoders.ByteLevel()
  control = [AddedToken(t, special=True, normalized=False)
             for t, kind in zip(tokens, token_types)
             if kind == _GGUF_CONTROL and set(t) <= alphabet]
  user_defined = [AddedToken(t, special=False, normalized=False)
                  for t, kind in zip(tokens, token_types)
                  if kind == _GGUF_USER_DEFINED and t in vocab]
  engine.add_special_tokens(control)
  if user_defined:
    engine.add_tokens(user_defined)
  if engine.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise ValueError(f"{where!r}: built a vocabulary of {engine.get_vocab_size(True)} tokens from "
                     f"{len(tokens)} GGUF tokens (duplicate or unmappable entries).")
  return engine


def _gemma_sentencepiece_bpe(tokens: Sequence[str], token_types: Sequence[int],
                             where: str) -> tokenizers.Tokenizer:
  """Gemma's SentencePiece BPE from GGUF vocabulary arrays, built as Gemma's own tokenizer.json
  and transformers' GGUF loader (``gemma_tokenizer``) build it.

  Spaces become "▁" (normalizer), no prefix space, bytes missing from the vocabulary fall back to
  "<0xNN>" pieces. The file lists no merges; they are recovered from the vocabulary: every split
  of a token into two tokens, ranked by the token's position in the file (Gemma's merge order;
  its scores do not follow it), then by longer left part. Runs of spaces are stored as spaces but
  spelled with "▁" by the model, so those tokens are renamed first.
  """
  spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
  vocab = {token: index for index, token in enumerate(spelled)}
  merges = []
  for token, index in vocab.items():
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in vocab and right in vocab:
        merges.append((index, -len(left), left, right))
  merges.sort(key=lambda m: (m[0], m[1]))
  engine = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=[(left, right) for _, _, left, right in merges], unk_token="<unk>",
      fuse_unk=True, byte_fallback=True))
  engine.normalizer = normalizers.Replace(" ", "\u2581")
  engine.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
  engine.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                      decoders.Fuse()])
  engine.add_special_tokens([AddedToken(t, special=True, normalized=False)
                             for t, kind in zip(tokens, token_types) if kind == _GGUF_CONTROL])
  user_defined = [AddedToken(t, special=False, normalized=False)
                  for t, kind in zip(tokens, token_types) if kind == _GGUF_USER_DEFINED and t in vocab]
  if user_defined:  # "\n", "\n\n", ...: matched whole (the renamed runs of spaces are not)
    engine.add_tokens(user_defined)
  if engine.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise ValueError(f"{where!r}: built a vocabulary of {engine.get_vocab_size(True)} tokens from "
                     f"{len(tokens)} GGUF tokens (duplicate entries).")
  return engine


def _sentencepiece_token_bytes(token: str, added: bool) -> bytes:
  """A SentencePiece piece's bytes: "▁" is a space, "<0xNN>" one raw byte; added tokens as text."""
  if not added and (byte := _BYTE_TOKEN.fullmatch(token)):
    return bytes([int(byte.group(1), 16)])
  return (token if added else token.replace("\u2581", " ")).encode("utf-8")


def _gguf_pre_tokenizer(pre: str, where: str) -> pre_tokenizers.PreTokenizer:
  if pre in _DIGITS_THEN_GPT2:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  if pre in _GPT2:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre in _SPLIT_REGEX:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
  raise ValueError(f"{where!r}: unknown GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: "
                   f"{', '.join(SUPPORTED_GGUF_PRE)}.")


def _folded_system_separator(system_only: str, system_user: str, user_only: str) -> str | None:
  """The text between the system and the user text when a template folds the system text into the
  first user turn and has no default system text; None otherwise (see ``_system_layout``)."""
  if _SENTINEL_SYSTEM in system_only or _SENTINEL_SYSTEM not in system_user:
    return None
  start = system_user.index(_SENTINEL_SYSTEM)
  end = system_user.find(_SENTINEL_USER, start)
  if end < 0:
    return None
  separator = system_user[start + len(_SENTINEL_SYSTEM):end]
  if system_user[:start] + system_user[end:] != user_only:
    return None
  return separator


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


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
  if isinstance(messages, (str, Mapping)):
    raise TypeError("messages must be a list of {'role', 'content'} dicts, got "
                    f"{type(messages).__name__}.")
  out = []
  for index, message in enumerate(messages):
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
      raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r:.120}")
    if message["role"] == "system":
      raise ValueError(f"message {index} has role 'system'; pass the system text as render_chat("
                       "system=...) so the system turn stays explicit.")
    if not isinstance(message["content"], str):
      raise TypeError(f"message {index} content must be a str, got {type(message['content']).__name__}.")
    out.append({k: v for k, v in message.items() if v is not None})
  return out
