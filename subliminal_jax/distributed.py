"""Multi-host start-up through ``jax.distributed`` (never a home-made launcher protocol).

On TPU VMs and under SLURM/Open MPI, ``jax.distributed.initialize()`` discovers everything itself.
Elsewhere (GPU hosts, or several CPU processes on one machine for tests) the coordinator address,
process count and process id come from flags or from the environment variables
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.

Lost and late hosts end the run instead of hanging it. A process waits ``--distributed_timeout``
seconds for the coordinator (process 0) and then fails with an error naming the address; process 0
waits as long for every peer to join. Once running, a process that sends no heartbeat for
``--distributed_heartbeat_timeout`` seconds counts as dead, and jax then aborts every other
process (its log says "Terminating process because the JAX distributed service detected fatal
errors"), so a killed host stops the whole job, which resumes from its checkpoints when relaunched.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import jax
from absl import flags, logging

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (env JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (env JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (env JAX_PROCESS_ID).")
_AUTO = flags.DEFINE_bool("distributed", False,
                          "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds a process waits for the coordinator (and process 0 for "
    "every peer) before the run fails.", lower_bound=1)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "distributed_heartbeat_timeout", 100, "Seconds without a heartbeat after which a process "
    "counts as dead; jax then aborts the others instead of leaving them waiting in a collective.",
    lower_bound=1)


def _host_and_port(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"coordinator address {address!r} is not host:port")
  return host.strip("[]"), int(port)  # brackets of an IPv6 literal such as [::1]:1234


def _wait_for_coordinator(address: str, process_id: int, num_processes: int,
                          timeout_s: int) -> float:
  """Waits until the coordinator's port accepts connections; returns the seconds left of timeout_s.

  jax's own client aborts the process (no Python exception) when the coordinator never answers, so
  reachability is checked here first, where the failure can say what to check.
  """
  host, port = _host_and_port(address)
  deadline = time.monotonic() + timeout_s
  while True:
    left = deadline - time.monotonic()
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(5.0, left))):
        return deadline - time.monotonic()
    except OSError as error:
      if time.monotonic() >= deadline:
        raise TimeoutError(
            f"process {process_id} of {num_processes} could not reach the jax.distributed "
            f"coordinator at {address} within {timeout_s} s (--distributed_timeout). Check that "
            f"process 0 is running (it hosts the coordinator), that {address} is its host and "
            f"port, and that this port is reachable from this host (firewall, security group); "
            f"last error: {error}") from error
      time.sleep(0.5)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False, timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> bool:
  """Initialises jax.distributed when a multi-process run is asked for; returns whether it did.

  Fails after ``timeout_s`` seconds when the coordinator cannot be reached; a peer silent for
  ``heartbeat_timeout_s`` seconds once the run is up makes jax abort the surviving processes.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator_address is None and not auto:
    return False
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError("a coordinator address needs num_processes and process_id too (flags "
                     "--num_processes/--process_id or env JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
  if timeout_s < 1 or heartbeat_timeout_s < 1:
    raise ValueError(f"timeouts must be at least 1 s, not {timeout_s} and {heartbeat_timeout_s}")
  this_process = (f"process {process_id} of {num_processes}" if process_id is not None
                  else "process id auto-detected")
  logging.info("jax.distributed: waiting up to %d s for the coordinator at %s (%s)", timeout_s,
               coordinator_address or "its auto-detected address", this_process)
  init_timeout_s = timeout_s
  if coordinator_address is not None and process_id != 0:  # process 0 hosts the coordinator
    init_timeout_s = max(1, round(_wait_for_coordinator(coordinator_address, process_id,
                                                         num_processes, timeout_s)))
  if jax.config.jax_platforms in (None, "", "cpu") and coordinator_address is not None:
    # CPU processes need a collectives backend to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=init_timeout_s,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
               jax.process_count(), jax.device_count())
  return True


def settings_from_flags() -> dict[str, Any]:
  """The jax.distributed settings the flags give (for ``--dry_run``)."""
  return {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
          "process_id": _PROCESS_ID.value, "auto": _AUTO.value, "timeout_s": _TIMEOUT.value,
          "heartbeat_timeout_s": _HEARTBEAT_TIMEOUT.value}


def initialize_from_flags() -> bool:
  return initialize(**settings_from_flags())
