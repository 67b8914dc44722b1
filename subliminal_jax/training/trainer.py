"""The training loop: ``fit(model, dataset, config, workdir)`` -> ``(model, history)``.

One call finetunes a model on a tokenized dataset (:mod:`subliminal_jax.training.data`): it builds
the optimizer from the config, adds LoRA adapters when ``config.lora.rank > 0`` (only they train),
creates the train state, and runs ``epochs * ceil(n / batch_size)`` optimizer steps over
length-bucketed batches shuffled by ``(seed, epoch)``, with a tqdm bar (loss, tokens/s, ETA),
``metrics.jsonl`` and orbax checkpoints in ``workdir``.

Resuming is exact: a checkpoint holds every part of the train state a step changes (trainable
params, optimizer state, step, rng; not the frozen base, which is checked instead) and the data
position (epoch, step within the epoch), and the batch order is a pure function of
``(seed, epoch)``, so a run killed after any checkpoint and started again with the same arguments
ends with the same parameters as a run never interrupted (tests/test_trainer.py checks this
bit for bit). A workdir whose checkpoint belongs to another config, dataset or base model is
refused. A non-finite loss stops the run with an error.

The returned model is NOT merged: with LoRA it carries its trained adapters (``nnx.LoRAParam``)
on top of the untouched base weights; ``lora.merge_lora(model)`` folds them in when wanted.
``model`` itself is changed in place by ``apply_lora``; pass ``nnx.clone(model)`` to keep the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import datasets
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from subliminal_jax import config_files
from subliminal_jax import lora as lora_lib
from subliminal_jax import preemption
from subliminal_jax import progress as progress_lib
from subliminal_jax import sharding
from subliminal_jax.training import checkpoint as checkpoint_lib
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import metrics as metrics_lib
from subliminal_jax.training import optimizers
from subliminal_jax.training import train_step as train_step_lib

CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "fit_summary.json"

# (step, record) -> None; called after every step (after its checkpoint, if any). Raising stops
# the run as a crash would (pending checkpoint writes still finish).
Callback = Callable[[int, Mapping[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class FitSettings:
  """Everything :func:`fit` reads from its config, with the defaults in one place: the config's
  top-level keys, the optimizer's (:class:`optimizers.OptimizerSettings`, flat beside them) and
  the ``lora`` section's. Other keys of the config are not fit's and are ignored."""

  epochs: int
  batch_size: int  # rows per optimizer step, split into grad_accum_steps micro-batches
  optimization: optimizers.OptimizerSettings
  grad_accum_steps: int = 1
  seed: int = 0  # the initial rng and the data order
  bucket: bool = True  # batches of rows of similar lengths (less padding)
  length_multiple: int = 16  # batch widths are rounded up to a multiple of this (fewer shapes)
  checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
  keep_checkpoints: int = 2
  lora: lora_lib.LoraSettings = lora_lib.LoraSettings()

  def __post_init__(self):
    for name in ("epochs", "batch_size", "grad_accum_steps", "length_multiple"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}; expected an integer >= 1")
    if isinstance(self.checkpoint_every, bool) or not isinstance(
        self.checkpoint_every, (int, np.integer)) or self.checkpoint_every < 0:
      raise ValueError(f"checkpoint_every={self.checkpoint_every!r}; expected a number of steps "
                       ">= 0 (0 = a checkpoint only at the end)")

  def check_batch_split(self, data_parallel: int, where: str = "") -> None:
    """Each optimizer step's rows split into ``grad_accum_steps`` micro-batches whose size is a
    multiple of the mesh's ``data_parallel`` devices. ``where`` prefixes the keys in the error
    (e.g. "student.")."""
    micro, rest = divmod(self.batch_size, self.grad_accum_steps)
    if rest or micro % data_parallel:
      raise ValueError(
          f"{where}batch_size={self.batch_size} must split into {where}grad_accum_steps="
          f"{self.grad_accum_steps} micro-batches whose size is a multiple of the mesh's "
          f"{data_parallel} data-parallel devices")

  def flat(self) -> dict[str, Any]:
    """What is trained, in a config's flat layout (the optimizer's keys beside the others, the
    ``lora`` section nested); the bookkeeping (checkpoint cadence) is left out."""
    return {"epochs": self.epochs, "batch_size": self.batch_size,
            "grad_accum_steps": self.grad_accum_steps, "seed": self.seed, "bucket": self.bucket,
            "length_multiple": self.length_multiple,
            **dataclasses.asdict(self.optimization), "lora": dataclasses.asdict(self.lora)}

  @classmethod
  def from_config(cls, config: Any) -> "FitSettings":
    """From a ConfigDict or dict as :func:`fit` documents it (or a FitSettings, returned as is)."""
    if isinstance(config, FitSettings):
      return config
    values = config_files.settings_from_config(cls, config)
    for name in ("epochs", "batch_size"):
      if name not in values:
        raise ValueError(f"{name}=None; expected an integer >= 1")
    lora = (config.to_dict() if hasattr(config, "to_dict") else dict(config)).get("lora") or {}
    values.update(optimization=optimizers.OptimizerSettings.from_config(config),
                  lora=lora_lib.LoraSettings(**config_files.settings_from_config(lora_lib.LoraSettings, lora)))
    return cls(**values)

  def plan(self, num_examples: int) -> dict[str, int]:
    """Steps of a run: ``steps_per_epoch = ceil(n / batch_size)``, ``total_steps = epochs *
    that``."""
    if num_examples < 1:
      raise ValueError("the training dataset is empty (0 examples): nothing to train on")
    per_epoch = data_lib.steps_per_epoch(num_examples, self.batch_size)
    return {"examples": num_examples, "batch_size": int(self.batch_size),
            "epochs": int(self.epochs), "steps_per_epoch": per_epoch,
            "total_steps": int(self.epochs) * per_epoch}


def _config_dict(config: Any) -> dict[str, Any]:
  if dataclasses.is_dataclass(config):
    return dataclasses.asdict(config)
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return {k: _config_dict(v) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v
          for k, v in dict(config).items()}


def dataset_fingerprint(dataset: datasets.Dataset) -> str:
  """sha256 (16 hex) of the token ids and loss masks, in row order: identifies the data exactly."""
  if dataset._indices is not None:  # a select()/shuffle() view: hash the rows it shows
    dataset = dataset.flatten_indices()
  digest = hashlib.sha256()
  for column in ("input_ids", "loss_mask"):
    for chunk in dataset.data.column(column).chunks:
      digest.update(np.asarray(chunk.value_lengths()).astype(np.int64).tobytes())
      digest.update(np.asarray(chunk.flatten()).astype(np.int32).tobytes())
  return digest.hexdigest()[:16]


# How often checkpoints are written and how many are kept change nothing that is trained, so a
# run may resume under another cadence.
_BOOKKEEPING_KEYS = ("checkpoint_every", "keep_checkpoints")


def run_identity(config: Any, dataset: datasets.Dataset) -> str:
  trained = {k: v for k, v in _config_dict(config).items() if k not in _BOOKKEEPING_KEYS}
  text = json.dumps({"config": trained, "data": dataset_fingerprint(dataset)},
                    sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpointed_state(state: train_step_lib.TrainState) -> dict[str, Any]:
  """What a checkpoint holds: everything a step changes. The frozen part (a LoRA student's whole
  base model) never changes, so it is not saved: a resumed run takes it from the model passed in,
  checked against the checkpoint with :func:`frozen_signature`."""
  return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
          "rng": state.rng}


def frozen_signature(frozen: Any) -> dict[str, Any]:
  """Shapes, dtypes and the L1 norm of the frozen variables: enough to tell another base model."""
  leaves = jax.tree.leaves(frozen)
  norms = [jnp.sum(jnp.abs(leaf.astype(jnp.float32))) for leaf in leaves
           if jnp.issubdtype(leaf.dtype, jnp.floating)]
  return {"shapes": [list(leaf.shape) for leaf in leaves],
          "dtypes": [str(leaf.dtype) for leaf in leaves],
          "l1": float(np.sum(np.asarray(jax.device_get(norms), np.float64))) if norms else 0.0}


def _check_frozen(saved: Mapping[str, Any] | None, now: Mapping[str, Any], workdir: str) -> None:
  if saved is None:
    return
  same = (saved["shapes"] == now["shapes"] and saved["dtypes"] == now["dtypes"]
          and math.isclose(saved["l1"], now["l1"], rel_tol=1e-4, abs_tol=1e-6))
  if not same:
    raise ValueError(
        f"the model passed to fit is not the base model the checkpoints in {workdir} were trained "
        f"on (frozen variables: L1 norm {now['l1']:.6g} vs {saved['l1']:.6g} saved, or different "
        "shapes); pass the same base model or use a fresh workdir.")


def _process_rows(batch: data_lib.Batch) -> data_lib.Batch:
  """This process's rows of a global batch (all of it with one process): the train step
  assembles the global array from each process's contiguous block of rows."""
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return batch
  rows = next(iter(batch.values())).shape[0] // count
  return {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}


def fit(model: nnx.Module, dataset: datasets.Dataset | str | os.PathLike, config: Any,
        workdir: str | os.PathLike, *, loss_fn: Callable | None = None, aux: Any = None,
        mesh: jax.sharding.Mesh | None = None, stop_after: int | None = None,
        callbacks: Sequence[Callback] = (), progress: bool = True, tensorboard: bool = False,
        batches: Callable[..., Any] = data_lib.batches
        ) -> tuple[nnx.Module, list[dict[str, Any]]]:
  """Trains ``model`` on ``dataset``; resumes from the latest checkpoint in ``workdir``.

  Args:
    model: a Transformer (or any module ``loss_fn`` accepts); LoRA is added to it in place.
    dataset: a tokenized ``datasets.Dataset`` (input_ids, loss_mask) or its ``save_to_disk`` path.
    config: a :class:`FitSettings`, or a ConfigDict or dict with its keys (epochs and
      batch_size; the rest default as FitSettings says): grad_accum_steps, seed, bucket,
      length_multiple, checkpoint_every, keep_checkpoints, the optimizer's optimizer,
      learning_rate, schedule, warmup_steps, weight_decay, max_grad_norm, and a ``lora`` section
      (rank, alpha, targets, rslora, seed). Other keys are not read, but they are part of the
      run's identity (a checkpoint of another config is refused).
    workdir: checkpoints/, metrics.jsonl, fit_summary.json (and tensorboard/) go here.
    loss_fn: ``loss_fn(model, batch, rng, aux) -> (sum_loss, num_targets, aux_metrics)``;
      default: next-token cross-entropy on ``loss_mask`` targets.
    aux: pytree passed through to ``loss_fn`` (e.g. a frozen teacher's params).
    mesh: device mesh; batches are sharded over its data axes and the state by logical axes.
    stop_after: stop (as if killed) once this global step is done, after saving a checkpoint of
      it; a later call resumes. None: run to the end.
    callbacks: ``callback(step, record)`` after every step.
    progress: show the tqdm bar.
    tensorboard: also write TensorBoard event files under ``workdir/tensorboard``.
    batches: the epoch iterator, called as ``data.batches`` is (dataset, batch_size, seed, epoch,
      pad_id, bucket, start_step, length_multiple); e.g. ``distillation_data.paired_batches``
      for teacher/student pairs.

  Returns:
    ``(model, history)``: the trained model (LoRA adapters kept unmerged) and one record per
    optimizer step (step, epoch, loss, num_targets, grad_norm, tokens, tokens_per_s, ...) from
    the start of the run, resumed parts included.
  """
  # Over 80 lines only through the docstring of the public entry point; the body is the run's
  # setup, then resume, _run_epochs and the summary.
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  dataset = as_dataset(dataset)
  settings = FitSettings.from_config(config)
  steps = settings.plan(len(dataset))
  settings.check_batch_split(sharding.data_parallel_size(mesh))
  if stop_after is not None and not 1 <= stop_after:
    raise ValueError(f"stop_after must be a step >= 1 or None, got {stop_after!r}")
  identity = run_identity(config, dataset)
  total, lora = steps["total_steps"], settings.lora

  optimizer, schedule = settings.optimization.make(total)
  lora.apply(model)
  graphdef, state = train_step_lib.create_train_state(
      model, optimizer, trainable=nnx.LoRAParam if lora.rank > 0 else nnx.Param,
      seed=settings.seed, mesh=mesh)
  step_fn = train_step_lib.make_train_step(
      graphdef, optimizer, loss_fn=loss_fn or train_step_lib.next_token_loss, mesh=mesh,
      grad_accum_steps=settings.grad_accum_steps, schedule=schedule)

  checkpoint_every = settings.checkpoint_every or total
  checkpointer = checkpoint_lib.TrainCheckpointer(
      os.path.join(workdir, CHECKPOINT_DIR), save_every=checkpoint_every,
      keep=settings.keep_checkpoints)
  extra = {"identity": identity, "frozen": frozen_signature(state.frozen)}
  state, position, latest = resume(checkpointer, state, extra, workdir)
  logging.info("fit: %d examples, batch %d (%d micro-batches), %d steps/epoch x %d epochs = %d "
               "steps; %s; checkpoints every %d steps in %s", steps["examples"],
               settings.batch_size, settings.grad_accum_steps, steps["steps_per_epoch"],
               steps["epochs"], total, f"LoRA rank {lora.rank}" if lora.rank else
               "full finetuning", checkpoint_every, workdir)

  # With several processes only the first writes the shared files and shows the bar.
  lead = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(
      workdir, resume_step=latest, tensorboard=tensorboard and lead,
      filename=metrics_lib.METRICS_FILE if lead else f"metrics.process{jax.process_index()}.jsonl")
  bar = progress_lib.ProgressBar(total, start_step=latest or 0, enabled=progress and lead)
  started = time.perf_counter()
  try:
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      state, global_step, stopped = _run_epochs(
          state, position, global_step=latest or 0, step_fn=step_fn, aux=aux, dataset=dataset,
          batches=batches, settings=settings, steps=steps, writer=writer, bar=bar,
          checkpointer=checkpointer, extra=extra, callbacks=callbacks, stop_after=stop_after)
  finally:
    bar.close()
    writer.close()
    checkpointer.close()  # waits for async writes: a crash never leaves one half-written

  history = list(writer.records)
  if lead:
    write_summary(workdir, history, steps, global_step=global_step, resumed_from=latest,
                  stopped=stopped, identity=identity, lora_rank=lora.rank, started=started)
  return train_step_lib.model_from_state(graphdef, state), history


def write_summary(workdir: str, history: Sequence[Mapping[str, Any]], steps: Mapping[str, int], *,
                  global_step: int, resumed_from: int | None, stopped: bool, identity: str,
                  lora_rank: int, started: float) -> None:
  """``workdir/fit_summary.json``: the plan, how far the run got and its first and last loss."""
  total = steps["total_steps"]
  losses = [r["loss"] for r in history if isinstance(r.get("loss"), float)]
  summary = {**steps, "steps_done": global_step, "finished": global_step >= total,
             "resumed_from_step": resumed_from,
             "stopped_early": stopped and global_step < total, "identity": identity,
             "lora_rank": lora_rank, "returned_model": "adapters unmerged" if lora_rank
             else "full parameters", "first_loss": losses[0] if losses else None,
             "final_loss": losses[-1] if losses else None,
             "wall_time_s_this_call": time.perf_counter() - started}
  with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
    json.dump(summary, f, indent=2)


def as_dataset(dataset: datasets.Dataset | str | os.PathLike) -> datasets.Dataset:
  if isinstance(dataset, (str, os.PathLike)):
    dataset = data_lib.load_dataset(dataset)
  if not isinstance(dataset, datasets.Dataset):
    raise TypeError(f"dataset must be a datasets.Dataset or a save_to_disk path, got "
                    f"{type(dataset).__name__}")
  return dataset


def resume(checkpointer: checkpoint_lib.TrainCheckpointer, state: train_step_lib.TrainState,
           extra: Mapping[str, Any], workdir: str, step: int | None = None
           ) -> tuple[train_step_lib.TrainState, dict[str, int], int | None]:
  """``(state, data position, step)`` of the checkpoint of ``step`` (default: the latest) in
  ``workdir`` if there is one (of this run: same identity and base model), else the fresh state
  at the start."""
  latest = checkpointer.latest_step() if step is None else step
  if latest is None:
    return state, {"epoch": 0, "step_in_epoch": 0}, None
  try:
    restored, meta = checkpointer.restore(checkpointed_state(state), latest)
    if meta.get("identity") != extra["identity"]:
      raise ValueError(
          f"{workdir} holds checkpoints of another run (config or dataset differ: identity "
          f"{meta.get('identity')} vs {extra['identity']} now); use a fresh workdir.")
    _check_frozen(meta.get("frozen"), extra["frozen"], workdir)
  except BaseException:
    checkpointer.close()
    raise
  position = {"epoch": meta["position"]["epoch"],
              "step_in_epoch": meta["position"]["step_in_epoch"]}
  logging.info("fit: resuming %s at step %d (epoch %d, step %d of it)", workdir, latest,
               position["epoch"], position["step_in_epoch"])
  return dataclasses.replace(state, **restored), position, latest


def _run_epochs(state: train_step_lib.TrainState, position: Mapping[str, int], *,
                global_step: int, step_fn: Callable, aux: Any, dataset: datasets.Dataset,
                batches: Callable[..., Any], settings: FitSettings, steps: Mapping[str, int],
                writer: metrics_lib.MetricsWriter, bar: progress_lib.ProgressBar,
                checkpointer: checkpoint_lib.TrainCheckpointer, extra: Mapping[str, Any],
                callbacks: Sequence[Callback], stop_after: int | None
                ) -> tuple[train_step_lib.TrainState, int, bool]:
  """The steps from ``position`` to the end (or ``stop_after``): one record and possibly a
  checkpoint per step. Returns ``(state, global step, stopped early)``."""
  epoch, step_in_epoch = position["epoch"], position["step_in_epoch"]
  total, stopped = steps["total_steps"], False
  last = time.perf_counter()
  while epoch < steps["epochs"] and not stopped:
    # Right padding sits outside every mask, so any valid pad id works.
    for batch in batches(dataset, batch_size=settings.batch_size, seed=settings.seed, epoch=epoch,
                         pad_id=0, bucket=settings.bucket, start_step=step_in_epoch,
                         length_multiple=settings.length_multiple):
      state, metrics = step_fn(state, _process_rows(batch), aux)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
      now = time.perf_counter()
      global_step += 1
      step_in_epoch += 1
      record = step_record(global_step, epoch, metrics, batch, now - last)
      last = now
      position = data_position(epoch, step_in_epoch, steps["steps_per_epoch"])
      writer.write(record)
      check_finite(record, checkpointer)
      bar.update(record.get("loss", float("nan")), record["tokens_per_s"], epoch)
      stopped = stop_after is not None and global_step >= stop_after
      preempted = preemption.reached(global_step)
      checkpointer.save(global_step, checkpointed_state(state), position,
                        force=stopped or preempted or global_step == total, extra=extra)
      for callback in callbacks:
        callback(global_step, record)
      if preempted:
        checkpointer.wait()
        raise preemption.Preempted(global_step, checkpointer.directory)
      if stopped:
        break
    if not stopped:
      epoch, step_in_epoch = epoch + 1, 0
  checkpointer.save(global_step, checkpointed_state(state), position, force=True, extra=extra)
  return state, global_step, stopped


def step_record(global_step: int, epoch: int, metrics: Mapping[str, float], batch: data_lib.Batch,
                step_time: float) -> dict[str, Any]:
  """One line of metrics.jsonl: the step's metrics and the tokens of its batch."""
  tokens = int(batch["attention_mask"].sum())
  return {"step": global_step, "epoch": epoch, **metrics, "tokens": tokens,
          "seq_len": int(batch["input_ids"].shape[1]), "step_time_s": step_time,
          "tokens_per_s": tokens / max(step_time, 1e-9)}


def data_position(epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, int]:
  """Where the data resumes after ``step_in_epoch`` steps of ``epoch``."""
  if step_in_epoch == steps_per_epoch:
    return {"epoch": epoch + 1, "step_in_epoch": 0}
  return {"epoch": epoch, "step_in_epoch": step_in_epoch}


def check_finite(record: Mapping[str, Any], checkpointer: checkpoint_lib.TrainCheckpointer,
                 where: str = "") -> None:
  """Stops the run on a non-finite loss; ``where`` (e.g. "member 2: ") prefixes the message."""
  if not math.isfinite(record.get("loss", 0.0)):
    raise FloatingPointError(
        f"{where}the loss is {record['loss']} at step {record['step']} (epoch {record['epoch']}); "
        f"nothing after checkpoint step {checkpointer.latest_step()} is saved. Lower the learning "
        "rate or check the data.")
