"""Lost and late hosts: a process whose coordinator never answers fails after --distributed_timeout
with an error naming the address, and a surviving process exits once a killed peer's heartbeats
stop (--distributed_heartbeat_timeout) instead of hanging. CPU processes on 127.0.0.1 only."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
  """A port nobody listens on: bound to 0 for the kernel to pick one, then closed."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def test_unreachable_coordinator_fails_after_the_timeout_naming_the_address(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  started = time.monotonic()
  result = subprocess.run(
      [sys.executable, "-m", "subliminal_jax.main",
       f"--config={ROOT}/configs/animal_numbers.py:tiny", f"--workdir={tmp_path / 'wd'}", f"--coordinator_address={address}", "--num_processes=2",
       "--process_id=1", "--distributed_timeout=5"],
      capture_output=True, text=True, env=ENV, timeout=60, cwd=ROOT)
  elapsed = time.monotonic() - started
  assert result.returncode != 0
  assert f"waiting up to 5 s for the coordinator at {address} (process 1 of 2)" in result.stderr
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith("TimeoutError: process 1 of 2 could not reach") and address in error
  assert "within 5 s (--distributed_timeout)" in error and "process 0 is running" in error
  assert 5 <= elapsed < 60  # it waited the timeout, and not much longer
  assert not (tmp_path / "wd").exists()


_PROCESS = """
import sys, time
from subliminal_jax import distributed
distributed.initialize("{address}", 2, int(sys.argv[1]), timeout_s=60, heartbeat_timeout_s=3)
print("joined", flush=True)
time.sleep(120)
"""


def test_survivor_exits_when_a_peer_is_killed():
  script = _PROCESS.format(address=f"127.0.0.1:{_free_port()}")
  processes = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV) for i in range(2)]
  try:
    for process in processes:  # both joined: the run is up before the peer dies
      assert process.stdout.readline().strip() == "joined", process.stderr.read()[-3000:]
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    returncode = processes[0].wait(timeout=40)  # without the heartbeat timeout it sleeps 120 s
    assert returncode != 0 and time.monotonic() - killed_at < 40
    assert "stopped sending heartbeats" in processes[0].stderr.read()
  finally:
    for process in processes:
      process.kill()
      process.wait()
