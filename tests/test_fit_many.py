"""fit_many: K LoRA finetunes of one base trained in one program end where K fit() runs end; one
member's data reaches only its own adapters; settings that cannot share a program are refused;
a stopped run resumes, on an 8-device mesh."""

import json
import os
import types

import jax
import numpy as np
import pytest
from flax import nnx

from subliminal_jax import sharding
from subliminal_jax.training import fit_many as fit_many_lib
from subliminal_jax.training import metrics, trainer
from subliminal_jax.training.losses import next_token_loss
from test_trainer import tiny_model, toy_dataset, train_config

# 18, 20 and 24 examples: 3 batches of 8 each, so 2 epochs are 6 steps for every member.
SIZES = (18, 20, 24)
# Member 0's batches are 16 or 32 wide (so the shared step pads some of them); every row of the
# toy data is shorter than 32, so a step's common width is always 32, whatever the data.
LENGTH_MULTIPLES = (16, 32, 32)


def row_dropout_loss(model, batch, rng, aux):
  """Next-token loss on a random three quarters of the rows: the step rng decides which, so a
  member trained with another member's rng ends elsewhere. The draw is per row, not per token: a
  batch padded wider would draw other numbers for its tokens."""
  keep = jax.random.bernoulli(rng, 0.75, (batch["loss_mask"].shape[0], 1))
  return next_token_loss(model, {**batch, "loss_mask": batch["loss_mask"] & keep}, rng, aux)


def member_configs(**overrides):
  return [train_config(seed=3 + i, length_multiple=multiple, checkpoint_every=0,
                       lora=dict(rank=4, alpha=8.0, seed=10 + i), **overrides)
          for i, multiple in enumerate(LENGTH_MULTIPLES)]


def member_data():
  return [toy_dataset(n=n, seed=i) for i, n in enumerate(SIZES)]


def adapters_of(model):
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.LoRAParam))[0]}


def assert_adapters_close(a, b, rtol, atol):
  pa, pb = adapters_of(a), adapters_of(b)
  assert pa.keys() == pb.keys() and pa
  for key in pa:
    np.testing.assert_allclose(pa[key], pb[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.fixture(scope="module")
def together(tmp_path_factory):
  """The three members trained by one fit_many call."""
  root = tmp_path_factory.mktemp("fit_many")
  base = tiny_model()
  workdirs = [root / f"member{i}" for i in range(3)]
  results = fit_many_lib.fit_many(base, member_data(), member_configs(), workdirs,
                                  loss_fn=row_dropout_loss, progress=False)
  assert base.layers.q_proj.lora_a is None  # the base is left as it was
  return results, workdirs


def test_members_end_where_separate_fit_runs_end(together, tmp_path):
  """Adapters and losses of each member equal those of fit() with the member's settings and data,
  up to float rounding: under vmap, and in a batch padded wider, XLA adds the same terms in
  another order, so the runs are not bit-identical."""
  results, workdirs = together
  for i, (data, config) in enumerate(zip(member_data(), member_configs())):
    model, history = trainer.fit(tiny_model(), data, config, tmp_path / f"fit{i}",
                                 loss_fn=row_dropout_loss, progress=False)
    member_model, member_history = results[i]
    assert_adapters_close(member_model, model, rtol=1e-4, atol=1e-5)
    assert [r["step"] for r in member_history] == [1, 2, 3, 4, 5, 6]
    for key in ("epoch", "num_targets", "tokens", "seq_len"):
      assert [r[key] for r in member_history] == [r[key] for r in history], key
    np.testing.assert_allclose([r["loss"] for r in member_history],
                               [r["loss"] for r in history], rtol=1e-4)
    assert member_history[-1]["loss"] < member_history[0]["loss"]
    assert metrics.read_metrics(workdirs[i] / metrics.METRICS_FILE) == member_history
    summary = json.loads((workdirs[i] / trainer.SUMMARY_FILE).read_text())
    assert summary["finished"] and summary["examples"] == SIZES[i]
    assert summary["identity"] == json.loads((tmp_path / f"fit{i}" / trainer.SUMMARY_FILE)
                                             .read_text())["identity"]
    assert os.listdir(workdirs[i] / trainer.CHECKPOINT_DIR) == ["6"]
  # A member's workdir is a finished fit run: fit on it trains nothing and returns its adapters.
  model, history = trainer.fit(tiny_model(), member_data()[0], member_configs()[0], workdirs[0],
                               loss_fn=row_dropout_loss, progress=False)
  assert_adapters_close(model, results[0][0], rtol=0, atol=0)
  assert history == results[0][1]


def test_a_members_data_reaches_only_its_own_adapters(together, tmp_path):
  """Member 1 on other data: members 0 and 2 end bit for bit as before, member 1 elsewhere."""
  results, _ = together
  data = member_data()
  data[1] = toy_dataset(n=SIZES[1], seed=7)
  changed = fit_many_lib.fit_many(tiny_model(), data, member_configs(),
                                  [tmp_path / f"member{i}" for i in range(3)],
                                  loss_fn=row_dropout_loss, progress=False)
  for i in (0, 2):
    assert_adapters_close(changed[i][0], results[i][0], rtol=0, atol=0)
    assert changed[i][1][-1]["loss"] == results[i][1][-1]["loss"]
  moved = [np.abs(a - b).max() for a, b in zip(adapters_of(changed[1][0]).values(),
                                                adapters_of(results[1][0]).values())]
  assert max(moved) > 1e-3


@pytest.mark.parametrize("member, changes, message", [
    (1, dict(lora=dict(rank=4, alpha=16.0)), "member 1: lora.alpha=16.0 but member 0 has 8.0"),
    (2, dict(learning_rate=5e-3), "member 2: optimization.learning_rate=0.005 but member 0 has"),
    (1, dict(batch_size=4), "member 1: batch_size=4 but member 0 has 8"),
    (2, dict(grad_accum_steps=2), "member 2: grad_accum_steps=2"),
    (1, dict(lora=dict(rank=4, targets=("q_proj",))), "member 1: lora.targets="),
    (0, dict(lora=dict(rank=0)), "member 0: lora.rank=0; fit_many trains LoRA adapters"),
])
def test_settings_that_cannot_share_one_program_are_refused(tmp_path, member, changes, message):
  configs = member_configs()
  configs[member] = {**configs[member], **changes}
  workdirs = [tmp_path / f"member{i}" for i in range(3)]
  with pytest.raises(ValueError, match=message):
    fit_many_lib.fit_many(tiny_model(), member_data(), configs, workdirs, progress=False)
  assert not any(w.exists() for w in workdirs)  # refused before anything is written


def test_unequal_step_counts_and_shared_workdirs_are_refused(tmp_path):
  data = member_data()
  data[1] = toy_dataset(n=30)
  with pytest.raises(ValueError, match="member 1: its dataset of 30 examples makes 4 steps per "
                                       "epoch, member 0's of 18 makes 3"):
    fit_many_lib.fit_many(tiny_model(), data, member_configs(), [tmp_path / str(i) for i in
                                                                 range(3)], progress=False)
  with pytest.raises(ValueError, match="its own workdir"):
    fit_many_lib.fit_many(tiny_model(), member_data(), member_configs(), [tmp_path] * 3,
                          progress=False)


def test_workdirs_of_another_run_are_refused(together):
  """Checkpoints of other settings are not resumed, and nothing in the workdirs is changed."""
  _, workdirs = together
  with pytest.raises(ValueError, match="holds checkpoints of another run"):
    fit_many_lib.fit_many(tiny_model(), member_data(), member_configs(learning_rate=5e-3),
                          workdirs, progress=False)
  assert [len(metrics.read_metrics(w / metrics.METRICS_FILE)) for w in workdirs] == [6] * 3


def test_stopped_run_resumes_on_an_8_device_mesh(together, tmp_path):
  """On a (data 2, fsdp 4) mesh, a run stopped after step 2 and started again resumes at step 2
  and ends where the uninterrupted run without a mesh ends (float rounding apart)."""
  results, _ = together
  mesh = sharding.make_mesh(data=2, fsdp=4)
  workdirs = [tmp_path / f"member{i}" for i in range(3)]
  with jax.set_mesh(mesh):
    partial = fit_many_lib.fit_many(sharding.shard_module(tiny_model(), mesh), member_data(),
                                    member_configs(), workdirs, loss_fn=row_dropout_loss,
                                    mesh=mesh, stop_after=2, progress=False)
    assert [[r["step"] for r in history] for _, history in partial] == [[1, 2]] * 3
    resumed = fit_many_lib.fit_many(sharding.shard_module(tiny_model(), mesh), member_data(),
                                    member_configs(), workdirs, loss_fn=row_dropout_loss,
                                    mesh=mesh, progress=False)
  for i, (model, history) in enumerate(resumed):
    assert_adapters_close(model, results[i][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([r["loss"] for r in history], [r["loss"] for r in results[i][1]],
                               rtol=1e-4)
    summary = json.loads((workdirs[i] / trainer.SUMMARY_FILE).read_text())
    assert summary["resumed_from_step"] == 2 and summary["finished"]
    assert sorted(os.listdir(workdirs[i] / trainer.CHECKPOINT_DIR)) == ["2", "6"]
  assert "fsdp" in jax.tree.leaves(tuple(resumed[0][0].layers.q_proj.lora_a[...].sharding.spec))


def test_members_that_fit_cap_a_group_by_the_free_memory():
  """The cap that keeps a group of students with a 262k-token vocabulary from being killed for
  memory: per member, 4 float32 copies of the logits plus the layers' activations."""
  config = types.SimpleNamespace(vocab_size=262_144, hidden_size=640, num_layers=18)
  per_member = fit_many_lib.member_bytes(config, batch_size=8, length=96)
  assert per_member == 4 * 8 * 96 * (4 * 262_144 + 24 * 640 * 18)  # 4.1 GB: Gemma 3 270M
  gb = 2**30
  assert fit_many_lib.members_that_fit(4, per_member, 18 * gb) == 3  # 0.75 x 18 GB / 4.1 GB
  assert fit_many_lib.members_that_fit(2, per_member, 18 * gb) == 2  # never more than asked
  assert fit_many_lib.members_that_fit(4, per_member, 1 * gb) == 1  # never fewer than one
  assert fit_many_lib.members_that_fit(4, per_member, None) == 4  # memory unknown: as asked
  free = fit_many_lib.free_bytes()
  assert free is None or free > 0


def test_members_beyond_the_free_memory_train_in_further_programs(tmp_path, monkeypatch):
  """The stages' entry point trains as many members per program as the free memory holds (here
  one: the host reports room for 1.5 of them), and the rest in further programs: each member
  ends where the three trained in one program end."""
  from subliminal_jax.experiments import settings as settings_lib
  from subliminal_jax.experiments import stages
  from subliminal_jax.weights import finetuned

  base, data = tiny_model(), member_data()
  fits = [trainer.FitSettings.from_config(c) for c in member_configs()]
  longest = max(len(ids) for d in data for ids in d["input_ids"])
  per_member = fit_many_lib.member_bytes(base.config, fits[0].batch_size, -(-longest // 32) * 32)
  assert stages.members_per_program(fits, base.config, data) == 3  # this host: all at once
  one_program = fit_many_lib.fit_many(base, data, fits, [tmp_path / f"one{i}" for i in range(3)],
                                      progress=False)

  monkeypatch.setattr(fit_many_lib, "free_bytes",
                      lambda: int(1.5 * per_member / fit_many_lib.MEMORY_SHARE))
  assert stages.members_per_program(fits, base.config, data) == 1
  programs = []
  real_fit_many = fit_many_lib.fit_many
  monkeypatch.setattr(fit_many_lib, "fit_many",
                      lambda base, data, *args, **kwargs: programs.append(len(data))
                      or real_fit_many(base, data, *args, **kwargs))
  outs = [tmp_path / f"member{i}" for i in range(3)]
  histories = stages.fit_many_in_stages(
      fits, settings_lib.CheckpointSettings(every=0, keep=False, tensorboard=False), base, data,
      outs, mesh=None)
  assert programs == [1, 1, 1]
  for i, (model, history) in enumerate(one_program):
    assert [r["loss"] for r in histories[i]] == pytest.approx([r["loss"] for r in history],
                                                               rel=1e-5)
    saved = finetuned.restore(base, fits[i].lora, outs[i])
    assert_adapters_close(saved, model, rtol=1e-4, atol=1e-5)
