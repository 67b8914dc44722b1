"""Student learning-rate calibration across families (subliminal_jax/experiments/student_calibration.py).

  python -m subliminal_jax.main --config=configs/student_calibration.py:cpu --workdir=workdir/calibration

The config is the transfer matrix's (configs/transfer_matrix.py: model, teacher, prompts, sampling,
filter, student recipe) with a ``calibration`` section; the matrix's own section is dropped.
Students of the base model's numbers on held-out prompts: the same family at the design
``student.learning_rate``, the other family (``calibration.student_model``) at each of
``calibration.learning_rates``; the chosen LR moves the other family's students as far from their
base (mean per-token KL on a second held-out prompt set) as the same family's move from theirs.

Variants:
  tiny  the tiny random model, another tiny initialization as the other family (tests)
  cpu   real SmolLM2 students and Gemma 3 270M students (the cross_cpu matrix's pair) on a 2-core CPU:
        the matrix's cpu student recipe (LoRA r8 from the teacher's adapter init, 12 steps at batch 8,
        lr 1e-3), seed 0, Gemma at 1e-4, 2.5e-4 and 5e-4; about 15 minutes on an otherwise idle
        2-core CPU (the Gemma students of about 2 minutes each and their KL dominate)
"""

from ml_collections import ConfigDict

from subliminal_jax import config_files

VARIANTS = ("tiny", "cpu")
# Prompt seeds no matrix unit draws (the matrix's replicate r uses its config seed + 1009 r).
TRAIN_PROMPTS_SEED = 7_000_001
MEASURE_PROMPTS_SEED = 7_000_003


def get_config(variant: str = "cpu") -> ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  c = config_files.load_neighbour(__file__, "transfer_matrix.py").get_config(variant)
  del c["matrix"]
  c.experiment = "student_calibration"
  c.variant = variant
  c.report_dir = "calibration"
  c.calibration = ConfigDict(dict(
      student_model="gemma3-270m",
      # Increasing; the other family's students train at each.
      learning_rates=(1e-4, 2.5e-4, 5e-4),
      train_prompts_seed=TRAIN_PROMPTS_SEED,
      # The distance's prompts: sampled by the base, every kept completion measured (32 prompts,
      # about 1000 target tokens per family: each measurement runs the student and its base over
      # them, about a minute for a Gemma student on a 2-core CPU).
      # batch_size: rows per KL call (execution only): each row holds two models' logits over the
      # whole padded length, about 270 MB per row at Gemma's 262k vocabulary in float32, so 16
      # rows took 12.5 GB and were killed for memory.
      measure=ConfigDict(dict(prompts_seed=MEASURE_PROMPTS_SEED, prompts_count=32, batch_size=2)),
  ))
  if variant == "tiny":
    c.calibration.student_model = "tiny-random:1"
    c.calibration.learning_rates = (1e-4, 1e-3, 1e-2)
    c.calibration.measure.prompts_count = 16
    c.calibration.measure.batch_size = 8
    return c
  # One seed: the two families' seed-0 students see the same batches in the same order. The grid
  # was first (2.5e-4, 5e-4, 1e-3, 2.5e-3); Gemma at 2.5e-4 already moved further (KL 0.43 per
  # token) than SmolLM2 at its 1e-3 (0.29), so it moved down to bracket the reference.
  c.student.seeds = (0,)
  return c
