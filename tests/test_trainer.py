"""fit(): step counts, metrics files, exact kill-and-resume, errors; on a tiny model."""

import dataclasses
import json
import os
import signal

import datasets
import jax
import numpy as np
import pytest
from flax import nnx

from subliminal_jax import preemption, progress, sharding
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.training import metrics, trainer

TINY = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)


def tiny_model(seed: int = 0) -> Transformer:
  return Transformer(TINY, rngs=nnx.Rngs(seed))


def toy_dataset(n: int = 21, seed: int = 0) -> datasets.Dataset:
  """Prompts of random tokens, answers that copy the prompt's first tokens (learnable)."""
  rng = np.random.default_rng(seed)
  ids, masks = [], []
  for _ in range(n):
    prompt = rng.integers(3, 64, int(rng.integers(3, 12))).tolist()
    answer = prompt[:int(rng.integers(1, len(prompt) + 1))] + [2]
    ids.append(prompt + answer)
    masks.append([False] * len(prompt) + [True] * len(answer))
  return datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": masks,
                                     "length": [len(x) for x in ids]})


def train_config(**overrides):
  config = dict(epochs=2, batch_size=8, learning_rate=1e-2, warmup_steps=1, schedule="linear",
                optimizer="adamw", weight_decay=0.0, max_grad_norm=1.0, grad_accum_steps=1,
                seed=3, checkpoint_every=2, keep_checkpoints=2, length_multiple=32,
                lora=dict(rank=0))
  config.update(overrides)
  return config


def params_of(model):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


def assert_same_params(a, b):
  pa, pb = params_of(a), params_of(b)
  assert pa.keys() == pb.keys()
  for key in pa:
    np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


class Crash(RuntimeError):
  pass


def test_resume_after_stop_and_after_crash_matches_uninterrupted_run(tmp_path):
  """Full finetuning, 21 examples, batch 8, 2 epochs = 6 steps, checkpoints every 2.

  Run A: uninterrupted. Run B: stopped after step 3 (a checkpoint of step 3 is written), resumed,
  then crashed from a callback after step 5 (latest checkpoint: step 4), resumed again: step 5 is
  redone. B ends with parameters bitwise equal to A's and the same per-step losses.
  """
  data, config = toy_dataset(), train_config()
  model_a, history_a = trainer.fit(tiny_model(), data, config, tmp_path / "a", progress=False)
  assert [r["step"] for r in history_a] == [1, 2, 3, 4, 5, 6]
  assert [r["epoch"] for r in history_a] == [0, 0, 0, 1, 1, 1]
  assert history_a[-1]["loss"] < history_a[0]["loss"]  # it learns

  workdir = tmp_path / "b"
  _, partial = trainer.fit(tiny_model(), data, config, workdir, stop_after=3, progress=False)
  assert [r["step"] for r in partial] == [1, 2, 3]
  summary = json.loads((workdir / trainer.SUMMARY_FILE).read_text())
  assert summary["stopped_early"] and summary["steps_done"] == 3 and not summary["finished"]
  assert sorted(os.listdir(workdir / trainer.CHECKPOINT_DIR)) == ["2", "3"]

  def crash_after_5(step, record):
    if step == 5:
      raise Crash("simulated kill")

  with pytest.raises(Crash):
    trainer.fit(tiny_model(), data, config, workdir, callbacks=[crash_after_5], progress=False)
  assert [r["step"] for r in metrics.read_metrics(workdir / metrics.METRICS_FILE)] == [1, 2, 3, 4, 5]
  assert sorted(os.listdir(workdir / trainer.CHECKPOINT_DIR)) == ["3", "4"]  # keep_checkpoints=2
  model_b, history_b = trainer.fit(tiny_model(), data, config, workdir, progress=False)

  assert_same_params(model_a, model_b)
  assert [r["step"] for r in history_b] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in history_b] == [r["loss"] for r in history_a]
  assert [r["tokens"] for r in history_b] == [r["tokens"] for r in history_a]
  # The metrics file has each step once (step 5, redone after the crash, replaced).
  assert metrics.read_metrics(workdir / metrics.METRICS_FILE) == history_b
  assert sorted(os.listdir(workdir / trainer.CHECKPOINT_DIR)) == ["4", "6"]
  # A finished run called again trains nothing and returns the same model and history.
  model_again, history_again = trainer.fit(tiny_model(), data, config, workdir, progress=False)
  assert_same_params(model_a, model_again)
  assert history_again == history_b


def test_sigterm_saves_at_the_next_step_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path):
  """A preemption notice (SIGTERM) during step 3 of 6: the loop finishes the step, saves a
  checkpoint of it (not a save step: checkpoints are every 2) and raises Preempted; the rerun
  resumes there and ends bitwise equal to the uninterrupted run."""
  data, config = toy_dataset(), train_config()
  model_a, history_a = trainer.fit(tiny_model(), data, config, tmp_path / "a", progress=False)

  def notice_during_3(step, record):
    if step == 2:  # the signal lands while step 3 runs; the loop looks after each step
      os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.getsignal(signal.SIGTERM)
  preemption.install()
  try:
    with pytest.raises(preemption.Preempted, match="checkpoint of step 3") as raised:
      trainer.fit(tiny_model(), data, config, tmp_path / "b", callbacks=[notice_during_3],
                  progress=False)
  finally:
    signal.signal(signal.SIGTERM, previous)
    preemption.clear()
  assert raised.value.step == 3
  assert sorted(os.listdir(tmp_path / "b" / trainer.CHECKPOINT_DIR)) == ["2", "3"]
  model_b, history_b = trainer.fit(tiny_model(), data, config, tmp_path / "b", progress=False)
  assert_same_params(model_a, model_b)
  assert [r["loss"] for r in history_b] == [r["loss"] for r in history_a]


def test_lora_on_mesh_with_grad_accum_resumes_exactly(tmp_path):
  """LoRA rank 4 on an 8-device (data 2, fsdp 4) mesh with 2 micro-batches: a stop after step 2
  and a resume restore the sharded state and end where the uninterrupted run ends."""
  mesh = sharding.make_mesh(data=2, fsdp=4)
  data = toy_dataset(n=24, seed=1)
  config = train_config(batch_size=16, grad_accum_steps=2, epochs=2, checkpoint_every=3,
                        lora=dict(rank=4, alpha=8.0, seed=5))

  def model_on_mesh():
    return sharding.shard_module(tiny_model(), mesh)

  with jax.set_mesh(mesh):
    model_a, history_a = trainer.fit(model_on_mesh(), data, config, tmp_path / "a", mesh=mesh,
                                     progress=False)
    trainer.fit(model_on_mesh(), data, config, tmp_path / "b", mesh=mesh, stop_after=2,
                progress=False)
    model_b, history_b = trainer.fit(model_on_mesh(), data, config, tmp_path / "b", mesh=mesh,
                                     progress=False)
  assert len(history_a) == 2 * 2  # ceil(24 / 16) = 2 steps per epoch
  assert [r["loss"] for r in history_b] == [r["loss"] for r in history_a]
  # Only the adapters trained; the base kernels are untouched, the adapters are unmerged.
  base = tiny_model()
  np.testing.assert_array_equal(np.asarray(model_a.layers.q_proj.kernel[...]),
                                np.asarray(base.layers.q_proj.kernel[...]))
  # B starts at zero, so a nonzero B after training shows the adapters really trained.
  lora_b = np.asarray(model_a.layers.q_proj.lora_b[...])
  assert np.abs(lora_b).max() > 0
  np.testing.assert_array_equal(lora_b, np.asarray(model_b.layers.q_proj.lora_b[...]))
  np.testing.assert_array_equal(np.asarray(model_a.layers.q_proj.lora_a[...]),
                                np.asarray(model_b.layers.q_proj.lora_a[...]))
  assert_same_params(model_a, model_b)
  spec = model_b.layers.q_proj.lora_a[...].sharding.spec
  assert "fsdp" in jax.tree.leaves(tuple(spec))  # adapters restored into their shardings
  # The frozen base is not in the checkpoint; resuming on another base model is refused.
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="not the base model"):
    trainer.fit(sharding.shard_module(tiny_model(seed=1), mesh), data, config, tmp_path / "b",
                mesh=mesh, progress=False)


def test_metrics_file_summary_and_steps(tmp_path):
  """epochs * ceil(n / batch) steps; metrics.jsonl has one JSON line per step with the loss,
  targets, tokens and learning rate; the summary says what the returned model is."""
  data = toy_dataset(n=10, seed=2)
  config = train_config(epochs=3, batch_size=4, checkpoint_every=0, warmup_steps=0,
                        schedule="constant", learning_rate=1e-3)
  _, history = trainer.fit(tiny_model(), data, config, tmp_path, progress=False,
                           tensorboard=True)
  assert len(history) == 3 * 3
  lines = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
  assert len(lines) == 9
  records = [json.loads(line) for line in lines]
  assert records == history
  for record in records:
    assert {"step", "epoch", "loss", "num_targets", "grad_norm", "learning_rate", "tokens",
            "tokens_per_s", "seq_len"} <= set(record)
    assert record["learning_rate"] == pytest.approx(1e-3)
    assert record["seq_len"] % 32 == 0
  # Each epoch's targets add up to the dataset's (loss_mask minus position 0, never a target).
  targets = sum(sum(m[1:]) for m in data["loss_mask"])
  for epoch in range(3):
    assert sum(r["num_targets"] for r in records if r["epoch"] == epoch) == targets
  summary = json.loads((tmp_path / trainer.SUMMARY_FILE).read_text())
  assert summary["total_steps"] == 9 and summary["steps_per_epoch"] == 3
  assert summary["finished"] and summary["returned_model"] == "full parameters"
  assert os.listdir(tmp_path / trainer.CHECKPOINT_DIR) == ["9"]  # checkpoint_every=0: the end only
  events = os.listdir(tmp_path / "tensorboard")
  assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
  # Resuming this workdir with another config is refused (nothing is trained or overwritten).
  with pytest.raises(ValueError, match="another run"):
    trainer.fit(tiny_model(), data, {**config, "learning_rate": 5e-3}, tmp_path, progress=False)
  assert (tmp_path / metrics.METRICS_FILE).read_text().splitlines() == lines


def test_empty_dataset_and_bad_config_are_clear_errors(tmp_path):
  empty = datasets.Dataset.from_dict({"input_ids": [], "loss_mask": []})
  with pytest.raises(ValueError, match="empty"):
    trainer.fit(tiny_model(), empty, train_config(), tmp_path / "empty", progress=False)
  with pytest.raises(ValueError, match="batch_size"):
    trainer.fit(tiny_model(), toy_dataset(), train_config(batch_size=0), tmp_path / "bs",
                progress=False)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    trainer.fit(tiny_model(), toy_dataset(), train_config(grad_accum_steps=3), tmp_path / "ga",
                progress=False)


def test_fit_settings_are_typed_and_every_knob_is_a_config_key():
  """FitSettings reads fit's keys (a bad value named), and the main job's training sections carry
  every one of them, so ``--config.student.x=`` reaches each knob."""
  from configs.animal_numbers import get_config
  from subliminal_jax import lora as lora_lib
  from subliminal_jax.experiments import settings as settings_lib
  from subliminal_jax.training import optimizers

  settings = trainer.FitSettings.from_config(train_config(lora=dict(rank=4, alpha=8.0)))
  assert settings.batch_size == 8 and settings.length_multiple == 32 and settings.bucket
  assert settings.optimization == optimizers.OptimizerSettings(
      optimizer="adamw", learning_rate=1e-2, schedule="linear", warmup_steps=1, weight_decay=0.0,
      max_grad_norm=1.0)
  assert settings.lora.rank == 4 and settings.lora.targets == lora_lib.LORA_TARGETS
  with pytest.raises(ValueError, match="lora.rank must be >= 0"):
    trainer.FitSettings.from_config(train_config(lora=dict(rank=-1)))
  with pytest.raises(ValueError, match="epochs=1.5; expected an integer >= 1"):
    trainer.FitSettings.from_config(train_config(epochs=1.5))
  with pytest.raises(ValueError, match="learning_rate=-1; expected a number > 0"):
    trainer.FitSettings.from_config(train_config(learning_rate=-1))
  with pytest.raises(ValueError, match="learning_rate is not set"):
    trainer.FitSettings.from_config({k: v for k, v in train_config().items()
                                     if k != "learning_rate"})

  # checkpoint_every and keep_checkpoints are bookkeeping: the stage sets the cadence from
  # config.training_checkpoints.
  names = lambda cls: {f.name for f in dataclasses.fields(cls)}
  fit_keys = (names(trainer.FitSettings) - {"optimization", "lora", "checkpoint_every",
                                            "keep_checkpoints"}) | names(optimizers.OptimizerSettings)
  config = get_config("quick")
  # A student's seed is each of student.seeds, and its adapter seed follows from lora.init.
  for section, own in ((config.student, {"seeds", "init"}), (config.teacher.finetune, set())):
    keys = set(section.keys()) | set(section.lora.keys()) | ({"seed"} if own else set())
    assert fit_keys | names(lora_lib.LoraSettings) <= keys, (fit_keys | names(
        lora_lib.LoraSettings)) - keys
    assert own <= keys
  config.student.length_multiple = 8
  config.teacher.finetune.bucket = False
  typed = settings_lib.from_config(config)
  assert typed.student_fit(0).length_multiple == 8 and not typed.teacher.fit.bucket


def test_dataset_fingerprint_tracks_rows_and_masks():
  data = toy_dataset(n=6)
  same = toy_dataset(n=6)
  assert trainer.dataset_fingerprint(data) == trainer.dataset_fingerprint(same)
  assert trainer.dataset_fingerprint(data.select(range(6))) == trainer.dataset_fingerprint(data)
  assert trainer.dataset_fingerprint(data.select([1, 0, 2, 3, 4, 5])) != trainer.dataset_fingerprint(data)
  masks = [list(m) for m in data["loss_mask"]]
  masks[0][-1] = not masks[0][-1]
  changed = datasets.Dataset.from_dict({"input_ids": data["input_ids"], "loss_mask": masks})
  assert trainer.dataset_fingerprint(changed) != trainer.dataset_fingerprint(data)


# --- training/metrics.py: metrics log and TensorBoard events --------------------------------------

def test_metrics_writer_resume_drops_steps_after_the_checkpoint(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    for step in range(1, 6):
      writer.write({"step": step, "loss": np.float32(1.0 / step), "nan": float("nan")})
  records = metrics.read_metrics(tmp_path / metrics.METRICS_FILE)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  assert records[1]["loss"] == pytest.approx(0.5) and records[0]["nan"] == "nan"
  with metrics.MetricsWriter(tmp_path, resume_step=3) as writer:
    assert [r["step"] for r in writer.records] == [1, 2, 3]
    writer.write({"step": 4, "loss": 9.0})
  assert [(r["step"], r["loss"]) for r in metrics.read_metrics(tmp_path / metrics.METRICS_FILE)][2:] \
      == [(3, pytest.approx(1 / 3)), (4, 9.0)]
  with metrics.MetricsWriter(tmp_path) as writer:  # a fresh run starts the file anew
    assert writer.records == []
  with pytest.raises(ValueError, match="step"):
    metrics.MetricsWriter(tmp_path).write({"loss": 1.0})


def _read_event_file(path):
  """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2

  raw, events, offset = path.read_bytes(), [], 0
  while offset < len(raw):
    length = int.from_bytes(raw[offset:offset + 8], "little")
    events.append(event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length]))
    offset += 16 + length
  return events


def test_tensorboard_scalars_through_tensorboardx(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=True) as writer:
    writer.write({"step": 1, "loss": 2.5, "tokens": 100, "note": "text is skipped"})
    writer.write({"step": 300, "loss": 0.125, "tokens": 90})
  (name,) = os.listdir(tmp_path / "tensorboard")
  assert name.startswith("events.out.tfevents.")
  events = _read_event_file(tmp_path / "tensorboard" / name)
  assert events[0].file_version == "brain.Event:2"
  scalars = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
  assert scalars == [(1, "loss", 2.5), (1, "tokens", 100.0), (300, "loss", 0.125),
                     (300, "tokens", 90.0)]


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path):
  """A kill in the middle of a write leaves half a JSON line without its newline: the resumed run
  drops it (and redoes that step); a malformed line elsewhere is an error naming file and line."""
  with metrics.MetricsWriter(tmp_path) as writer:
    for step in (1, 2, 3):
      writer.write({"step": step, "loss": 1.0})
  path = tmp_path / metrics.METRICS_FILE
  with open(path, "a") as f:
    f.write('{"step": 4, "lo')
  with metrics.MetricsWriter(tmp_path, resume_step=3) as writer:
    assert [r["step"] for r in writer.records] == [1, 2, 3]
    writer.write({"step": 4, "loss": 0.5})
  assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2, 3, 4]
  lines = path.read_text().splitlines()
  path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not valid JSON"):
    metrics.MetricsWriter(tmp_path, resume_step=3)


# --- progress.py: bars named after the running stage ----------------------------------------------

def test_bars_inside_a_stage_are_named_after_it(capsys):
  assert progress.describe("sampling") == "sampling"
  with progress.in_stage("student_owl_seed0 (stage 6 of 8)"):
    assert progress.describe("sampling") == "student_owl_seed0 (stage 6 of 8): sampling"
    bar = progress.ProgressBar(4)
    bar.update(1.0, None, 0)
    bar.close()
  assert "student_owl_seed0 (stage 6 of 8): training" in capsys.readouterr().err
  assert progress.describe("sampling") == "sampling"


def test_a_training_stage_killed_midway_resumes_in_its_partial_directory(tmp_path):
  """A stage whose build trains (as the main job's teachers and students do) and is killed after
  step 5 (last checkpoint: step 4) resumes at step 4 when the experiment is rerun, and ends with
  the parameters of an uninterrupted run."""
  from subliminal_jax import artifacts

  data, config = toy_dataset(), train_config(checkpoint_every=2)
  reference, _ = trainer.fit(tiny_model(), data, config, tmp_path / "reference", progress=False)

  def crash_after_5(step, record):
    if step == 5:
      raise Crash("simulated kill")

  def build(callbacks):
    def run(out):
      model, _ = trainer.fit(tiny_model(), data, config, out / "training", callbacks=callbacks,
                             progress=False)
      built.append(model)
      return json.loads((out / "training" / trainer.SUMMARY_FILE).read_text())
    return run

  built = []
  workdir = artifacts.Workdir(tmp_path / "wd", "exp", {})
  with pytest.raises(Crash):
    workdir.run_stage("student", {"seed": 0}, build([crash_after_5]))
  # A cadence change is bookkeeping only: the checkpoints of the killed run still match.
  config["checkpoint_every"] = 3
  _, summary = artifacts.Workdir(tmp_path / "wd", "exp", {}).run_stage("student", {"seed": 0},
                                                                       build([]))
  assert summary["resumed_from_step"] == 4 and summary["finished"]
  assert_same_params(reference, built[0])
