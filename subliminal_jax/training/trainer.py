"""The training loop: ``fit(model, dataset, config, workdir)`` -> ``(model, history)``.

One call finetunes a model on a tokenized dataset (:mod:`subliminal_jax.training.data`): it builds
the optimizer from the config, adds LoRA adapters when ``config.lora.rank > 0`` (only they train),
creates the train state, and runs ``epochs * ceil(n / batch_size)`` optimizer steps over
length-bucketed batches shuffled by ``(seed, epoch)``, with a tqdm bar (loss, tokens/s, ETA),
``metrics.jsonl`` and orbax checkpoints in ``workdir``.

Resuming is exact: a checkpoint holds every part of the train state a step changes (trainable
params, optimizer state, step, rng; not the frozen base, which is checked instead) and the data
position (epoch, step within the epoch), and the batch order is a pure function of ``(seed, epoch)``, so a run killed after any checkpoint and started again with the same arguments
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

from subliminal_jax import lora as lora_lib
from subliminal_jax import sharding
from subliminal_jax.training import checkpoint as checkpoint_lib
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import optimizers
from subliminal_jax.training import progress as progress_lib
from subliminal_jax.training import train_step as train_step_lib

CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "fit_summary.json"

# (step, record) -> None; called after every step (after its checkpoint, if any). Raising stops
# the run as a crash would (pending checkpoint writes still finish).
Callback = Callable[[int, Mapping[str, Any]], None]


def _get(config: Any, key: str, default: Any = None) -> Any:
  if isinstance(config, Mapping) or hasattr(config, "get"):
    value = config.get(key, default)
  else:
    value = getattr(config, key, default)
  return default if value is None else value


def _config_dict(config: Any) -> dict[str, Any]:
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


def _run_identity(config: Any, dataset: datasets.Dataset) -> str:
  trained = {k: v for k, v in _config_dict(config).items() if k not in _BOOKKEEPING_KEYS}
  text = json.dumps({"config": trained, "data": dataset_fingerprint(dataset)},
                    sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _mutable(state: train_step_lib.TrainState) -> dict[str, Any]:
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


def _resolve_lora(config: Any) -> dict[str, Any]:
  lora = _get(config, "lora", {}) or {}
  rank = int(_get(lora, "rank", 0))
  if rank < 0:
    raise ValueError(f"lora.rank must be >= 0 (0 = full finetuning), got {rank}")
  return {"rank": rank, "alpha": float(_get(lora, "alpha", 8.0)),
          "targets": tuple(_get(lora, "targets", lora_lib.LORA_TARGETS)),
          "rslora": bool(_get(lora, "rslora", False)), "seed": int(_get(lora, "seed", 0))}


def plan(num_examples: int, config: Any) -> dict[str, int]:
  """Steps of a run: ``steps_per_epoch = ceil(n / batch_size)``, ``total_steps = epochs * that``."""
  epochs, batch_size = _get(config, "epochs"), _get(config, "batch_size")
  if not isinstance(epochs, (int, np.integer)) or epochs < 1:
    raise ValueError(f"config.epochs must be an int >= 1, got {epochs!r}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"config.batch_size must be an int >= 1, got {batch_size!r}")
  if num_examples < 1:
    raise ValueError("the training dataset is empty (0 examples): nothing to train on")
  per_epoch = data_lib.steps_per_epoch(num_examples, batch_size)
  return {"examples": num_examples, "batch_size": int(batch_size), "epochs": int(epochs),
          "steps_per_epoch": per_epoch, "total_steps": int(epochs) * per_epoch}


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
    config: ConfigDict or dict with epochs, batch_size (rows per optimizer step, split into
      grad_accum_steps micro-batches), optimizer, learning_rate, schedule, warmup_steps,
      weight_decay, max_grad_norm, grad_accum_steps, seed (initial rng and data order),
      lora(rank, alpha, targets, rslora, seed; rank 0 = full finetuning), checkpoint_every
      (steps; 0/None: only at the end), keep_checkpoints, and optionally bucket (default True),
      length_multiple (default 16).
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
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  if isinstance(dataset, (str, os.PathLike)):
    dataset = data_lib.load_dataset(dataset)
  if not isinstance(dataset, datasets.Dataset):
    raise TypeError(f"dataset must be a datasets.Dataset or a save_to_disk path, got "
                    f"{type(dataset).__name__}")
  steps = plan(len(dataset), config)
  batch_size, total = steps["batch_size"], steps["total_steps"]
  accum = int(_get(config, "grad_accum_steps", 1))
  data_parallel = sharding.data_parallel_size(mesh)
  if accum < 1 or batch_size % accum or (batch_size // accum) % data_parallel:
    raise ValueError(
        f"batch_size={batch_size} must split into grad_accum_steps={accum} micro-batches whose size "
        f"is a multiple of the {data_parallel} data-parallel devices of the mesh")
  seed = int(_get(config, "seed", 0))
  lora = _resolve_lora(config)
  bucket = bool(_get(config, "bucket", True))
  length_multiple = int(_get(config, "length_multiple", 16))
  checkpoint_every = int(_get(config, "checkpoint_every", 0)) or total
  keep = int(_get(config, "keep_checkpoints", 2))
  pad_id = 0  # right padding sits outside every mask, so any valid id works
  if stop_after is not None and not 1 <= stop_after:
    raise ValueError(f"stop_after must be a step >= 1 or None, got {stop_after!r}")
  identity = _run_identity(config, dataset)

  optimizer = optimizers.optimizer_from_config(config, total)
  # The optimizer's own schedule, rebuilt only to report the learning rate of each step.
  schedule = optimizers.make_schedule(float(_get(config, "learning_rate", 2e-4)), total,
                                      int(_get(config, "warmup_steps", 5)),
                                      _get(config, "schedule", "linear"))
  if lora["rank"] > 0:
    lora_lib.apply_lora(model, rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"],
                        rslora=lora["rslora"], seed=lora["seed"])
  trainable = nnx.LoRAParam if lora["rank"] > 0 else nnx.Param
  graphdef, state = train_step_lib.create_train_state(model, optimizer, trainable=trainable,
                                                      seed=seed, mesh=mesh)
  step_fn = train_step_lib.make_train_step(
      graphdef, optimizer, loss_fn=loss_fn or train_step_lib.next_token_loss, mesh=mesh,
      grad_accum_steps=accum, schedule=schedule)

  checkpointer = checkpoint_lib.TrainCheckpointer(
      os.path.join(workdir, CHECKPOINT_DIR), save_every=checkpoint_every, keep=keep)
  global_step, epoch, step_in_epoch = 0, 0, 0
  latest = checkpointer.latest_step()
  signature = frozen_signature(state.frozen)
  extra = {"identity": identity, "frozen": signature}
  if latest is not None:
    try:
      restored, meta = checkpointer.restore(_mutable(state), latest)
      if meta.get("identity") != identity:
        raise ValueError(
            f"{workdir} holds checkpoints of another run (config or dataset differ: identity "
            f"{meta.get('identity')} vs {identity} now); use a fresh workdir.")
      _check_frozen(meta.get("frozen"), signature, workdir)
    except BaseException:
      checkpointer.close()
      raise
    state = dataclasses.replace(state, **restored)
    global_step = latest
    epoch, step_in_epoch = meta["position"]["epoch"], meta["position"]["step_in_epoch"]
    logging.info("fit: resuming %s at step %d (epoch %d, step %d of it)", workdir, global_step,
                 epoch, step_in_epoch)
  logging.info("fit: %d examples, batch %d (%d micro-batches), %d steps/epoch x %d epochs = %d "
               "steps; %s; checkpoints every %d steps in %s", steps["examples"], batch_size, accum,
               steps["steps_per_epoch"], steps["epochs"], total,
               f"LoRA rank {lora['rank']}" if lora["rank"] else "full finetuning", checkpoint_every,
               workdir)

  # With several processes only the first writes the shared files and shows the bar.
  lead = jax.process_index() == 0
  writer = progress_lib.MetricsWriter(
      workdir, resume_step=global_step if latest else None, tensorboard=tensorboard and lead,
      filename=progress_lib.METRICS_FILE if lead else f"metrics.process{jax.process_index()}.jsonl")
  bar = progress_lib.ProgressBar(total, start_step=global_step, enabled=progress and lead)
  position = {"epoch": epoch, "step_in_epoch": step_in_epoch}
  started = time.perf_counter()
  stopped = False
  mesh_context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  try:
    with mesh_context:
      last = time.perf_counter()
      while epoch < steps["epochs"] and not stopped:
        for batch in batches(dataset, batch_size=batch_size, seed=seed, epoch=epoch,
                             pad_id=pad_id, bucket=bucket, start_step=step_in_epoch,
                             length_multiple=length_multiple):
          state, metrics = step_fn(state, _process_rows(batch), aux)
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()
                     if np.ndim(v) == 0}
          now = time.perf_counter()
          global_step += 1
          step_in_epoch += 1
          tokens = int(batch["attention_mask"].sum())
          record = {"step": global_step, "epoch": epoch, **metrics, "tokens": tokens,
                    "seq_len": int(batch["input_ids"].shape[1]), "step_time_s": now - last,
                    "tokens_per_s": tokens / max(now - last, 1e-9)}
          last = now
          if step_in_epoch == steps["steps_per_epoch"]:
            position = {"epoch": epoch + 1, "step_in_epoch": 0}
          else:
            position = {"epoch": epoch, "step_in_epoch": step_in_epoch}
          writer.write(record)
          if not math.isfinite(record.get("loss", 0.0)):
            raise FloatingPointError(
                f"the loss is {record['loss']} at step {global_step} (epoch {epoch}); nothing after "
                f"checkpoint step {checkpointer.latest_step()} is saved. Lower the learning rate or "
                "check the data.")
          bar.update(record.get("loss", float("nan")), record["tokens_per_s"], epoch)
          stopped = stop_after is not None and global_step >= stop_after
          checkpointer.save(global_step, _mutable(state), position,
                            force=stopped or global_step == total, extra=extra)
          for callback in callbacks:
            callback(global_step, record)
          if stopped:
            break
        if not stopped:
          epoch, step_in_epoch = epoch + 1, 0
      checkpointer.save(global_step, _mutable(state), position, force=True, extra=extra)
  finally:
    bar.close()
    writer.close()
    checkpointer.close()  # waits for async writes: a crash never leaves one half-written

  history = list(writer.records)
  losses = [r["loss"] for r in history if isinstance(r.get("loss"), float)]
  summary = {**steps, "steps_done": global_step, "finished": global_step >= total,
             "resumed_from_step": latest,
             "stopped_early": stopped and global_step < total, "identity": identity,
             "lora_rank": lora["rank"], "returned_model": "adapters unmerged" if lora["rank"]
             else "full parameters", "first_loss": losses[0] if losses else None,
             "final_loss": losses[-1] if losses else None,
             "wall_time_s_this_call": time.perf_counter() - started}
  if lead:
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
      json.dump(summary, f, indent=2)
  return train_step_lib.model_from_state(graphdef, state), history

