"""A student of the main job exported as a PEFT adapter and as a merged HF directory: peft and
transformers (torch) load them and compute our student's logits."""

import json

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from configs import animal_numbers as animal_config
from subliminal_jax import artifacts, lora, sharding
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.export_student import export_student
from subliminal_jax.weights import finetuned
from subliminal_jax.weights import peft as peft_export


@pytest.fixture(scope="module")
def student(tmp_path_factory):
  """A LoRA student artifact (adapters with B != 0, as after training) in a main-job workdir."""
  workdir = tmp_path_factory.mktemp("wd")
  config = animal_config.get_config("tiny")
  config.student.lora.targets = ("q_proj", "v_proj", "down_proj")
  settings = settings_lib.from_config(config)
  base = settings.model.load(sharding.make_mesh())
  fit = settings.student_fit(0)
  model = fit.lora.apply(nnx.clone(base.model))
  rng = np.random.default_rng(0)
  for name in fit.lora.targets:
    b = getattr(model.layers, name).lora_b
    b.set_value(jax.numpy.asarray(rng.normal(0, 0.05, b.get_value().shape), np.float32))
  with artifacts.Workdir(workdir, "animal_numbers", {"model": base.fingerprint}) as wd:
    student_dir, _ = wd.run_stage(
        "student", {"student": settings.student_fingerprint(0), "model": base.fingerprint},
        lambda out: finetuned.save(model, fit.lora, out) or {})
  ids = rng.integers(0, 1000, (2, 9)).astype(np.int32)
  return student_dir, model, np.asarray(model(jax.numpy.asarray(ids))), ids


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def test_peft_adapter_and_merged_directory_reproduce_the_students_logits(student, tmp_path):
  student_dir, model, expected, ids = student
  written = export_student(student_dir, "tiny-random", tmp_path / "out")
  assert sorted(written) == ["adapter", "base", "merged"]
  config = json.loads((written["adapter"] / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 4
  assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]

  base = transformers.AutoModelForCausalLM.from_pretrained(written["base"]).float().eval()
  # Our tensor names are PEFT's own: those of a fresh PEFT LoRA with the same config.
  reference = peft.get_peft_model(
      transformers.AutoModelForCausalLM.from_pretrained(written["base"]),
      peft.LoraConfig(r=4, lora_alpha=config["lora_alpha"], target_modules=config["target_modules"]))
  names = {k.replace(".default", "") for k in reference.state_dict() if ".lora_" in k}
  saved = safetensors.numpy.load_file(written["adapter"] / "adapter_model.safetensors")
  assert set(saved) == names

  adapted = peft.PeftModel.from_pretrained(base, written["adapter"]).eval()
  np.testing.assert_allclose(_torch_logits(adapted, ids), expected, rtol=1e-4, atol=1e-4)
  merged = transformers.AutoModelForCausalLM.from_pretrained(written["merged"]).float().eval()
  np.testing.assert_allclose(_torch_logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
  # The adapters change the logits (a test of the adapters, not of the base alone).
  assert np.abs(_torch_logits(transformers.AutoModelForCausalLM.from_pretrained(
      written["base"]).float().eval(), ids) - expected).max() > 1e-3


def test_another_base_or_a_full_finetune_is_refused(student, tmp_path):
  student_dir, model, _, _ = student
  with pytest.raises(ValueError, match="is not the base this student was trained on"):
    export_student(student_dir, "tiny-random", tmp_path / "a", dtype="bfloat16")
  with pytest.raises(ValueError, match="expected a non-empty subset of \\['peft', 'merged'\\]"):
    export_student(student_dir, "tiny-random", tmp_path / "b", formats=("gguf",))
  with pytest.raises(FileNotFoundError, match="not a finished stage artifact"):
    export_student(student_dir.parent, "tiny-random", tmp_path / "c")
  with pytest.raises(ValueError, match="no LoRA adapters to export"):
    peft_export.export_peft(lora.merge_lora(nnx.clone(model)), tmp_path / "d",
                            base_model_name_or_path="x")


def test_the_command_line_writes_the_same_directories(student, tmp_path):
  import os
  import pathlib
  import subprocess
  import sys
  student_dir = student[0]
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(
      [sys.executable, "-m", "subliminal_jax.export_student", f"--student_dir={student_dir}",
       "--model=tiny-random", f"--out={tmp_path}", "--formats=merged"],
      capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == f"merged: {tmp_path / 'merged'}"
  assert (tmp_path / "merged" / "model.safetensors").is_file() and not (tmp_path / "adapter").exists()
