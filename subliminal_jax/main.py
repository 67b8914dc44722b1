"""The one entry point: ``python -m subliminal_jax.main --config=configs/X.py[:variant] --workdir=DIR``.

The config (an ml_collections ConfigDict, locked: an unknown ``--config.key`` is an error) names its
experiment in ``config.experiment``; that module under ``subliminal_jax.experiments`` runs it and
writes every artifact into the workdir. Multi-host runs initialise ``jax.distributed`` first (its
flags, ``--distributed``, ``--coordinator_address``, ``--num_processes`` and ``--process_id``, are
defined in :mod:`subliminal_jax.distributed`, imported here so they parse). ``--dry_run`` prints what
the flags resolved to and exits: a launch command can be checked without starting the job.
"""

from __future__ import annotations

import importlib
import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from subliminal_jax import compilation_cache  # defines --compilation_cache_dir
from subliminal_jax import distributed  # defines the multi-host flags: import before parsing
from subliminal_jax import preemption

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/animal_numbers.py:quick", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every artifact of the run.")
_STAGES = flags.DEFINE_list("stages", None, "Run only these stages (default: all, skipping those "
                            "whose artifact already exists with the same fingerprint).")
_ORBAX_INFO_LOGS = flags.DEFINE_bool(
    "orbax_info_logs", False, "Show orbax-checkpoint's INFO logs (about 25 lines per checkpoint "
    "written, which bury the stages' progress); its warnings and errors always show.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the experiment, workdir, stages, multi-host settings and config the "
    "flags resolve to, as JSON, and exit without initialising jax.distributed or writing anything.")
flags.mark_flags_as_required(["config", "workdir"])


class OrbaxInfoFilter(std_logging.Filter):
  """Drops log records below WARNING that come from orbax's own modules."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return record.levelno >= std_logging.WARNING or not from_orbax


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if "://" in _WORKDIR.value:
    raise app.UsageError(
        f"--workdir={_WORKDIR.value!r} is a URL; the workdir is a filesystem path: mount the bucket "
        "(e.g. gcsfuse) on every host and pass the mount point")
  if _DRY_RUN.value:
    print(json.dumps({"experiment": _CONFIG.value.get("experiment"), "workdir": _WORKDIR.value,
                      "stages": _STAGES.value, "distributed": distributed.settings_from_flags(),
                      "config": _CONFIG.value.to_dict()}, indent=1, default=str))
    return
  import datasets
  datasets.disable_progress_bars()  # ours name the stage; its per-save and per-map bars only clutter
  if not _ORBAX_INFO_LOGS.value:
    logging.get_absl_handler().addFilter(OrbaxInfoFilter())
  compilation_cache.enable_from_flags()
  distributed.initialize_from_flags()
  config = _CONFIG.value
  name = config.get("experiment")
  try:
    experiment = importlib.import_module(f"subliminal_jax.experiments.{name}")
  except ModuleNotFoundError as e:
    raise app.UsageError(f"config.experiment={name!r} names no module in subliminal_jax.experiments") from e
  logging.info("experiment %s, workdir %s", name, _WORKDIR.value)
  preemption.install()
  try:
    experiment.run(config, _WORKDIR.value, stages=_STAGES.value)
  except preemption.Preempted as e:
    logging.warning("%s (exit code %d)", e, preemption.EXIT_CODE)
    sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
