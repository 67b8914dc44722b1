"""The one entry point: ``python -m subliminal_jax.main --config=configs/X.py[:variant] --workdir=DIR``.

The config (an ml_collections ConfigDict, locked: an unknown ``--config.key`` is an error) names its
experiment in ``config.experiment``; that module under ``subliminal_jax.experiments`` runs it and
writes every artifact into the workdir. Multi-host runs initialise ``jax.distributed`` first.
"""

from __future__ import annotations

import importlib
import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

from subliminal_jax import compilation_cache

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/animal_numbers.py:quick", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every artifact of the run.")
_STAGES = flags.DEFINE_list("stages", None, "Run only these stages (default: all, skipping those "
                            "whose artifact already exists with the same fingerprint).")
_ORBAX_INFO_LOGS = flags.DEFINE_bool(
    "orbax_info_logs", False, "Show orbax-checkpoint's INFO logs (about 25 lines per checkpoint "
    "written, which bury the stages' progress); its warnings and errors always show.")
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
  from subliminal_jax import distributed
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
  experiment.run(config, _WORKDIR.value, stages=_STAGES.value)


if __name__ == "__main__":
  app.run(main)
