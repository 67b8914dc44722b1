"""Exports a trained student of the main job for transformers, vLLM or peft to cross-check.

  python -m subliminal_jax.export_student --student_dir=WORKDIR/student/<fingerprint> \
      --model=smollm2 --out=exported/owl_seed0

writes, for a LoRA student, ``OUT/adapter`` (a PEFT adapter: adapter_config.json and
adapter_model.safetensors), ``OUT/base`` (the base exactly as the student saw it, as an HF
directory: for a quantized GGUF base its dequantized weights, which is what the adapters were
trained on) and ``OUT/merged`` (base plus adapters as one HF directory); for a fully finetuned
student only ``OUT/merged``. ``--formats`` picks among ``peft`` and ``merged``.

``--model`` (and ``--dtype``/``--param_dtype``) must give the base of the student's workdir: its
fingerprint is compared with the one the student's stage recorded, so adapters are never exported
against another base. Which student a fingerprint is: its DONE.json says (inputs: student.seed,
dataset, teacher).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

from absl import app, flags

from subliminal_jax import artifacts, files, loading, lora, sharding
from subliminal_jax.weights import finetuned
from subliminal_jax.weights.export import export_hf
from subliminal_jax.weights.peft import export_peft

FORMATS = ("peft", "merged")


def export_student(student_dir: str | os.PathLike, model: str, out: str | os.PathLike, *,
                   formats: Sequence[str] = FORMATS, dtype: str = "float32",
                   param_dtype: str | None = None) -> dict[str, pathlib.Path]:
  """Writes the student at ``student_dir`` in ``formats``; returns {"adapter"|"base"|"merged": dir}."""
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise ValueError(f"formats={list(formats)}; expected a non-empty subset of {list(FORMATS)}")
  student_dir, out = pathlib.Path(student_dir), pathlib.Path(out)
  done = student_dir / artifacts.DONE_FILE
  if not done.is_file():
    raise FileNotFoundError(f"{student_dir} is not a finished stage artifact (no {done.name}); "
                            "expected WORKDIR/student/<fingerprint>")
  record = files.read_json(done)
  if "student" not in record["inputs"]:
    raise ValueError(f"{student_dir} is an artifact of stage {record['stage']!r}, not a student")
  workdir = student_dir.parent.parent
  # The student's own base (a transfer matrix trains students of several model families in one
  # workdir); older artifacts name only the workdir's.
  recorded = (record["inputs"].get("model")
              or files.read_json(workdir / artifacts.MARKER_FILE)["model"])
  base = loading.load(model, dtype=dtype, param_dtype=param_dtype or dtype,
                      mesh=sharding.make_mesh())
  if base.fingerprint != recorded:
    raise ValueError(f"--model={model!r} (dtype {dtype}) is not the base this student was trained "
                     f"on: fingerprint {base.fingerprint}, {student_dir} recorded {recorded}")
  recorded_lora = record["inputs"]["student"]["lora"]
  adapters = lora.LoraSettings(**{f.name: recorded_lora[f.name]
                                  for f in dataclasses.fields(lora.LoraSettings)})
  student = finetuned.restore(base.model, adapters, student_dir)
  written = {}
  if "peft" in formats:
    if adapters.rank == 0:
      raise ValueError(f"{student_dir} is a fully finetuned student: it has no adapters to export "
                       "as PEFT; use --formats=merged")
    written["base"] = out / "base"
    export_hf(base.model, written["base"], base.tokenizer)
    written["adapter"] = out / "adapter"
    export_peft(student, written["adapter"], base_model_name_or_path=str(written["base"].resolve()))
  if "merged" in formats:
    written["merged"] = out / "merged"
    export_hf(lora.merge_lora(student) if adapters.rank > 0 else student, written["merged"],
              base.tokenizer)
  return written


def main() -> None:
  """The command line. Its flags are defined here, not at import, so that importing this module
  next to another CLI module (generate.py also has --model) defines no flag twice."""
  student_dir = flags.DEFINE_string("student_dir", None, "A student artifact directory of a workdir.")
  model = flags.DEFINE_string("model", None, "The base model, as config.model of the run.")
  out = flags.DEFINE_string("out", None, "Directory to write adapter/, base/ and merged/ into.")
  formats = flags.DEFINE_list("formats", list(FORMATS), "Any of: peft, merged.")
  dtype = flags.DEFINE_string("dtype", "float32", "config.dtype of the run.")
  param_dtype = flags.DEFINE_string("param_dtype", None,
                                    "config.param_dtype of the run (default: dtype).")
  flags.mark_flags_as_required(["student_dir", "model", "out"])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    written = export_student(student_dir.value, model.value, out.value, formats=formats.value,
                             dtype=dtype.value, param_dtype=param_dtype.value)
    for kind, path in written.items():
      print(f"{kind}: {path}")

  app.run(run)


if __name__ == "__main__":
  main()
