"""Ablations of the MNIST auxiliary-logit experiment, one setting at a time.

  python -m subliminal_jax.main --config=configs/mnist_sweep.py:width --workdir=workdir/sweep_width

Axes (``configs/mnist_sweep.py:<axis>``): aux (number of auxiliary logits), width, depth, epochs
(student epochs), inputs (uniform noise, Gaussian noise, real digits), loss (KL, MSE), optimizer
(Adam, SGD, sign-SGD), init_scale; ``tiny`` is a two-point sweep for tests. Every point is a full
run of configs/mnist_aux.py (its other settings unchanged) in ``WORKDIR/points/<label>/``; the
sweep writes one table (sweep.md, sweep.json) and one plot (sweep.png). Points that change only
the students reuse the teachers trained for the first point.

Sized for a 2-core CPU: 10 models x 1 seed per point and only the aux-only students (same init
and cross init); override with --config.num_models=25 --config.seeds=0,1,2 and
--config.student.variants=same_init_aux,same_init_all,cross_init_aux,cross_init_all.
"""

from ml_collections import ConfigDict

from subliminal_jax import config_files


AXES = {
    "aux": ("number of auxiliary logits",
            [(str(m), {"model.num_aux": m}) for m in (1, 3, 10, 30)]),
    "width": ("hidden width",
              [(str(w), {"model.hidden_sizes": (w, w)}) for w in (64, 128, 256, 512)]),
    "depth": ("hidden layers of width 256",
              [(str(d), {"model.hidden_sizes": (256,) * d}) for d in (1, 2, 3, 4)]),
    "epochs": ("student epochs",
               [(str(e), {"student.epochs": e}) for e in (1, 2, 5, 10)]),
    "inputs": ("distillation inputs",
               [(kind, {"student.inputs": kind}) for kind in ("uniform", "gaussian", "mnist")]),
    "loss": ("imitation loss", [(loss, {"student.loss": loss}) for loss in ("kl", "mse")]),
    "optimizer": ("student optimizer and learning rate", [
        ("adam 3e-4", {"student.optimizer": "adam", "student.learning_rate": 3e-4}),
        ("sgd 1", {"student.optimizer": "sgd", "student.learning_rate": 1.0}),
        ("sgd 10", {"student.optimizer": "sgd", "student.learning_rate": 10.0}),
        ("sign_sgd 3e-4", {"student.optimizer": "sign_sgd", "student.learning_rate": 3e-4}),
    ]),
    "init_scale": ("init scale (weights ~ N(0, scale^2 / d_in))",
                   [(str(s), {"model.init_scale": s}) for s in (0.5, 1.0, 2.0)]),
    "tiny": ("student loss (test sweep)",
             [(loss, {"student.loss": loss}) for loss in ("kl", "mse")]),
}


def get_config(axis: str = "width") -> ConfigDict:
  if axis not in AXES:
    raise ValueError(f"unknown sweep axis {axis!r}; expected one of {sorted(AXES)}")
  base = config_files.load_neighbour(__file__, "mnist_aux.py")
  c = base.get_config("tiny" if axis == "tiny" else "default")
  c.num_models = 10 if axis != "tiny" else 3
  c.seeds = (0,)
  c.student.variants = ("same_init_aux", "cross_init_aux")
  c.theorem.enabled = False
  value_name, points = AXES[axis]
  c.sweep.name = axis
  c.sweep.value_name = value_name
  c.sweep.points = tuple((label, overrides) for label, overrides in points)
  return c
