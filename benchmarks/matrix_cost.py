"""A transfer matrix's cost stage by stage: one model at a time (K = 1) against K adapters together.

Runs the same matrix twice from empty workdirs, each in its own process with its own empty XLA
compilation cache (so each pays its own compiles, as a fresh machine does), one after the other on
this machine:

  python -m benchmarks.matrix_cost --config=configs/transfer_matrix.py:quick --adapters=1,8 \\
      --out=docs/results/performance/matrix_cost.json

and sums the ``seconds`` of every stage's DONE.json (a batch's time is shared evenly among the
artifacts it built) by stage kind: teacher, sampling, student, evaluation, and the rest (prompts,
filter, dataset). Reported per path: the summed stage time of each kind and in all, the wall time
of the run, and the ratios K = 1 over batched; plus each path's verdict and S, which agree up to
float rounding (K is in no fingerprint, so both paths build the same artifact names). The CPU
model, its vector extensions and the core count go beside the figures.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/transfer_matrix.py:quick", "The matrix config (file:variant).")
flags.DEFINE_list("adapters", ["1", "8"], "matrix.adapters_per_step of each path, in run order.")
flags.DEFINE_string("root", None, "Directory for the workdirs (default: a new temporary one).")
flags.DEFINE_string("out", None, "Write the JSON here as well as printing it.")
flags.DEFINE_multi_string("override", [], "Extra --config.X=Y flags for both paths.")

KINDS = {"teacher": "teacher", "sampling": "sampling", "student": "student",
         "panel_evaluation": "evaluation", "evaluation": "evaluation"}


def machine() -> dict[str, Any]:
  """The CPU this ran on: model, vector extensions that matter to XLA:CPU, cores, XLA flags."""
  model, flags_line = platform.processor(), ""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name") and model in ("", platform.processor()):
        model = line.split(":", 1)[1].strip()
      if line.startswith("flags") and not flags_line:
        flags_line = line.split(":", 1)[1]
  except OSError:
    pass
  wanted = sorted(f for f in flags_line.split()
                  if f.startswith(("avx", "amx", "fma")) or f in ("f16c",))
  return {"cpu": model, "cpu_flags": wanted, "cores": os.cpu_count(),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "python": platform.python_version()}


def stage_seconds(workdir: pathlib.Path) -> dict[str, Any]:
  """Summed DONE.json seconds (and compile seconds) per stage kind, and the count of artifacts."""
  sums: dict[str, dict[str, float]] = {}
  for done in sorted(workdir.glob("*/*/DONE.json")):
    record = json.loads(done.read_text())
    kind = KINDS.get(record["stage"], "other")
    entry = sums.setdefault(kind, {"seconds": 0.0, "compile_seconds": 0.0, "artifacts": 0})
    entry["seconds"] += record["seconds"]
    entry["compile_seconds"] += record.get("compile_seconds", 0.0)
    entry["artifacts"] += 1
  for entry in sums.values():
    entry["seconds"] = round(entry["seconds"], 1)
    entry["compile_seconds"] = round(entry["compile_seconds"], 1)
  sums["total"] = {"seconds": round(sum(e["seconds"] for e in sums.values()), 1)}
  return sums


def run_path(adapters: int, root: pathlib.Path) -> dict[str, Any]:
  workdir, cache = root / f"k{adapters}", root / f"xla_cache_k{adapters}"
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.rmtree(cache, ignore_errors=True)
  command = [sys.executable, "-m", "subliminal_jax.main", f"--config={FLAGS.config}",
             f"--config.matrix.adapters_per_step={adapters}", f"--workdir={workdir}",
             *[f"--config.{o}" for o in FLAGS.override]]
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
  start = time.time()
  with open(root / f"k{adapters}.log", "w") as log:
    subprocess.run(command, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
  wall = time.time() - start
  results = json.loads((workdir / "results.json").read_text())
  same = results["analyses"]["families"]["same"]
  return {"adapters_per_step": adapters, "command": " ".join(command[1:]),
          "wall_seconds": round(wall, 1), "stages": stage_seconds(workdir),
          "S": same["statistic"]["S"], "S_ci": [same["statistic"]["low"], same["statistic"]["high"]],
          "p": same["statistic"]["p_value"], "verdict": same["verdict"]["text"]}


def main(argv):
  del argv
  root = pathlib.Path(FLAGS.root or tempfile.mkdtemp(prefix="matrix_cost_"))
  root.mkdir(parents=True, exist_ok=True)
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
  paths = [run_path(int(k), root) for k in FLAGS.adapters]
  first, *others = paths
  ratios = {}
  for other in others:
    kinds = sorted(set(first["stages"]) & set(other["stages"]))
    ratios[f"k{first['adapters_per_step']}_over_k{other['adapters_per_step']}"] = {
        kind: round(first["stages"][kind]["seconds"] / other["stages"][kind]["seconds"], 2)
        for kind in kinds if other["stages"][kind]["seconds"] > 0}
  result = {"benchmark": "matrix_cost", "config": FLAGS.config, "overrides": FLAGS.override,
            "started": started, "machine": machine(), "paths": paths, "ratios": ratios}
  text = json.dumps(result, indent=1)
  print(text)
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(text + "\n")


if __name__ == "__main__":
  app.run(main)
