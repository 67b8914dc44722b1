"""Malformed model files, fuzzed (hypothesis): GGUF headers, safetensors headers and chat templates.

Each loader must answer a bad file with a ValueError naming it, and never crash the process
(another exception type, a RecursionError), allocate far more than the file implies, or loop
(hypothesis' per-example deadline).
"""

import json
import struct
import tracemalloc

import gguf
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gguf_writing
from subliminal_jax import files
from subliminal_jax.tokenizer.chat_template import ChatTemplate, SystemTurn
from subliminal_jax.weights import safetensors_dir
from subliminal_jax.weights.gguf_file import GGUFFile

FUZZ = settings(max_examples=60, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _small_gguf(path) -> bytes:
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_uint32("llama.block_count", 2)
  writer.add_array("tokenizer.ggml.tokens", ["a", "b", "<s>"])
  writer.add_string("tokenizer.chat_template", "{{ messages[0]['content'] }}")
  gguf_writing.add_tensor(writer, "token_embd.weight", np.ones((3, 4), np.float32))
  gguf_writing.finish(writer, path)
  return path.read_bytes()


def _parse_bounded(path, size: int) -> None:
  """GGUFFile(path) opens or raises ValueError naming the file; its Python allocations stay within
  a small multiple of the file's size (no count read from the header is trusted beyond it)."""
  tracemalloc.start()
  try:
    GGUFFile(path)
  except ValueError as e:
    assert str(path) in str(e)
  finally:
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
  assert peak < 64 * size + (1 << 20), f"parsing a {size}-byte file allocated {peak} bytes"


@FUZZ
@given(data=st.data())
def test_gguf_with_bytes_overwritten_or_cut_is_refused_cleanly(tmp_path, data):
  original = _small_gguf(tmp_path / "good.gguf")
  corrupt = bytearray(original)
  # Most of the header is in the first few hundred bytes: counts, lengths, type ids, offsets.
  for _ in range(data.draw(st.integers(1, 6))):
    at = data.draw(st.integers(0, min(len(corrupt), 400) - 1))
    corrupt[at] = data.draw(st.integers(0, 255))
  corrupt = corrupt[:data.draw(st.integers(0, len(corrupt)))]
  path = tmp_path / "fuzzed.gguf"
  path.write_bytes(bytes(corrupt))
  _parse_bounded(path, len(corrupt))


@FUZZ
@given(counts=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
       tail=st.binary(max_size=64))
def test_gguf_header_counts_past_the_file_are_refused(tmp_path, counts, tail):
  path = tmp_path / "counts.gguf"
  data = b"GGUF" + struct.pack("<IQQ", 3, *counts) + tail
  path.write_bytes(data)
  _parse_bounded(path, len(data))


def _gguf_kv(key: str, kind: int, payload: bytes) -> bytes:
  return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


def test_gguf_deeply_nested_arrays_and_bad_alignment_are_refused(tmp_path):
  array = gguf.GGUFValueType.ARRAY
  nested = b"".join(struct.pack("<IQ", array, 1) for _ in range(5000))
  cases = {
      "nested": _gguf_kv("x", array, nested),  # 5000 levels: would be a RecursionError
      "zero_alignment": _gguf_kv("general.alignment", gguf.GGUFValueType.UINT32,
                                 struct.pack("<I", 0)),
      "string_alignment": _gguf_kv("general.alignment", gguf.GGUFValueType.STRING,
                                   struct.pack("<Q", 2) + b"32"),
  }
  for name, kv in cases.items():
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv)
    with pytest.raises(ValueError, match=f"{name}.gguf.*(nested more than|general.alignment)"):
      GGUFFile(path)


_DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "XX", ""]


@FUZZ
@given(entries=st.dictionaries(
    st.text(min_size=1, max_size=8), st.fixed_dictionaries({
        "dtype": st.sampled_from(_DTYPES),
        "shape": st.lists(st.integers(-2, 2**40), max_size=4),
        "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3)}),
    max_size=3),
    header_length=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    body=st.binary(max_size=64))
def test_safetensors_headers_fuzzed_are_refused_cleanly(tmp_path, entries, header_length, body):
  header = json.dumps(entries).encode()
  length = len(header) if header_length is None else header_length
  path = tmp_path / "fuzzed.safetensors"
  path.write_bytes(struct.pack("<Q", length) + header + body)
  for read in (files.read_safetensors, safetensors_dir._open):
    tracemalloc.start()
    try:
      read(str(path))
    except ValueError as e:
      assert "fuzzed.safetensors" in str(e)
    finally:
      _, peak = tracemalloc.get_traced_memory()
      tracemalloc.stop()
    assert peak < (1 << 20)


def test_a_valid_safetensors_file_still_reads(tmp_path):
  path = tmp_path / "ok.safetensors"
  safetensors.numpy.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(path))
  np.testing.assert_array_equal(files.read_safetensors(path)["w"], np.arange(6).reshape(2, 3))


_TEMPLATE_PIECES = ["{{ ", " }}", "{% ", " %}", "{%- ", " -%}", "for m in messages", "endfor",
                    "if ", "endif", "else", "messages", "[0]", "['content']", "['role']",
                    "m['content']", " + ", "'x'", "bos_token", "raise_exception('no')", "range(",
                    ")", "loop.index0", " | tojson", " | trim", "set x = ", "x", "macro f()",
                    "endmacro", "f()", "1/0", "[-1]", "\n", "<|im_start|>", "system", " is string",
                    "add_generation_prompt", "{#", "#}", "__class__", ".mro()", "None", "1e308*10"]


@FUZZ
@given(pieces=st.lists(st.sampled_from(_TEMPLATE_PIECES), max_size=24),
       system=st.sampled_from([SystemTurn(), SystemTurn("be brief"),
                               SystemTurn(template_default=True)]))
def test_chat_templates_fuzzed_render_or_are_refused_with_the_tokenizer_named(pieces, system):
  template = ChatTemplate("".join(pieces), {"bos_token": "<s>", "eos_token": "</s>"},
                          where="fuzzed-model")
  try:
    text = template.render([{"role": "user", "content": "hi"}], system=system,
                           add_generation_prompt=True)
  except ValueError as e:
    assert "fuzzed-model" in str(e) or "chat template" in str(e)
  else:
    assert isinstance(text, str)


def test_a_recursive_chat_template_is_refused_not_a_crash():
  template = ChatTemplate("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", {}, where="loop-model")
  with pytest.raises(ValueError, match="loop-model.*RecursionError"):
    template.render([{"role": "user", "content": "hi"}], system=SystemTurn(template_default=True),
                    add_generation_prompt=True)
