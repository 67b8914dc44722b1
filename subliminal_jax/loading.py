"""One entry point for a model, its tokenizer and config: ``load(name | HF dir | .gguf)``.

``load`` picks the reader from the source (a model shipped in an installed package, a Hugging Face
safetensors directory, or a GGUF file), checks every tensor's shape against the config before reading data,
builds the model with each parameter placed directly in its sharding when a mesh is given, and
fingerprints the weights so that experiment stages can tell whether their base model changed.
``load(source, adapter=dir)`` attaches a PEFT LoRA adapter directory's adapters to the base
(:func:`subliminal_jax.weights.peft.load_peft`), e.g. a published finetune to use as a teacher.
:func:`export_hf` writes a model back out as an HF directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from subliminal_jax import sharding
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.tokenizer import Tokenizer
from subliminal_jax.weights import embedded, hf_layout, peft
from subliminal_jax.weights.export import export_hf
from subliminal_jax.weights.gguf import GGUFReader
from subliminal_jax.weights.safetensors_dir import SafetensorsDir

__all__ = ["Loaded", "load", "export_hf", "fingerprint_files"]

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
TINY_RANDOM = "tiny-random"
# Files of an HF directory besides the weights that change what a loaded model does.
_HF_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
_HASH_CHUNK = 8 * 2**20
_file_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


@dataclasses.dataclass
class Loaded:
  """A loaded model with what belongs to it.

  ``tokenizer`` is None only for an HF directory that holds weights without tokenizer files.
  ``fingerprint`` is a sha256 hex digest of the weight (and config/tokenizer) files' bytes, the
  PEFT adapter's files if any and the dtype settings: equal fingerprints mean the same model with
  the same numerics. ``adapter`` is the absolute path of the PEFT adapter directory attached.
  """

  model: Transformer
  tokenizer: Tokenizer | None
  config: TransformerConfig
  source: str
  fingerprint: str
  adapter: str | None = None


def _file_digest(path: str) -> str:
  stat = os.stat(path)
  key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
  if key not in _file_digests:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=stat.st_size, unit="B", unit_scale=True, leave=False,
                                     desc=f"hashing {os.path.basename(path)}",
                                     disable=stat.st_size < 256 * 2**20) as bar:
      while chunk := f.read(_HASH_CHUNK):
        digest.update(chunk)
        bar.update(len(chunk))
    _file_digests[key] = digest.hexdigest()
  return _file_digests[key]


def fingerprint_files(files: list[str], **settings: Any) -> str:
  """sha256 over the files' contents (by base name, in name order) and ``settings``."""
  entries = sorted((os.path.basename(f), _file_digest(f)) for f in files)
  payload = json.dumps({"files": entries, "settings": settings}, sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()


def _source_kind(source: str) -> tuple[str, str]:
  """("gguf" | "hf", path) for a source string."""
  if source in embedded.EMBEDDED_NAMES:
    return "gguf", embedded.resolve(source)
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"model source {source!r} not found: expected an embedded name {list(embedded.EMBEDDED_NAMES)},"
        " an HF model directory (config.json + safetensors) or a .gguf file")
  if os.path.isdir(path):
    return "hf", path
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == _GGUF_MAGIC:
    return "gguf", path
  if path.endswith(".safetensors") or os.path.basename(path) == "config.json":
    raise ValueError(f"{source!r} is a file inside an HF model directory; pass the directory "
                     f"{os.path.dirname(os.path.abspath(path))!r} instead")
  raise ValueError(f"{source!r} is neither a GGUF file (magic {magic!r}, expected {_GGUF_MAGIC!r}) "
                   "nor an HF model directory")


def _hf_tokenizer(path: str) -> Tokenizer | None:
  if not any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
    log.warning("%s has no tokenizer files (tokenizer.json); Loaded.tokenizer is None", path)
    return None
  return Tokenizer.from_hf_dir(path)


def _tiny_random(source: str, dtype: str, param_dtype: str, mesh: Mesh | None, remat: str | bool
                 ) -> Loaded:
  """A 2-layer random model with SmolLM2's tokenizer, initialised from the seed after the colon:
  the whole pipeline in seconds (tests); "tiny-random:N" of another seed is another family."""
  init_seed = source[len(TINY_RANDOM) + 1:] or "0"
  if not init_seed.isdigit():
    raise ValueError(f"model {source!r}: expected {TINY_RANDOM!r} or '{TINY_RANDOM}:<seed>'")
  tokenizer = Tokenizer.from_gguf(embedded.smollm2_path())
  config = TransformerConfig(
      vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e5, tie_embeddings=True, dtype=dtype,
      param_dtype=param_dtype, remat=remat)
  model = Transformer(config, rngs=nnx.Rngs(int(init_seed)))
  if mesh is not None:
    sharding.shard_module(model, mesh)
  # 16 hex digits of the architecture and the seed (the weights follow from them).
  identity = json.dumps([TINY_RANDOM, config.to_hf(), int(init_seed)], sort_keys=True)
  return Loaded(model=model, tokenizer=tokenizer, config=config, source=source,
                fingerprint=hashlib.sha256(identity.encode()).hexdigest()[:16])


def _with_adapter(loaded: Loaded, adapter: str | os.PathLike) -> Loaded:
  """``loaded`` with a PEFT adapter directory's LoRA attached, fingerprinted with its files."""
  adapter = os.path.abspath(os.fspath(adapter))
  peft.load_peft(loaded.model, adapter)
  adapter_files = [os.path.join(adapter, n) for n in (peft.ADAPTER_CONFIG, peft.ADAPTER_WEIGHTS)]
  return dataclasses.replace(loaded, adapter=adapter,
                             fingerprint=fingerprint_files(adapter_files, base=loaded.fingerprint))


def load(source: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
         mesh: Mesh | None = None, remat: str | bool = "none",
         adapter: str | os.PathLike | None = None) -> Loaded:
  """Loads a model, its tokenizer and config.

  Args:
    source: ``"tiny-random"`` (a 2-layer random model for tests; ``"tiny-random:N"`` from seed
      N), ``"smollm2"`` (the embedded SmolLM2-135M-Instruct GGUF), ``"gemma3-270m"`` (the
      packaged gemma-3-270m base model, Q4_K_M), a path to an HF model directory (``config.json``
      + ``model.safetensors`` or a sharded index; model_type llama, qwen2, gemma3_text, or gemma3
      whose language model is read) or a path to a llama- or gemma3-architecture ``.gguf`` file.
    dtype: compute dtype of activations and matmuls (logits are float32 regardless).
    param_dtype: storage dtype of the parameters; defaults to ``dtype``.
    mesh: place every parameter directly in its sharding on this mesh (no full copy on one device).
    remat: what training's backward pass recomputes of each layer: "none", "dots" (all but the
      projections' outputs), "full", or "auto" ("dots" on CPU, where it is faster; "none"
      elsewhere). See ``models.transformer.REMAT_CHOICES``; True means "full".
    adapter: a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) whose
      adapters are attached to the loaded base (not merged: ``lora.merge_lora`` folds them in).

  Raises:
    FileNotFoundError: the source does not exist (or the embedded package is not installed).
    ValueError: unsupported architecture / model_type / tensor type, truncated or corrupt files,
      tensors whose shapes disagree with the config, an adapter :func:`peft.load_peft` refuses
      (each message names the offending item).
  """
  if adapter is not None:
    peft.adapter_config(adapter)  # a bad adapter fails before a long base load
  loaded = _load_base(os.fspath(source), dtype, param_dtype or dtype, mesh, remat)
  return loaded if adapter is None else _with_adapter(loaded, adapter)


def _load_base(source: str, dtype: str, param_dtype: str, mesh: Mesh | None, remat: str | bool
               ) -> Loaded:
  if source == TINY_RANDOM or source.startswith(TINY_RANDOM + ":"):
    return _tiny_random(source, dtype, param_dtype, mesh, remat)
  kind, path = _source_kind(source)
  reader: GGUFReader | SafetensorsDir
  if kind == "gguf":
    reader = GGUFReader(path, dtype=dtype, param_dtype=param_dtype, remat=remat)
    side_files: list[str] = []
  else:
    reader = SafetensorsDir(path, dtype=dtype, param_dtype=param_dtype, remat=remat)
    side_files = [os.path.join(path, n) for n in _HF_SIDE_FILES if os.path.isfile(os.path.join(path, n))]
  config = reader.config
  reader.check()  # shapes and tensor types, before any tensor data is read
  tokenizer = Tokenizer.from_gguf(path) if kind == "gguf" else _hf_tokenizer(path)
  if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"{source!r}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                     f"vocab_size is {config.vocab_size}")
  fingerprint = fingerprint_files(reader.weight_files() + side_files, dtype=dtype,
                                  param_dtype=param_dtype)
  num_tensors = len(hf_layout.expected_hf_shapes(config))
  name = source if source in embedded.EMBEDDED_NAMES else os.path.basename(os.path.normpath(path))
  with tqdm(total=num_tensors, desc=f"loading {name}", unit="tensor", leave=False) as bar:
    model = reader.model(mesh, progress=lambda _: bar.update())
  return Loaded(model=model, tokenizer=tokenizer, config=config,
                source=source if source in embedded.EMBEDDED_NAMES else os.path.abspath(path),
                fingerprint=fingerprint)
