"""The `tokenizers` engine of a GGUF file, built from its metadata (vocabulary, merges, types).

Two kinds: byte-level BPE (``tokenizer.ggml.model == "gpt2"``), whose pre-tokenizer follows
llama.cpp's ``tokenizer.ggml.pre`` (for SmolLM2, "smollm", each digit is split off before the GPT-2
regex, exactly as SmolLM2's own ``tokenizer.json`` does; transformers' GGUF loader does not and
differs on whitespace runs before digits, e.g. "a  1"; see docs/tokenizer.md), and Gemma 3's
SentencePiece BPE (``"llama"`` with architecture gemma3), whose merges are rebuilt from the
vocabulary. Also the two alphabets' inverses, so a token's exact bytes can be recovered.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

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

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
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
def unicode_to_byte() -> dict[str, int]:
  """The inverse of :func:`byte_to_unicode`."""
  return {char: byte for byte, char in byte_to_unicode().items()}


def sentencepiece_token_bytes(token: str, added: bool) -> bytes:
  """A SentencePiece piece's bytes: "▁" is a space, "<0xNN>" one raw byte; added tokens as text."""
  if not added and (byte := _BYTE_TOKEN.fullmatch(token)):
    return bytes([int(byte.group(1), 16)])
  return (token if added else token.replace("\u2581", " ")).encode("utf-8")


def is_gemma_sentencepiece(fields: Mapping[str, Any]) -> bool:
  """Whether GGUF metadata ``fields`` describe Gemma 3's SentencePiece tokenizer."""
  return (fields.get("tokenizer.ggml.model") == "llama"
          and fields.get("general.architecture") == "gemma3")


def engine_from_gguf(fields: Mapping[str, Any], where: str) -> tokenizers.Tokenizer:
  """The `tokenizers.Tokenizer` GGUF metadata ``fields`` describe; ``where`` names the file in
  errors. Byte-level BPE and Gemma 3's SentencePiece; anything else is an error naming them."""
  model_type = fields.get("tokenizer.ggml.model")
  tokens: list[str] = fields.get("tokenizer.ggml.tokens")
  token_types = fields.get("tokenizer.ggml.token_type")
  if not tokens:
    raise ValueError(f"{where!r}: GGUF metadata lacks tokenizer.ggml.tokens.")
  token_types = [1] * len(tokens) if token_types is None else list(token_types)
  if model_type == "gpt2":
    merges: list[str] = fields.get("tokenizer.ggml.merges")
    if not merges:
      raise ValueError(f"{where!r}: GGUF metadata lacks tokenizer.ggml.merges.")
    pre = fields.get("tokenizer.ggml.pre", "default")
    return _byte_level_bpe(tokens, merges, token_types, pre, where=where)
  if is_gemma_sentencepiece(fields):
    return _gemma_sentencepiece_bpe(tokens, token_types, where=where)
  architecture = fields.get("general.architecture")
  raise ValueError(f"{where!r}: tokenizer.ggml.model {model_type!r} of architecture "
                   f"{architecture!r} is not supported; supported: byte-level BPE ('gpt2'), and "
                   "SentencePiece ('llama') for architecture 'gemma3'.")


def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                    pre: str, where: str) -> tokenizers.Tokenizer:
  """A byte-level BPE `tokenizers.Tokenizer` from GGUF vocabulary arrays."""
  alphabet = set(byte_to_unicode().values())
  to_unicode = byte_to_unicode()
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
