"""Fingerprinted stage artifacts in the workdir: data flows configs -> stages -> artifacts.

Each stage's artifact lives in ``WORKDIR/<stage>/<fingerprint>/`` with a ``DONE.json`` holding the
stage's inputs and summary. The fingerprint hashes everything the stage depends on (its config
slice and its upstream fingerprints), so a config change invalidates exactly the stages downstream
of it, and rerunning an unchanged experiment skips every stage. A stage writes into
``<fingerprint>.partial/``, renamed into place only when it finishes: a crash never leaves a half
artifact that looks done, a rerun continues in the same partial directory (so a training stage
resumes from its last checkpoint there), and nothing already written is ever deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
from absl import logging

from subliminal_jax import compilation_cache


def fingerprint(*parts: Any) -> str:
  """A stable 16-hex-digit hash of JSON-serialisable parts (dict key order does not matter)."""
  text = json.dumps(parts, sort_keys=True, default=_jsonable)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    return value.to_dict()
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  if isinstance(value, pathlib.Path):
    return str(value)
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}: {value!r}")


def _sync_processes(name: str) -> None:
  """A barrier across the processes of a multi-host run (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Workdir:
  """The artifacts of one experiment. Refuses a directory that holds another experiment's."""

  def __init__(self, path: str | os.PathLike, experiment: str, identity: Mapping[str, Any]):
    self.path = pathlib.Path(path)
    marker = self.path / "experiment.json"
    record = {"experiment": experiment, **identity}
    existing = json.loads(marker.read_text()) if marker.exists() else None
    _sync_processes("workdir checked")  # every process has read the marker before the first writes
    if existing is not None:
      if existing != json.loads(json.dumps(record, default=_jsonable)):
        raise ValueError(
            f"workdir {self.path} holds artifacts of another experiment ({existing}); this run is "
            f"{record}. Use another --workdir (nothing was changed in {self.path}).")
    elif jax.process_index() == 0:
      self.path.mkdir(parents=True, exist_ok=True)
      marker.write_text(json.dumps(record, indent=2, default=_jsonable))
    _sync_processes("workdir ready")
    self.skipped: list[str] = []
    self.ran: list[str] = []

  def artifact_dir(self, stage: str, fp: str) -> pathlib.Path:
    return self.path / stage / fp

  def has(self, stage: str, fp: str) -> bool:
    return (self.artifact_dir(stage, fp) / "DONE.json").exists()

  def summary(self, stage: str, fp: str) -> dict[str, Any]:
    return json.loads((self.artifact_dir(stage, fp) / "DONE.json").read_text())["summary"]

  def run_stage(self, stage: str, inputs: Mapping[str, Any],
                build: Callable[[pathlib.Path], Mapping[str, Any]], *, allowed: bool = True
                ) -> tuple[pathlib.Path, dict[str, Any]]:
    """Returns (artifact dir, summary), building the artifact unless one with these inputs exists.

    ``allowed=False`` (a stage left out of ``--stages``) requires the artifact to exist already.
    """
    fp = fingerprint(stage, inputs)
    final = self.artifact_dir(stage, fp)
    if self.has(stage, fp):
      logging.info("stage %s: artifact %s exists, skipped", stage, fp)
      self.skipped.append(stage)
      return final, self.summary(stage, fp)
    if not allowed:
      raise RuntimeError(f"stage {stage!r} was not selected by --stages, but its artifact "
                         f"{final} does not exist yet: include {stage!r} in --stages")
    # One name per fingerprint, not per process: a rerun after a crash builds in the same
    # directory, where the trainer finds its checkpoints.
    partial = final.with_name(f"{fp}.partial")
    if partial.exists():
      logging.info("stage %s: continuing in %s, left by an interrupted run", stage, partial)
    _sync_processes(f"{stage} {fp} start")  # every process has looked before any creates it
    partial.mkdir(parents=True, exist_ok=True)
    start, compile_start = time.time(), compilation_cache.compile_seconds()
    # With several processes (one per host) every process builds: the stage's computations are
    # collective. Each writes the same files; only the first marks the artifact done, after all
    # have finished writing, and the others wait until it is in place.
    summary = dict(build(partial))
    record = {"stage": stage, "fingerprint": fp, "inputs": inputs, "summary": summary,
              "seconds": round(time.time() - start, 2),
              "compile_seconds": round(compilation_cache.compile_seconds() - compile_start, 2)}
    _sync_processes(f"{stage} {fp} built")
    if jax.process_index() == 0:
      (partial / "DONE.json").write_text(json.dumps(record, indent=2, default=_jsonable))
      partial.rename(final)
    _sync_processes(f"{stage} {fp} done")
    self.ran.append(stage)
    logging.info("stage %s: built %s in %.1f s (compiling %.1f s, running %.1f s)", stage, fp,
                 record["seconds"], record["compile_seconds"],
                 record["seconds"] - record["compile_seconds"])
    return final, summary
