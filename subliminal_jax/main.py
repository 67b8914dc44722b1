"""The one entry point: ``python -m subliminal_jax.main --config=configs/X.py[:variant] --workdir=DIR``.

The config (an ml_collections ConfigDict, locked: an unknown ``--config.key`` is an error) names its
experiment in ``config.experiment``; that module under ``subliminal_jax.experiments`` runs it and
writes every artifact into the workdir. Multi-host runs initialise ``jax.distributed`` first.
"""

from __future__ import annotations

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/animal_numbers.py:quick", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every artifact of the run.")
_STAGES = flags.DEFINE_list("stages", None, "Run only these stages (default: all, skipping those "
                            "whose artifact already exists with the same fingerprint).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from subliminal_jax import distributed
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
