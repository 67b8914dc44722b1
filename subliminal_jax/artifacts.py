"""Fingerprinted stage artifacts in the workdir: data flows configs -> stages -> artifacts.

Each stage's artifact lives in ``WORKDIR/<stage>/<fingerprint>/`` with a ``DONE.json`` holding the
stage's inputs and summary. The fingerprint hashes everything the stage depends on (its config
slice and its upstream fingerprints), so a config change invalidates exactly the stages downstream
of it, and rerunning an unchanged experiment skips every stage. A stage writes into
``<fingerprint>.partial/``, renamed into place only when it finishes: a crash never leaves a half
artifact that looks done, a rerun continues in the same partial directory (so a training stage
resumes from its last checkpoint there), and nothing already written is ever deleted.

``DONE.json`` is the artifact's commit marker: written last, after the directory has moved into
place, so it counts on storage where a directory rename is not atomic (gcsfuse copies and then
deletes). A copy cut short there leaves a directory without ``DONE.json``, which a rerun sets aside
and builds again from the partial directory; it never reads the cut copy.

``DONE.json`` also lists every file of the artifact with its size and sha256. An artifact is checked
against that list whenever a run reuses it, so a file cut short or changed after the stage finished
(a samples.jsonl truncated by a full disk, an edited kept.jsonl) stops the run with the file named,
instead of being fed to the stages downstream under the fingerprint of the intact one.

One job at a time per workdir: :class:`Workdir` takes an exclusive lock (``WORKDIR/.lock``, an
``flock`` the kernel drops when the process dies, so a killed job leaves no stale lock); a second
job on the same workdir is refused with the holder named, before it writes anything.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import socket
import time
import weakref
from typing import Any, Callable, Mapping, Sequence

import jax
from absl import logging

from subliminal_jax import compilation_cache, files, jsonable, preemption, progress

DONE_FILE = "DONE.json"
LOCK_FILE = ".lock"
MARKER_FILE = "experiment.json"
_HASH_CHUNK = 8 * 2**20


def fingerprint(*parts: Any) -> str:
  """A stable 16-hex-digit hash of JSON-serialisable parts (dict key order does not matter)."""
  text = json.dumps(parts, sort_keys=True, default=_jsonable)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
  try:
    return jsonable.json_default(value)
  except TypeError:
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}: {value!r}") from None


def _sync_processes(name: str) -> None:
  """A barrier across the processes of a multi-host run (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def inside(root: str | os.PathLike, relative: str, what: str) -> pathlib.Path:
  """``root / relative``, refused unless it stays inside ``root`` (config paths name no other place).

  ``what`` names the config value in the error (``"report_dir"``).
  """
  root = pathlib.Path(root)
  if os.path.isabs(relative):
    raise ValueError(f"{what}={relative!r} is an absolute path; it must be a path relative to the "
                     f"workdir {root}")
  path = root / relative
  if not path.resolve().is_relative_to(root.resolve()):
    raise ValueError(f"{what}={relative!r} leads outside the workdir {root} (to {path.resolve()}); "
                     "use a path inside it")
  return path


# ---------------------------------------------------------------------------------------------
# Which stages --stages selects


@dataclasses.dataclass(frozen=True)
class Selection:
  """One of an experiment's selectable stages (a ``--stages`` value) and whether it is selected.

  Many artifacts belong to one selectable stage (``student_owl_seed3`` to ``students``); messages
  name the selectable stage, the one a user can pass, and progress shows its place in the pipeline.
  """
  name: str
  index: int  # 1-based position among the experiment's stages
  total: int
  selected: bool

  def __bool__(self) -> bool:
    return self.selected


def stage_selection(all_stages: Sequence[str], selected: Sequence[str] | None
                    ) -> Callable[[str], Selection]:
  """``select(name)`` -> the :class:`Selection` of ``name`` under ``--stages=selected`` (None: all)."""
  all_stages = tuple(all_stages)

  def select(name: str) -> Selection:
    if name not in all_stages:
      raise ValueError(f"unknown stage {name!r}; expected one of {list(all_stages)}")
    return Selection(name, all_stages.index(name) + 1, len(all_stages),
                     not selected or name in selected)

  return select


# ---------------------------------------------------------------------------------------------
# File manifests: what a finished artifact holds


_file_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def file_digest(path: pathlib.Path) -> str:
  """sha256 of a file's bytes (remembered per path, size and mtime within the process)."""
  stat = path.stat()
  key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
  if key not in _file_digests:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      while chunk := f.read(_HASH_CHUNK):
        digest.update(chunk)
    _file_digests[key] = digest.hexdigest()
  return _file_digests[key]


def manifest(directory: pathlib.Path) -> dict[str, dict[str, Any]]:
  """Every file under ``directory`` but DONE.json: relative path -> {"bytes", "sha256"}."""
  entries = {}
  for path in sorted(directory.rglob("*")):
    if path.is_file() and path.name != DONE_FILE:
      entries[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size,
                                                          "sha256": file_digest(path)}
  return entries


def damage(directory: pathlib.Path, recorded: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """How the files of ``directory`` differ from the manifest recorded when it was built ([] if not)."""
  problems = []
  for name, entry in recorded.items():
    path = directory / name
    if not path.is_file():
      problems.append(f"{name} is missing")
    elif path.stat().st_size != entry["bytes"]:
      problems.append(f"{name} has {path.stat().st_size:,} bytes, {entry['bytes']:,} when it was built")
    elif file_digest(path) != entry["sha256"]:
      problems.append(f"{name} has the same size but other content than when it was built")
  return problems


class DamagedArtifactError(RuntimeError):
  """A finished artifact whose files no longer match what its stage wrote."""


# ---------------------------------------------------------------------------------------------
# One job per workdir


class _Lock:
  """An exclusive flock on WORKDIR/.lock, shared by every Workdir of this process on that path."""

  held: dict[str, "_Lock"] = {}

  def __init__(self, path: pathlib.Path):
    self.key = str(path.resolve())
    self.users = 0
    self.file = open(path / LOCK_FILE, "a+")
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.seek(0)
      holder = self.file.read().strip() or "a process that did not say who it is"
      self.file.close()
      raise RuntimeError(
          f"workdir {path} is in use by another job ({holder}); two jobs in one workdir would "
          "build into each other's stages. Wait for that job to finish, or use another --workdir "
          "(nothing was changed in this one)") from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      logging.warning("workdir %s: its file system offers no locks (%s); nothing stops a second "
                      "job on this workdir", path, e)
    self.file.seek(0)
    self.file.truncate()
    self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    self.file.flush()

  @classmethod
  def acquire(cls, path: pathlib.Path) -> "_Lock":
    key = str(path.resolve())
    lock = cls.held.get(key) or cls(path)
    cls.held[key] = lock
    lock.users += 1
    return lock

  def release(self) -> None:
    self.users -= 1
    if self.users == 0:
      del self.held[self.key]
      self.file.close()  # closing the file drops the flock


# ---------------------------------------------------------------------------------------------
# The workdir


def move_into_place(partial: pathlib.Path, final: pathlib.Path) -> None:
  """Renames a built artifact's directory to its final name (atomic on a local filesystem, a
  copy and a delete on gcsfuse: hence DONE.json is written after it)."""
  partial.rename(final)


class Workdir:
  """The artifacts of one experiment. Refuses a directory that holds another experiment's, or one
  another job is using.

  The lock is held while this object lives (or until :meth:`close`); Workdirs of one process on
  one path share it (the regime grid runs its cells one after another in one workdir).
  """

  def __init__(self, path: str | os.PathLike, experiment: str, identity: Mapping[str, Any]):
    self.path = pathlib.Path(path)
    self._lock = None
    if jax.process_index() == 0:
      self.path.mkdir(parents=True, exist_ok=True)
      self._lock = _Lock.acquire(self.path)
      # Released when this Workdir is closed or collected, also when a run fails halfway.
      self._finalizer = weakref.finalize(self, self._lock.release)
    marker = self.path / MARKER_FILE
    record = {"experiment": experiment, **identity}
    existing = files.read_json(marker) if marker.exists() else None
    _sync_processes("workdir checked")  # every process has read the marker before the first writes
    if existing is not None:
      if existing != json.loads(json.dumps(record, default=_jsonable)):
        self.close()
        raise ValueError(
            f"workdir {self.path} holds artifacts of another experiment ({existing}); this run is "
            f"{record}. Use another --workdir (nothing was changed in {self.path}).")
    elif jax.process_index() == 0:
      files.write_json(marker, record, default=_jsonable)
    _sync_processes("workdir ready")
    self.skipped: list[str] = []
    self.ran: list[str] = []

  def close(self) -> None:
    """Releases the workdir's lock (if this is the last Workdir of the process on it)."""
    if self._lock is not None:
      self._finalizer()

  def __enter__(self) -> "Workdir":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def artifact_dir(self, stage: str, fp: str) -> pathlib.Path:
    return self.path / stage / fp

  def has(self, stage: str, fp: str) -> bool:
    return (self.artifact_dir(stage, fp) / DONE_FILE).exists()

  def record(self, stage: str, fp: str) -> dict[str, Any]:
    return files.read_json(self.artifact_dir(stage, fp) / DONE_FILE)

  def summary(self, stage: str, fp: str) -> dict[str, Any]:
    return self.record(stage, fp)["summary"]

  def check(self, stage: str, fp: str) -> None:
    """Raises :class:`DamagedArtifactError` if a finished artifact's files changed since it was built."""
    directory = self.artifact_dir(stage, fp)
    problems = damage(directory, self.record(stage, fp).get("files", {}))
    if problems:
      raise DamagedArtifactError(
          f"artifact {directory} (stage {stage!r}) is damaged: {'; '.join(problems[:3])}. The "
          "stages after it would be built from it under the fingerprint of the intact artifact. "
          f"Move it away (e.g. mv {directory} {directory}.damaged) and rerun to rebuild it")

  def run_stage(self, stage: str, inputs: Mapping[str, Any],
                build: Callable[[pathlib.Path], Mapping[str, Any]], *,
                allowed: bool | Selection = True) -> tuple[pathlib.Path, dict[str, Any]]:
    """Returns (artifact dir, summary), building the artifact unless one with these inputs exists.

    An existing artifact is checked against the file list of its DONE.json first.
    ``allowed`` false (a stage left out of ``--stages``) requires the artifact to exist already; a
    :class:`Selection` also names the selectable stage in messages and progress bars.
    """
    [(directory, summary)] = self.run_stages(stage, [inputs], lambda outs: [build(outs[0])],
                                             allowed=allowed)
    return directory, summary

  def run_stages(self, stage: str, inputs: Sequence[Mapping[str, Any]],
                 build: Callable[[list[pathlib.Path]], Sequence[Mapping[str, Any]]], *,
                 allowed: bool | Selection = True) -> list[tuple[pathlib.Path, dict[str, Any]]]:
    """Several artifacts of one stage, the missing ones built together by one ``build`` call.

    ``build(outs)`` gets one directory per missing artifact (in the order of ``inputs``) and
    returns one summary each: K students trained in one program, K models evaluated in one batch.
    Each artifact is still its own fingerprinted directory with its own DONE.json, written once
    the whole batch is built; a kill in the middle leaves every member's partial directory (with
    its checkpoints) for the rerun, whatever members that rerun batches together. The batch's
    seconds are shared out evenly among its members (``batch`` in DONE.json says how many).
    Returns (artifact dir, summary) per input, existing artifacts included.
    """
    fps = [fingerprint(stage, one) for one in inputs]
    results: dict[str, tuple[pathlib.Path, dict[str, Any]]] = {}
    missing = []
    for fp in dict.fromkeys(fps):  # one build per fingerprint, even if asked for twice
      if self.has(stage, fp):
        self.check(stage, fp)
        logging.info("stage %s: artifact %s exists, skipped", stage, fp)
        self.skipped.append(stage)
        results[fp] = (self.artifact_dir(stage, fp), self.summary(stage, fp))
      else:
        missing.append(fp)
    if missing:
      if not allowed:
        name = allowed.name if isinstance(allowed, Selection) else stage
        part = f" (part of {name!r})" if name != stage else ""
        raise RuntimeError(f"stage {stage!r}{part} was not selected by --stages, but its artifact "
                           f"{self.artifact_dir(stage, missing[0])} does not exist yet: add "
                           f"{name!r} to --stages")
      by_fp = {fp: one for fp, one in zip(fps, inputs)}
      results.update(self._build(stage, [(fp, by_fp[fp]) for fp in missing], build, allowed))
    return [results[fp] for fp in fps]

  def _build(self, stage: str, members: list[tuple[str, Mapping[str, Any]]],
             build: Callable[[list[pathlib.Path]], Sequence[Mapping[str, Any]]],
             allowed: bool | Selection) -> dict[str, tuple[pathlib.Path, dict[str, Any]]]:
    """Builds the artifacts ``members`` ((fingerprint, inputs) each) in their partial
    directories with one ``build`` call, then marks each done and moves it into place."""
    names = " ".join(fp for fp, _ in members)
    preemption.check_between_stages(f"stage {stage} {names}")
    # One name per fingerprint, not per process: a rerun after a crash builds in the same
    # directory, where the trainer finds its checkpoints.
    partials = [self.artifact_dir(stage, fp).with_name(f"{fp}.partial") for fp, _ in members]
    _sync_processes(f"{stage} {names} start")  # every process has looked before any creates it
    if jax.process_index() == 0:
      for (fp, _), partial in zip(members, partials):
        self._adopt_unfinished(self.artifact_dir(stage, fp), partial)
    for partial in partials:
      if partial.exists():
        logging.info("stage %s: continuing in %s, left by an interrupted run", stage, partial)
    _sync_processes(f"{stage} {names} adopted")
    for partial in partials:
      partial.mkdir(parents=True, exist_ok=True)
    start, compile_start = time.time(), compilation_cache.compile_seconds()
    # With several processes (one per host) every process builds: the stage's computations are
    # collective. Each writes the same files; only the first marks the artifact done, after all
    # have finished writing, and the others wait until it is in place.
    label = (f"{stage} (stage {allowed.index} of {allowed.total})"
             if isinstance(allowed, Selection) else stage)
    logging.info("%s: building %s", label, names)
    with progress.in_stage(label):
      summaries = [dict(summary) for summary in build(partials)]
    if len(summaries) != len(members):
      raise RuntimeError(f"stage {stage}: the build returned {len(summaries)} summaries for "
                         f"{len(members)} artifacts")
    _sync_processes(f"{stage} {names} built")
    compilation_cache.release_programs_near_map_limit()
    seconds = round(time.time() - start, 2)
    compile_seconds = round(compilation_cache.compile_seconds() - compile_start, 2)
    share = len(members)
    results = {}
    for (fp, inputs), partial, summary in zip(members, partials, summaries):
      final = self.artifact_dir(stage, fp)
      if jax.process_index() == 0:
        record = {"stage": stage, "fingerprint": fp, "inputs": inputs, "summary": summary,
                  "seconds": round(seconds / share, 2),
                  "compile_seconds": round(compile_seconds / share, 2), "files": manifest(partial)}
        if share > 1:
          record["batch"] = share
        move_into_place(partial, final)
        files.write_json(final / DONE_FILE, record, default=_jsonable)  # the commit marker, last
      self.ran.append(stage)
      results[fp] = (final, summary)
    _sync_processes(f"{stage} {names} done")
    logging.info("stage %s: built %s in %.1f s (compiling %.1f s, running %.1f s)", stage, names,
                 seconds, compile_seconds, seconds - compile_seconds)
    return results

  @staticmethod
  def _adopt_unfinished(final: pathlib.Path, partial: pathlib.Path) -> None:
    """An artifact directory without DONE.json (deleted by hand, or by a tool) is unfinished: build
    on in it (a training stage resumes from its checkpoints there) rather than fail to rename the
    partial directory onto it. If a partial directory exists too, the former is set aside."""
    if not final.exists():
      return
    if not partial.exists():
      logging.warning("%s has no %s: continuing the stage in it", final, DONE_FILE)
      final.rename(partial)
      return
    aside = final.with_name(f"{final.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
    logging.warning("%s has no %s and %s exists: continuing there; moved the former to %s",
                    final, DONE_FILE, partial.name, aside)
    final.rename(aside)
