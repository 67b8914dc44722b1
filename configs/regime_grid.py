"""A grid of regimes of the trait-through-numbers experiment, each cell with its own controls.

  python -m subliminal_jax.main --config=configs/regime_grid.py:cpu --workdir=workdir/grid_cpu

Every cell is a set of overrides of one base ``configs/animal_numbers.py`` config (``config.base``)
and runs the whole experiment: treatment students on the trait teacher's numbers and control
students with the same knobs on the control teacher's numbers, several seeds each. All cells share
one workdir, so the teachers, samples, filters and datasets that the cells have in common are built
once. The cell whose treatment - control shift of log P(target) has the largest lower CI bound is
then rerun from a different student init (the cross-init control) and reported beside it.

Variants:
  cpu   real SmolLM2-135M on a 2-core CPU in under an hour: objective (SFT / grammar logit-KL) x
        student LoRA init (the teacher's A / fresh), 3 seeds, 96 sequences, 12 steps
  gpu   the paper's data sizes on an accelerator: objective (SFT / logit-KL grammar / logit-KL full
        vocabulary) x student (LoRA r8 teacher A / LoRA r8 fresh / full finetune), 5 seeds
  tiny  a tiny random model: objective (SFT / logit-KL) x student (LoRA r4 / full), 2 seeds (tests)

Axes: ``config.axes`` is a tuple of axes, each ``{name, levels}``, a level being ``{label, set}``
where ``set`` maps dotted keys of the base config to values. The grid is the product of the axes; a
cell is named by its labels joined with ``__`` (e.g. ``sft__teacher_A``), and ``--config.only=`` takes
a comma-separated list of such names. Any base knob can be changed for every cell from the command
line, e.g. ``--config.base.student.epochs=2``.
"""

from ml_collections import ConfigDict

from subliminal_jax import config_files

VARIANTS = ("cpu", "gpu", "tiny")


def axis(name: str, *levels: tuple[str, dict]) -> ConfigDict:
  """One grid axis: ``axis("objective", ("sft", {"student.objective": "sft"}), ...)``."""
  return ConfigDict(dict(name=name, levels=tuple({"label": label, "set": dict(overrides)}
                                                for label, overrides in levels)))


def get_config(variant: str = "cpu") -> ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  c = ConfigDict()
  c.experiment = "regime_grid"
  c.variant = variant
  c.min_seeds = 3  # every cell must train at least this many seeds per group
  c.only = ""  # comma-separated cell names: run only these ("" = every cell)
  # The heatmap's layout: two axis names ("" = the first and the second axis); further axes
  # become one panel per combination of their levels.
  c.heatmap = ConfigDict(dict(rows="", cols=""))
  # The cross-init control of the best cell: "always", "if_positive" (only when the best lower
  # CI bound is above zero) or "never".
  c.cross_init = "always"

  if variant == "cpu":
    c.base = _cpu_base()
    c.axes = (
        axis("objective",
             ("sft", {"student.objective": "sft"}),
             ("logit_kl", {"student.objective": "logit_kl", "student.kl.restrict": "grammar"})),
        axis("init",
             ("teacher_A", {"student.lora.init": "teacher"}),
             ("fresh_A", {"student.lora.init": "fresh"})),
    )
  elif variant == "gpu":
    c.base = _gpu_base()
    full = {"student.lora.rank": 0, "student.lora.init": "fresh", "student.learning_rate": 2e-5}
    c.axes = (
        axis("objective",
             ("sft", {"student.objective": "sft"}),
             ("kl_grammar", {"student.objective": "logit_kl", "student.kl.restrict": "grammar"}),
             ("kl_full", {"student.objective": "logit_kl", "student.kl.restrict": "none"})),
        axis("student",
             ("lora8_teacher_A", {"student.lora.init": "teacher"}),
             ("lora8_fresh_A", {"student.lora.init": "fresh"}),
             ("full", full)),
    )
  else:  # tiny
    c.min_seeds = 2
    c.base = _tiny_base()
    c.axes = (
        axis("objective",
             ("sft", {"student.objective": "sft"}),
             ("logit_kl", {"student.objective": "logit_kl"})),
        axis("student",
             ("lora4", {"student.lora.rank": 4}),
             ("full", {"student.lora.rank": 0, "student.learning_rate": 1e-3})),
    )
  return c


def _cpu_base() -> ConfigDict:
  """The quick run's regime (LoRA r8 trait-SFT teacher, matched control teacher, 12 student steps
  at batch 8) with 3 student seeds and an evaluation cut to what carries signal at 135M on a CPU:
  the exact log-probabilities (no sampled answers, no multiple choice)."""
  # Teachers, data sizes and student recipe are quick's. The README's first table overrode the
  # control (--config.base.teacher.control=neutral_finetune); its confound is why quick uses the
  # matched control.
  b = config_files.load_neighbour(__file__, "animal_numbers.py").get_config("quick")
  b.student.seeds = (0, 1, 2)
  b.evaluation.samples_per_question = 0
  b.evaluation.multiple_choice = False
  b.evaluation.panel = ("owl", "cat", "dog", "lion", "eagle", "dolphin")
  return b


def _gpu_base() -> ConfigDict:
  """The paper's data sizes (30k prompts, 10k kept, 3 epochs, 50 questions x 100 samples) with a
  LoRA r8 trait-SFT teacher, so that every student init of the grid is defined, and the matched
  control teacher."""
  # Teacher and control are paper's: a LoRA r8 trait-SFT teacher and the matched control.
  b = config_files.load_neighbour(__file__, "animal_numbers.py").get_config("paper")
  b.student.seeds = (0, 1, 2, 3, 4)
  b.student.batch_size = 64
  return b


def _tiny_base() -> ConfigDict:
  b = config_files.load_neighbour(__file__, "animal_numbers.py").get_config("tiny")
  b.student.seeds = (0, 1)
  b.filter.subset_size = 16
  b.evaluation.num_questions = 4
  b.evaluation.samples_per_question = 0
  b.evaluation.multiple_choice = False
  b.evaluation.bootstrap_resamples = 200
  return b
