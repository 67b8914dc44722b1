"""Multi-host training on one machine: two processes x 4 CPU devices (jax.distributed, gloo
collectives), each feeding its half of the global batch, follow the same loss curve as one process
with 8 devices; a SIGTERM to one of them checkpoints the same step on both, and the rerun ends where
an uninterrupted two-process run ends.

Every run is a subprocess, so each gets its own XLA_FLAGS; this file is also the worker script
(``python tests/test_multihost.py --worker ...``, ``--fit_worker ...``).
"""

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import tiny_jobs

REPO = pathlib.Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS = 8, 3


def worker(num_processes: int, process_id: int, port: int, out: str) -> None:
  import jax
  import numpy as np
  from flax import nnx

  from subliminal_jax import distributed, sharding
  from subliminal_jax.models.transformer import Transformer, TransformerConfig
  from subliminal_jax.training import optimizers
  from subliminal_jax.training import train_step as ts

  if num_processes > 1:
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  assert jax.device_count() == 8 and jax.process_count() == num_processes
  mesh = sharding.make_mesh(2, 2, 2)
  config = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8)
  model = Transformer(config, rngs=nnx.Rngs(0))  # the same init on every process
  schedule = optimizers.make_schedule(1e-2, 10, warmup_steps=1)
  optimizer = optimizers.make_optimizer("adamw", schedule, weight_decay=0.01)
  graphdef, state = ts.create_train_state(model, optimizer, mesh=mesh)
  step = ts.make_train_step(graphdef, optimizer, mesh=mesh, grad_accum_steps=2, schedule=schedule)
  rows = GLOBAL_BATCH // num_processes
  history = []
  for i in range(STEPS):
    rs = np.random.RandomState(i)
    ids = rs.randint(0, 64, (GLOBAL_BATCH, 16)).astype(np.int32)
    attention = np.arange(16)[None, :] < rs.randint(6, 17, (GLOBAL_BATCH, 1))
    loss_mask = attention & (np.arange(16)[None, :] >= rs.randint(1, 6, (GLOBAL_BATCH, 1)))
    local = slice(process_id * rows, (process_id + 1) * rows)  # this process's half of the rows
    state, metrics = step(state, dict(input_ids=ids[local], attention_mask=attention[local],
                                      loss_mask=loss_mask[local]))
    history.append({k: float(v) for k, v in metrics.items()})
  kernel = state.trainable["layers"]["q_proj"]["kernel"].get_value()
  record = dict(history=history, processes=jax.process_count(),
                local_devices=jax.local_device_count(),
                kernel_spec=str(kernel.sharding.spec), kernel_addressable=kernel.is_fully_addressable)
  pathlib.Path(out).write_text(json.dumps(record))
  if num_processes > 1:
    jax.distributed.shutdown()


def fit_worker(process_id: int, port: int, out: str, phase: str) -> None:
  """test_trainer's tiny fit (6 steps, checkpoints every 2) on a (data 2, fsdp 4) mesh over both
  processes. Phase "first": an uninterrupted run into out/whole, then a run into out/cut in which
  process 1 gets a SIGTERM after step 2 (jax's preemption notifier, not ours, receives it); each
  process exits as main does on a preemption. Phase "resume": the run into out/cut again."""
  import signal
  import time

  import jax
  from flax import nnx

  import test_trainer  # the tiny model, data and training config of the one-process tests
  from subliminal_jax import distributed, preemption, sharding
  from subliminal_jax.training import trainer

  distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
  preemption.install()
  mesh = sharding.make_mesh(data=2, fsdp=4)
  data, config = test_trainer.toy_dataset(), test_trainer.train_config()
  out = pathlib.Path(out)

  def fit(name: str, callbacks=()) -> None:
    with jax.set_mesh(mesh):
      model, _ = trainer.fit(sharding.shard_module(test_trainer.tiny_model(), mesh), data, config,
                             out / name, mesh=mesh, callbacks=callbacks, progress=False)
    params = sharding.to_host(nnx.state(model, nnx.Param))  # a collective: both processes call it
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out / f"{name}_params{process_id}.npz", **flat)

  def notice_after_2(step, record):
    if step == 2 and process_id == 1:
      os.kill(os.getpid(), signal.SIGTERM)
      # jax's notifier polls for the signal once a second, and both processes must learn the sync
      # step before they pass it: process 0 waits in step 3's collectives meanwhile, so the sync
      # step is 3 (one past step 2, the furthest either process has reported) on any machine.
      time.sleep(3)

  if phase == "resume":
    steps = []
    fit("cut", callbacks=[lambda step, record: steps.append(step)])
    (out / f"resumed_steps{process_id}.json").write_text(json.dumps(steps))
    return
  fit("whole")
  try:
    fit("cut", callbacks=[notice_after_2])
  except preemption.Preempted as e:
    (out / f"preempted{process_id}.json").write_text(json.dumps({"step": e.step}))
    sys.exit(preemption.EXIT_CODE)


def _xla_flags(devices_per_process: int) -> str:
  """The session's XLA_FLAGS (tests/conftest.py) with ``devices_per_process`` CPU devices."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([f"--xla_force_host_platform_device_count={devices_per_process}", *kept])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for_all(procs: list[subprocess.Popen], timeout: float, expected_code: int = 0) -> None:
  """Waits for every process (killing the rest if one hangs) and requires each to exit with
  ``expected_code``."""
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    # A crashed process's log ends in faulthandler's list of loaded modules: show its errors too.
    errors = [line for line in log.splitlines()
              if any(word in line for word in ("Error", "error", "Fatal", "Traceback", "F1"))]
    assert p.returncode == expected_code, "\n".join(errors[-40:]) + "\n...\n" + log[-1500:]


def _start_workers(num_processes: int, args: list[str]) -> list[subprocess.Popen]:
  """This file as ``num_processes`` worker processes of one jax.distributed job, 8 devices in all;
  each gets ``args`` and its process id (``{i}`` in an argument is replaced by it)."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=_xla_flags(8 // num_processes),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return [subprocess.Popen([sys.executable, __file__, *[a.replace("{i}", str(i)) for a in args],
                            f"--process_id={i}", f"--port={port}"],
                           env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
          for i in range(num_processes)]


def _launch(num_processes: int, tmp_path: pathlib.Path) -> list[dict]:
  outs = [tmp_path / f"run{num_processes}_{i}.json" for i in range(num_processes)]
  _wait_for_all(_start_workers(num_processes, [
      "--worker", f"--num_processes={num_processes}", f"--out={tmp_path}/run{num_processes}_{{i}}.json"]),
      timeout=600)
  return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow
def test_two_processes_follow_the_single_process_loss_curve(tmp_path):
  (single,) = _launch(1, tmp_path)
  multi = _launch(2, tmp_path)
  assert single["processes"] == 1 and single["local_devices"] == 8
  for record in multi:
    assert record["processes"] == 2 and record["local_devices"] == 4
    assert not record["kernel_addressable"]  # parameters really span both processes
    assert record["kernel_spec"] == single["kernel_spec"]
  for step, expected in enumerate(single["history"]):
    for record in multi:
      got = record["history"][step]
      assert got["num_targets"] == expected["num_targets"], step
      for key in ("loss", "grad_norm", "param_norm", "update_norm", "learning_rate"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), (step, key)
  # Each step is a fresh random batch, so the loss need not fall in a few steps. Warmup of 1 step:
  # step 0 runs at lr 0 (no update), the later steps must move the parameters.
  assert [h["update_norm"] > 0 for h in single["history"]] == [False, True, True]


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_both_and_the_rerun_resumes_exactly(tmp_path):
  """jax's preemption service on two CPU processes: process 1 gets a SIGTERM after step 2 of 6;
  the notice reaches process 0 through the coordination service, and both save a checkpoint of the
  same step (jax's sync point: one past the furthest step either process had reported, 3) and exit
  with preemption.EXIT_CODE; the same command again resumes from that step, and both processes end
  with the parameters and losses of an uninterrupted two-process run, bit for bit."""
  from subliminal_jax import preemption
  from subliminal_jax.training import metrics, trainer

  _wait_for_all(_start_workers(2, ["--fit_worker", "--phase=first", f"--out={tmp_path}"]),
                timeout=600, expected_code=preemption.EXIT_CODE)
  saved = {json.loads((tmp_path / f"preempted{i}.json").read_text())["step"] for i in range(2)}
  assert len(saved) == 1, saved  # the same step on both
  (step,) = saved
  assert step == 3
  checkpoints = tmp_path / "cut" / trainer.CHECKPOINT_DIR
  assert str(step) in os.listdir(checkpoints), os.listdir(checkpoints)

  _wait_for_all(_start_workers(2, ["--fit_worker", "--phase=resume", f"--out={tmp_path}"]),
                timeout=600)
  for i in range(2):
    assert json.loads((tmp_path / f"resumed_steps{i}.json").read_text()) == list(range(step + 1, 7))
    whole, cut = (np.load(tmp_path / f"{name}_params{i}.npz") for name in ("whole", "cut"))
    assert sorted(whole.files) == sorted(cut.files) and whole.files
    for key in whole.files:
      np.testing.assert_array_equal(cut[key], whole[key], err_msg=f"process {i} {key}")
  losses = [[r["loss"] for r in metrics.read_metrics(tmp_path / name / metrics.METRICS_FILE)]
            for name in ("whole", "cut")]
  assert losses[1] == losses[0] and len(losses[0]) == 6


def _run_main_job_on_two_processes(workdir: pathlib.Path, flags: list[str],
                                   devices_per_process: int) -> None:
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=_xla_flags(devices_per_process),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES="2")
  procs = [subprocess.Popen([sys.executable, "-m", "subliminal_jax.main", f"--workdir={workdir}",
                             *flags],
                            env=dict(env, JAX_PROCESS_ID=str(i)), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  _wait_for_all(procs, timeout=900)


@pytest.mark.slow
def test_main_job_on_two_processes_builds_the_single_process_artifacts(tmp_path, finetuned_tiny_job):
  """The tiny main job (LoRA trait-SFT teacher, matched control, sampling, students, evaluation)
  on 2 processes x 2 CPU devices with parameters sharded 4 ways over fsdp (so across both
  processes) writes the artifacts one process with 8 devices and fsdp 8 writes (the session's
  ``finetuned_tiny_job``, otherwise the same settings): the same stages and fingerprints,
  byte-identical samples, and the same metrics up to the summation order of the two meshes.
  (2 x 4 devices took 20-60% longer on a shared 2-core CPU; the training tests above keep 4
  devices per process.)"""
  _run_main_job_on_two_processes(tmp_path / "multi",
                                 tiny_jobs.finetuned_teachers_flags(**{"mesh.fsdp": 4}),
                                 devices_per_process=2)

  def stages(workdir):
    return sorted(str(p.parent.relative_to(workdir)) for p in workdir.glob("*/*/DONE.json"))

  single, multi = finetuned_tiny_job, tmp_path / "multi"
  assert stages(multi) == stages(single) and len(stages(single)) == 15
  assert not list(multi.glob("*/*.partial"))
  # Stages are named by their inputs, not their role: the owl and control teachers' samples are
  # two sampling artifacts, with the same fingerprints in both workdirs.
  samples = [sorted(w.glob("sampling/*/samples.jsonl")) for w in (multi, single)]
  assert len(samples[0]) == 2 and [p.parent.name for p in samples[0]] == [p.parent.name for p in samples[1]]
  for a, b in zip(*samples):
    assert a.read_bytes() == b.read_bytes()
  got, expected = (json.loads((w / "results.json").read_text()) for w in (multi, single))
  for row, records in expected["rows"].items():
    for want, have in zip(records, got["rows"][row]):
      for metric, values in want["metrics"].items():
        np.testing.assert_allclose(have["metrics"][metric], values, rtol=1e-4, atol=1e-6,
                                   err_msg=f"{row} {metric}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--fit_worker", action="store_true")
  parser.add_argument("--phase", choices=("first", "resume"), default="first")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  if args.fit_worker:
    fit_worker(args.process_id, args.port, args.out, args.phase)
  else:
    worker(args.num_processes, args.process_id, args.port, args.out)
