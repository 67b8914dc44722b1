"""Multi-host start-up through ``jax.distributed`` (never a home-made launcher protocol).

On TPU VMs and under SLURM/Open MPI, ``jax.distributed.initialize()`` discovers everything itself.
Elsewhere (GPU hosts, or several CPU processes on one machine for tests) the coordinator address,
process count and process id come from flags or from the environment variables
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import flags, logging

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (env JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (env JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (env JAX_PROCESS_ID).")
_AUTO = flags.DEFINE_bool("distributed", False,
                          "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
  """Initialises jax.distributed when a multi-process run is asked for; returns whether it did."""
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
  if jax.config.jax_platforms in (None, "", "cpu") and coordinator_address is not None:
    # CPU processes need a collectives backend to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
               jax.process_count(), jax.device_count())
  return True


def settings_from_flags() -> dict[str, Any]:
  """The jax.distributed settings the flags give (for ``--dry_run``)."""
  return {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
          "process_id": _PROCESS_ID.value, "auto": _AUTO.value}


def initialize_from_flags() -> bool:
  return initialize(**settings_from_flags())
