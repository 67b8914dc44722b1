"""Pilot: the misalignment cpu recipe's teachers of replicate 0 on real SmolLM2, their strength
(held-out misalignment score before/after). Workdir shared with the later cpu run (same fingerprints)."""
import json, pathlib, sys, time
import jax
from absl import logging
from subliminal_jax import artifacts
from subliminal_jax.config_files import load_neighbour
from subliminal_jax.experiments import animal_numbers, settings as settings_lib, stages

logging.set_verbosity(logging.INFO)
config = load_neighbour(str(pathlib.Path(__file__).resolve().parents[3] / "configs" / "x.py"), "misalignment.py").get_config("cpu")
for arg in sys.argv[2:]:
  key, value = arg.split("=", 1)
  node = config
  *path, last = key.split(".")
  for p in path: node = node[p]
  node[last] = type(node[last])(value)
s = settings_lib.from_config(config)
mesh = s.model.make_mesh()
base = s.model.load(mesh)
wd = artifacts.Workdir(sys.argv[1], animal_numbers.WORKDIR_EXPERIMENT, {"model": base.fingerprint})
with jax.set_mesh(mesh):
  st = stages.Stages(s, wd, base, mesh)
  for value in s.targets:
    t0 = time.time()
    teacher = st.trait_teacher(value)
    print(json.dumps({"value": value, "seconds": round(time.time() - t0, 1), **teacher.summary}), flush=True)
