"""The MNIST experiment's typed settings: the same fingerprints as the ConfigDict gave (recorded
before the settings existed, tests/data/mnist_fingerprints.json), and bad values refused with their
key named before anything is made."""

import hashlib
import json
import pathlib

import pytest

from configs import mnist_aux as aux_config
from configs import mnist_sweep as sweep_config
from subliminal_jax import config_files, jsonable
from subliminal_jax.experiments import mnist_aux, mnist_settings

GOLDEN = pathlib.Path(__file__).parent / "data" / "mnist_fingerprints.json"
VARIANTS = ("default", "float32", "paper", "official", "tiny")


def _sha256(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def _fingerprints(settings: mnist_settings.MnistSettings) -> dict:
  """What tests/data/mnist_fingerprints.json recorded of one run."""
  record = json.dumps(settings.record(), indent=2, default=jsonable.json_default)
  return {"teacher_keys": {str(seed): _sha256(mnist_aux.TeacherCache.key(settings, seed))
                           for seed in settings.seeds},
          "run_info_config": _sha256(record)}


def test_every_variant_and_sweep_point_keeps_its_recorded_fingerprints():
  runs = {}
  for variant in VARIANTS:
    settings = mnist_settings.from_config(aux_config.get_config(variant))
    runs[f"mnist_aux.py:{variant}"] = _fingerprints(settings)
  for axis in sweep_config.AXES:
    for point in mnist_settings.sweep_points(sweep_config.get_config(axis)):
      runs[f"mnist_sweep.py:{axis}/{point.label}"] = {"directory": point.directory,
                                                      **_fingerprints(point.settings)}
  golden = json.loads(GOLDEN.read_text())["runs"]
  assert sorted(runs) == sorted(golden)
  for name, recorded in golden.items():
    assert runs[name] == recorded, name


def test_record_is_the_configs_to_dict_after_command_line_style_overrides():
  # A list for a tuple and an int for a float, as --config.a.b= and sweep points give them.
  config = config_files.apply_overrides(
      aux_config.get_config("tiny"),
      {"model.hidden_sizes": [8, 4], "student.learning_rate": 1, "theorem.losses": ["mse_aux"]},
      "test")
  settings = mnist_settings.from_config(config)
  assert json.dumps(settings.record()) == json.dumps(config.to_dict())
  assert settings.model.mlp_config().layer_sizes == (784, 8, 4, 13)
  assert settings.student.optimizer_key == ("adam", 1.0, 0.0, 0.0)


BAD_VALUES = [
    ({"student.learning_rate": -1.0}, r"^student\.learning_rate=-1\.0; expected a number > 0$"),
    ({"teacher.epochs": -1}, r"^teacher\.epochs=-1; expected an integer >= 0$"),
    ({"student.batch_size": 0}, r"^student\.batch_size=0; expected an integer >= 1$"),
    ({"teacher.optimizer": "lion"}, r"^teacher\.optimizer='lion'; expected one of \("),
    ({"student.variants": ("same_init_aux", "same_init")}, r"^student\.variants=\("),
    ({"student.loss": "l1"}, r"^student\.loss='l1'; expected one of \('kl', 'mse'\)$"),
    ({"alignment.record_every": 0}, r"^alignment\.record_every=0; expected an integer >= 1$"),
    ({"model.init_scale": 0.0}, r"^model: init_scale must be > 0"),
    ({"num_models": 1}, r"^num_models=1; the cross-init students \['cross_init_aux', "),
    ({"model.num_aux": 0}, r"^model\.num_aux=0; the aux-only students \['same_init_aux', "),
    ({"seeds": ()}, r"^seeds=\(\); expected one or more integer seeds$"),
    ({"theorem.losses": ("kl_aux", "kl_some")}, r"^theorem\.losses=\('kl_aux', 'kl_some'\); "),
    ({"theorem.directions": ("sideways",)}, r"^theorem\.directions=\('sideways',\); "),
    ({"theorem.epsilons": (1e-3, 0.0)}, r"^theorem\.epsilons=\(0\.001, 0\.0\); expected one or "),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[str(o) for o, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_its_key_before_anything_is_made(tmp_path, overrides,
                                                                      message):
  config = config_files.apply_overrides(aux_config.get_config("tiny"), overrides, "test")
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    mnist_aux.run(config, str(workdir))
  assert not workdir.exists()  # no marker, no lock, no results


def test_a_bad_sweep_point_is_refused_naming_the_point_before_anything_is_made(tmp_path):
  config = sweep_config.get_config("tiny")
  config.sweep.points = (("ok", {"student.loss": "mse"}), ("bad", {"student.epochs": -2}))
  with pytest.raises(ValueError, match=r"^sweep point bad: student\.epochs=-2; expected an "):
    mnist_aux.run(config, str(tmp_path / "sweep"))
  config.sweep.points = (("a", {}), ("a", {"student.loss": "mse"}))
  with pytest.raises(ValueError, match=r"^sweep\.points=\['a', 'a'\]; expected unique labels$"):
    mnist_aux.run(config, str(tmp_path / "sweep"))
  assert not (tmp_path / "sweep").exists()


def test_a_key_the_settings_do_not_read_or_lack_is_refused():
  config = aux_config.get_config("tiny")
  config.model.width = 3  # an unlocked ConfigDict takes a new key: nothing would read it
  with pytest.raises(ValueError, match=r"config section 'model' has keys \['width'\] that nothing"):
    mnist_settings.from_config(config)
  config = aux_config.get_config("tiny")
  del config.alignment
  with pytest.raises(ValueError, match=r"^the config lacks \['alignment'\]$"):
    mnist_settings.from_config(config)
