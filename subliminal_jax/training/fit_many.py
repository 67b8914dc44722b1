"""Many LoRA finetunes of one base model, trained together: ``fit_many(base, datasets, settings,
workdirs)`` -> ``[(model, history), ...]``.

A transfer matrix trains dozens of small LoRA students over one shared base. Trained one at a time
by :func:`trainer.fit`, each reads the whole base for a few adapter FLOPs; here K of them take
their optimizer steps together, in ONE jitted program per step: :mod:`training.ensemble`'s step
(fit's train step under ``jax.vmap``) on ``[K, B, T]`` batches, the base stored once and read once
per step for all K.

Member i is what ``fit(lora.apply(nnx.clone(base)), datasets[i], settings[i], workdirs[i])``
trains: its own adapter init (``settings[i].lora.seed``), data order (``settings[i].seed``: the
batches ``data.batches`` gives fit), step rng (the same seed, as in fit) and optimizer state. Each
step's K batches are right-padded to the widest of them (token 0, outside every mask), which
changes no member's loss: the objective sums over its targets and causal attention never looks
right. So each member ends where fit ends, up to float rounding (vmap and the wider batches change
the order of sums), and no member's data reaches another's adapters. (An objective that draws
random numbers shaped like the batch, e.g. per token, draws other numbers in a padded batch.)

One program needs one shape and one optimizer: the members must agree on ``lora`` rank, alpha,
targets and rslora, ``epochs``, ``batch_size``, ``grad_accum_steps``, the optimizer settings and the
number of steps (datasets whose ``ceil(n / batch_size)`` is the same); a member that does not is
refused, naming it and the field. They may differ in ``seed``, ``lora.seed``, ``bucket``,
``length_multiple`` and the checkpoint cadence.

Each workdir is a fit workdir: ``metrics.jsonl``, ``fit_summary.json`` and ``checkpoints/`` with
the member's own checkpoints, saved at the member's cadence in fit's format and under fit's run
identity (``fit`` with the same arguments on a finished workdir trains nothing and returns the same
adapters). A run stopped (``stop_after``) or killed resumes from the latest step that every member
has a checkpoint of, with the batches, rngs and optimizer states an uninterrupted run has there.
One process only (the batches are assembled on its host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping, Sequence

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from subliminal_jax import preemption
from subliminal_jax import progress as progress_lib
from subliminal_jax import sharding
from subliminal_jax.training import checkpoint as checkpoint_lib
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import ensemble
from subliminal_jax.training import metrics as metrics_lib
from subliminal_jax.training import optimizers
from subliminal_jax.training import trainer
from subliminal_jax.training.losses import next_token_loss
from subliminal_jax.training.train_step import TrainState

# What makes one program: the members must agree on these (dotted: a field of a section).
SHARED_FIELDS = ("epochs", "batch_size", "grad_accum_steps",
                 *(f"optimization.{field.name}"
                   for field in dataclasses.fields(optimizers.OptimizerSettings)),
                 "lora.rank", "lora.alpha", "lora.targets", "lora.rslora")


# A member's step holds its logits in float32 about this many times over (the logits, their
# log-softmax and their gradient, with one more for XLA's temporaries), and this many float32
# vectors of the hidden size per token and layer for the backward pass. Measured on CPU: 3.9 GB per
# Gemma 3 270M student at batch 8 x 96 tokens (262k vocabulary, 18 layers of 640), and 27 GB for
# eight SmolLM2-135M teachers at batch 16 x 96 (49k vocabulary, 30 layers of 576: 3.4 GB each);
# these figures estimate 4.1 and 3.8 GB.
LOGIT_COPIES = 4
ACTIVATION_VECTORS = 24
# Of the memory free when a group starts, the share its members may take.
MEMORY_SHARE = 0.75


def member_bytes(config: Any, batch_size: int, length: int) -> int:
  """The memory one member of :func:`fit_many` adds to a step, estimated from its widest batch:
  ``LOGIT_COPIES`` float32 copies of its logits, plus its layers' activations kept for the
  backward pass (``ACTIVATION_VECTORS`` float32 vectors of the hidden size per token and layer)."""
  tokens = batch_size * length
  return 4 * tokens * (LOGIT_COPIES * config.vocab_size
                       + ACTIVATION_VECTORS * config.hidden_size * config.num_layers)


def free_bytes() -> int | None:
  """Memory free for a new group of members: the first accelerator's limit minus what is in use,
  or the host's MemAvailable on CPU (None when neither is known)."""
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo") as f:
      fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return None


def members_that_fit(requested: int, per_member: int, available: int | None) -> int:
  """How many members of ``per_member`` bytes to train together: ``requested``, capped so they
  take at most ``MEMORY_SHARE`` of ``available`` (at least one; unknown memory: ``requested``)."""
  if available is None or per_member <= 0:
    return requested
  return max(1, min(requested, int(MEMORY_SHARE * available) // per_member))


def _field(settings: trainer.FitSettings, name: str) -> Any:
  return functools.reduce(getattr, name.split("."), settings)


def check_members(settings: Sequence[trainer.FitSettings], sizes: Sequence[int]
                  ) -> list[dict[str, int]]:
  """Each member's plan (:meth:`FitSettings.plan`) when the members can train as one program;
  otherwise a ValueError naming the first member and field that differ from member 0's (or a
  member without adapters)."""
  first = settings[0]
  for i, member in enumerate(settings):
    if member.lora.rank < 1:
      raise ValueError(f"member {i}: lora.rank={member.lora.rank}; fit_many trains LoRA adapters "
                       "on a shared base (rank >= 1); use fit for full finetuning")
    for name in SHARED_FIELDS:
      if _field(member, name) != _field(first, name):
        raise ValueError(
            f"member {i}: {name}={_field(member, name)!r} but member 0 has "
            f"{_field(first, name)!r}; fit_many trains all members in one program, so they must "
            f"agree on {name}")
  plans = [member.plan(n) for member, n in zip(settings, sizes)]
  for i, plan in enumerate(plans):
    if plan["steps_per_epoch"] != plans[0]["steps_per_epoch"]:
      raise ValueError(
          f"member {i}: its dataset of {sizes[i]} examples makes {plan['steps_per_epoch']} steps "
          f"per epoch, member 0's of {sizes[0]} makes {plans[0]['steps_per_epoch']}; fit_many "
          "needs the same number of steps for all (equal dataset sizes)")
  return plans


@dataclasses.dataclass
class _Member:
  """One finetune of the ensemble: its inputs and its workdir's files."""

  index: int
  dataset: datasets.Dataset
  settings: trainer.FitSettings
  workdir: str
  plan: dict[str, int]
  extra: dict[str, Any]  # saved with each checkpoint: the run's identity and base signature
  checkpointer: checkpoint_lib.TrainCheckpointer | None = None
  writer: metrics_lib.MetricsWriter | None = None


def fit_many(base_model: nnx.Module, datasets: Sequence[datasets.Dataset | str | os.PathLike],
             settings: Sequence[Any], workdirs: Sequence[str | os.PathLike], *,
             loss_fn: Callable | None = None, aux: Any = None,
             mesh: jax.sharding.Mesh | None = None, stop_after: int | None = None,
             progress: bool = True, tensorboard: bool = False,
             batches: Callable[..., Any] = data_lib.batches
             ) -> list[tuple[nnx.Module, list[dict[str, Any]]]]:
  """Trains K LoRA finetunes of ``base_model`` together; resumes from their checkpoints.

  Args:
    base_model: the shared base (a Transformer without adapters); left unchanged.
    datasets: member i's tokenized dataset (or ``save_to_disk`` path), as fit takes it.
    settings: member i's :class:`trainer.FitSettings` (or a config fit accepts); see the module
      docstring for what the members must share.
    workdirs: member i's fit workdir (distinct).
    loss_fn, aux, mesh, stop_after, progress, tensorboard, batches: as in :func:`trainer.fit`
      (one ``aux`` for all members; ``stop_after`` stops all after that step). On ``mesh`` the
      state is placed under the active sharding rules (by default each member's batch is split
      over the data-parallel devices, as fit splits it; ``ensemble.ensemble_rules`` in
      ``sharding.use_rules`` spreads the members instead).

  Returns:
    One ``(model, history)`` per member, as fit returns them: the base with the member's trained
    adapters (unmerged; the base's arrays are shared, not copied) and its per-step records (their
    ``step_time_s`` is the shared step's time).
  """
  if not len(datasets) == len(settings) == len(workdirs) or not datasets:
    raise ValueError(f"fit_many needs as many datasets ({len(datasets)}), settings "
                     f"({len(settings)}) and workdirs ({len(workdirs)}), at least one")
  if jax.process_count() > 1:
    raise ValueError("fit_many runs in one process; with several, train each member with fit")
  if stop_after is not None and not 1 <= stop_after:
    raise ValueError(f"stop_after must be a step >= 1 or None, got {stop_after!r}")
  fits = [trainer.FitSettings.from_config(config) for config in settings]
  data = [trainer.as_dataset(dataset) for dataset in datasets]
  plans = check_members(fits, [len(d) for d in data])
  fits[0].check_batch_split(sharding.data_parallel_size(mesh))
  workdirs = [os.path.abspath(os.fspath(w)) for w in workdirs]
  if len(set(workdirs)) != len(workdirs):
    raise ValueError(f"every member needs its own workdir, got {workdirs}")

  plan = plans[0]
  optimizer, schedule = fits[0].optimization.make(plan["total_steps"])
  graphdef, state = _ensemble_state(base_model, fits, optimizer, mesh)
  step_fn = ensemble.make_ensemble_step(
      graphdef, optimizer, loss_fn=loss_fn or next_token_loss, mesh=mesh,
      grad_accum_steps=fits[0].grad_accum_steps, schedule=schedule, shared_batch=False)
  frozen = trainer.frozen_signature(state.frozen)
  members = [_Member(i, d, f, w, p, {"identity": trainer.run_identity(config, d), "frozen": frozen})
             for i, (d, f, w, p, config) in enumerate(zip(data, fits, workdirs, plans, settings))]
  logging.info("fit_many: %d LoRA finetunes (rank %d) of one base, batch %d, %d steps/epoch x %d "
               "epochs = %d steps each, one step for all per call", len(members),
               fits[0].lora.rank, fits[0].batch_size, plan["steps_per_epoch"], plan["epochs"],
               plan["total_steps"])

  with contextlib.ExitStack() as stack:  # closes the bar, the logs, then the checkpointers
    for member in members:
      os.makedirs(member.workdir, exist_ok=True)
      member.checkpointer = stack.enter_context(checkpoint_lib.TrainCheckpointer(
          os.path.join(member.workdir, trainer.CHECKPOINT_DIR),
          save_every=member.settings.checkpoint_every or plan["total_steps"],
          keep=member.settings.keep_checkpoints))
    state, position, latest = _resume(members, state)
    for member in members:
      member.writer = stack.enter_context(metrics_lib.MetricsWriter(
          member.workdir, resume_step=latest, tensorboard=tensorboard))
    bar = progress_lib.ProgressBar(plan["total_steps"], start_step=latest or 0,
                                   desc=f"training {len(members)} adapters", enabled=progress)
    stack.callback(bar.close)
    started = time.perf_counter()
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      state, global_step, stopped = _run_steps(
          state, position, global_step=latest or 0, step_fn=step_fn, aux=aux, members=members,
          batches=batches, plan=plan, bar=bar, stop_after=stop_after)

  results = []
  for member in members:
    history = list(member.writer.records)
    trainer.write_summary(member.workdir, history, member.plan, global_step=global_step,
                          resumed_from=latest, stopped=stopped, identity=member.extra["identity"],
                          lora_rank=member.settings.lora.rank, started=started)
    results.append((ensemble.model_from_ensemble(graphdef, state, member.index), history))
  return results


def _ensemble_state(base_model: nnx.Module, fits: Sequence[trainer.FitSettings],
                    optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh | None
                    ) -> tuple[nnx.GraphDef, TrainState]:
  """The stacked train state of the members' adapters over ONE copy of the base. Each member is
  ``lora.apply(nnx.clone(base))`` as in fit; a clone shares the base's arrays, so the first
  member's frozen part is every member's (``ensemble.create_ensemble_state``'s check that the
  frozen parts are equal would read the whole base K times for nothing)."""
  graphdef, frozen, adapters = None, None, []
  for i, fit in enumerate(fits):
    member_graphdef, trainable, member_frozen = nnx.split(
        fit.lora.apply(nnx.clone(base_model)), nnx.LoRAParam, ...)
    if graphdef is None:
      graphdef, frozen = member_graphdef, member_frozen
    elif member_graphdef != graphdef:
      raise ValueError(f"member {i}'s adapted model has another structure than member 0's")
    adapters.append(trainable)
  state = ensemble.stacked_train_state(ensemble.stack_states(adapters), optimizer, frozen=frozen,
                                       seeds=[fit.seed for fit in fits], mesh=mesh)
  return graphdef, state


def _member_state(state: TrainState, index: int) -> TrainState:
  """Member ``index`` of the stacked state, shaped as fit's state of one model."""
  return TrainState(step=state.step[index],
                    trainable=ensemble.unstack_state(state.trainable, index), frozen=state.frozen,
                    opt_state=ensemble.unstack_state(state.opt_state, index), rng=state.rng[index])


def _stacked_state(members: Sequence[TrainState]) -> TrainState:
  """The members' states stacked again (the inverse of :func:`_member_state`)."""
  return TrainState(step=jnp.stack([m.step for m in members]),
                    trainable=ensemble.stack_states([m.trainable for m in members]),
                    frozen=members[0].frozen,
                    opt_state=ensemble.stack_states([m.opt_state for m in members]),
                    rng=jnp.stack([m.rng for m in members]))


def _resume(members: Sequence[_Member], state: TrainState
            ) -> tuple[TrainState, dict[str, int], int | None]:
  """``(state, data position, step)`` at the latest step every member has a checkpoint of (a
  kill between the members' saves leaves some a step ahead), else the fresh state."""
  saved = [set(member.checkpointer.all_steps()) for member in members]
  if not any(saved):
    return state, {"epoch": 0, "step_in_epoch": 0}, None
  common = set.intersection(*saved)
  if not common:
    raise ValueError(
        "the members' workdirs hold checkpoints of no common step (" + ", ".join(
            f"member {m.index}: {sorted(s)}" for m, s in zip(members, saved)) + "); fit_many "
        "resumes its members together, from the workdirs of one earlier fit_many run")
  restored = [trainer.resume(m.checkpointer, _member_state(state, m.index), m.extra, m.workdir,
                             step=max(common)) for m in members]
  states, positions, _ = zip(*restored)
  return _stacked_state(states), positions[0], max(common)


def _stacked_batch(member_batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """``[K, B, ...]`` arrays of the members' batches, each right-padded with zeros to the widest:
  token 0 outside both masks, which no member's loss sees."""
  def stacked(key):
    arrays = [np.asarray(batch[key]) for batch in member_batches]
    if arrays[0].ndim >= 2:
      width = max(a.shape[1] for a in arrays)
      arrays = [np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
                for a in arrays]
    return np.stack(arrays)
  return {key: stacked(key) for key in member_batches[0]}


def _save(members: Sequence[_Member], state: TrainState, step: int, position: Mapping[str, int],
          force: bool) -> None:
  """Each member's checkpoint of ``step`` when its cadence (or ``force``) says so."""
  for member in members:
    if force or step % member.checkpointer.save_every == 0:
      member_state = trainer.checkpointed_state(_member_state(state, member.index))
      member.checkpointer.save(step, member_state, position, force=True, extra=member.extra)


def _run_steps(state: TrainState, position: Mapping[str, int], *, global_step: int,
               step_fn: Callable, aux: Any, members: Sequence[_Member], batches: Callable[..., Any],
               plan: Mapping[str, int], bar: progress_lib.ProgressBar, stop_after: int | None
               ) -> tuple[TrainState, int, bool]:
  """The steps from ``position`` to the end (or ``stop_after``): one record per member and step,
  checkpoints at each member's cadence. Returns ``(state, global step, stopped early)``."""
  epoch, step_in_epoch = position["epoch"], position["step_in_epoch"]
  total, stopped = plan["total_steps"], False
  last = time.perf_counter()
  while epoch < plan["epochs"] and not stopped:
    epoch_batches = zip(*(batches(
        m.dataset, batch_size=m.settings.batch_size, seed=m.settings.seed, epoch=epoch, pad_id=0,
        bucket=m.settings.bucket, start_step=step_in_epoch,
        length_multiple=m.settings.length_multiple) for m in members))
    for member_batches in epoch_batches:
      state, metrics = step_fn(state, _stacked_batch(member_batches), aux)
      metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 1}
      now = time.perf_counter()
      global_step += 1
      step_in_epoch += 1
      records = [trainer.step_record(global_step, epoch, {k: float(v[m.index])
                                                          for k, v in metrics.items()},
                                     batch, now - last)
                 for m, batch in zip(members, member_batches)]
      position = trainer.data_position(epoch, step_in_epoch, plan["steps_per_epoch"])
      for member, record in zip(members, records):
        member.writer.write(record)
        trainer.check_finite(record, member.checkpointer,
                             where=f"member {member.index} ({member.workdir}): ")
      bar.update(float(np.mean(metrics["loss"])) if "loss" in metrics else float("nan"),
                 sum(r["tokens"] for r in records) / max(now - last, 1e-9), epoch)
      last = now
      stopped = stop_after is not None and global_step >= stop_after
      preempted = preemption.reached(global_step)
      _save(members, state, global_step, position,
            force=stopped or preempted or global_step == total)
      if preempted:
        for member in members:
          member.checkpointer.wait()
        raise preemption.Preempted(global_step, ", ".join(m.checkpointer.directory for m in members))
      if stopped:
        break
    if not stopped:
      epoch, step_in_epoch = epoch + 1, 0
  _save(members, state, global_step, position, force=True)
  return state, global_step, stopped
