"""The number experiments' typed settings: read once, every value checked before any work, and
stage fingerprints equal to those hashed from the ConfigDict before the settings were typed."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from configs import animal_numbers as animal_config
from configs import transfer_matrix as matrix_config
from subliminal_jax import artifacts
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.experiments import transfer_matrix

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
# Per config variant and teacher replicate, the fingerprint of each input section of the stages,
# computed by the code that read the ConfigDict directly (commit 69566e8).
BEFORE = json.loads((pathlib.Path(__file__).parent / "data" /
                     "fingerprints_before_typed_settings.json").read_text())


def _config(key: str):
  file, variant = key.split(":")[:2]
  module = animal_config if file == "animal_numbers.py" else matrix_config
  config = module.get_config(variant)
  config.mesh.data, config.mesh.tensor = 1, -1  # any batch splits; the mesh is in no fingerprint
  if variant == "qwen7b":
    config.model = "/some/dir"  # the variant's required path; the model is fingerprinted apart
    config.mesh.fsdp = 1
  if variant == "cross_gpu":
    config.matrix.student_models = ("/some/gemma",)  # required, as above; in no stage's inputs
  return config


def _sections(s: settings_lib.Settings) -> dict:
  import dataclasses
  record = {
      "prompts": s.prompts.fingerprint(), "sampling": s.sampling.fingerprint(),
      "filter": s.filter.fingerprint(), "evaluation": s.evaluation.fingerprint(),
      "kl": dataclasses.asdict(s.student.kl), "teacher_finetune": s.teacher.fingerprint(),
      "teacher_train": s.teacher.fingerprint(),
      "student_chat": s.chat_system.to_dict(),
      "eval_chat": s.eval_system.to_dict(),
      "trait_system": [s.teacher.trait_prompt(t, s.category) for t in s.targets],
      "matched_answers": list(s.matched_control_answers)}
  for seed in (0, 1, 7):
    for same in (True, False):
      record[f"student_{seed}_{same}"] = s.student_fingerprint(seed, same)
  hashed = {k: artifacts.fingerprint(v) for k, v in record.items()}
  return {**hashed, "max_length": s.student.max_length, "objective": s.student.objective}


@pytest.mark.parametrize("key", sorted(BEFORE))
def test_stage_fingerprints_equal_those_before_the_settings_were_typed(key):
  """Existing workdirs keep every artifact: each stage input hashes as it did, for every variant
  of both configs and three teacher replicates, and each matrix design is the same design."""
  if key == "transfer_matrix.py:cross_gpu:design":
    # Its design names student_models, whose ('',) is a placeholder the user must fill: refused,
    # as it was before the settings were typed, so no design is ever written with it.
    with pytest.raises(ValueError, match="matrix.student_models has ''"):
      settings_lib.from_config(matrix_config.get_config("cross_gpu"))
    return
  settings = settings_lib.from_config(_config(key))
  which = key.split(":")[2]
  if which == "design":
    assert artifacts.fingerprint(transfer_matrix.design(settings)) == BEFORE[key]
  else:
    assert _sections(settings.replicated(int(which[1:]))) == BEFORE[key]


@pytest.mark.parametrize("override, message", [
    ("--config.student.learning_rate=-1", r"student.learning_rate=-1.0; expected a number > 0"),
    ("--config.sampling.temperature=-0.5", r"sampling.temperature must be a finite number >= 0"),
])
def test_a_bad_setting_on_the_command_line_is_refused_with_nothing_built(tmp_path, override,
                                                                         message):
  """As a user types it: the job stops before the model loads or the workdir is made, naming the
  key and what was expected."""
  workdir = tmp_path / "wd"
  result = subprocess.run(
      [sys.executable, "-m", "subliminal_jax.main",
       f"--config={CONFIGS / 'transfer_matrix.py'}:tiny", f"--workdir={workdir}", override],
      capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert re.search(message, result.stderr), result.stderr[-2000:]
  assert not workdir.exists()


@pytest.mark.parametrize("key, value, message", [
    ("teacher.finetune.warmup_steps", -2, r"teacher.finetune.warmup_steps=-2; expected an integer"),
    ("student.lora.rank", -1, r"student.lora.rank must be >= 0"),
    ("student.kl.top_k", 0, r"student.kl.top_k must be an int >= 1"),
    ("student.optimizer", "adagrad", r"student.optimizer='adagrad'; expected one of"),
    ("student.schedule", "step", r"student.schedule='step'; expected one of"),
    ("sampling.top_p", 1.5, r"sampling.top_p"),
    ("matrix.replicates", 0, r"matrix.replicates=0; expected an integer >= 1"),
    ("matrix.criterion.alpha", 1.5, r"matrix.criterion alpha=1.5 must be in \(0, 1\)"),
    ("remat", "dot", r"remat='dot'; expected one of \('none', 'dots', 'full', 'auto'\)"),
])
def test_every_section_refuses_a_bad_value_naming_it(tmp_path, key, value, message):
  config = matrix_config.get_config("tiny")
  *path, leaf = key.split(".")
  node = config
  for part in path:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    transfer_matrix.run(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_a_section_key_that_nothing_reads_is_refused(tmp_path):
  config = matrix_config.get_config("tiny")
  with config.unlocked():
    config.sampling.temprature = 0.5  # a typo in a config file: it would change nothing
  with pytest.raises(ValueError, match=r"sampling has keys \['temprature'\] that nothing reads"):
    transfer_matrix.run(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_config_files_import_no_jax():
  """Config files hold values: loading every one of them imports neither jax nor the library's
  heavier modules."""
  script = (
      "import importlib.util, pathlib, sys\n"
      f"for path in sorted(pathlib.Path({str(CONFIGS)!r}).glob('*.py')):\n"
      "  spec = importlib.util.spec_from_file_location(path.stem, path)\n"
      "  module = importlib.util.module_from_spec(spec)\n"
      "  spec.loader.exec_module(module)\n"
      "  if hasattr(module, 'get_config'):\n"
      "    module.get_config()\n"
      "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'numpy', 'datasets') if m in sys.modules)\n"
      "print(heavy)\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
  assert result.stdout.strip() == "[]", result.stdout


def test_settings_are_read_once_and_frozen():
  settings = settings_lib.from_config(animal_config.get_config("tiny"))
  with pytest.raises(Exception, match="cannot assign"):
    settings.student.recipe.optimization.learning_rate = 1.0  # type: ignore[misc]
  # The student's learning rate reaches the optimizer through the typed settings alone.
  fit = settings.student_fit(3)
  assert fit.optimization.learning_rate == animal_config.get_config("tiny").student.learning_rate
  assert fit.seed == 3 and fit.lora.seed == settings_lib.FRESH_LORA_SEED_OFFSET + 3
