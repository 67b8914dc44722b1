"""The subliminal signature, head to head: students against in-context reading, one family
against another, with teacher replicates as the unit (subliminal_jax/experiments/signature.py).

  python -m subliminal_jax.main --config=configs/signature.py:cpu --workdir=workdir/signature \
      --config.matrix.replicates_to_run="(0, 1)"
  python -m subliminal_jax.experiments.signature --report_dir=workdir/signature/signature

Variants:
  tiny          a tiny random model: 3 animals x 2 replicates (tests)
  cpu           real SmolLM2 on a 2-core CPU: 5 animals x 6 teacher replicates x 2 student seeds
                (the `cpu` transfer matrix's teachers and students, whose artifacts it reuses), the
                base's own numbers, Gemma 3 270M students of every teacher at a calibrated learning
                rate, in-context doses of 8, 32 and as many sequences as fit the context window
  prompted_cpu  the paper's own teachers: the base under the trait system prompt (no finetune),
                3 replicates, otherwise as cpu (its own design and verdict)

Everything here is the design, fixed in design.json before the first stage; only the execution
knobs (matrix.adapters_per_step, matrix.replicates_to_run, mesh, checkpoints) may change between
parts.
"""

from ml_collections import ConfigDict

from subliminal_jax import config_files

VARIANTS = ("tiny", "cpu", "prompted_cpu")


def signature_section() -> ConfigDict:
  return ConfigDict(dict(
      # One-sided alpha of each pre-registered contrast: PASS ("subliminal signature") iff (a)
      # students' S, (b) students' S minus the strongest in-context dose's, and (c) same-family
      # S minus cross-family S are each > 0 with permutation p below its alpha.
      criterion=ConfigDict(dict(students=0.01, students_minus_in_context=0.05,
                                students_minus_cross_family=0.05)),
      # The smallest S this design detects with 80% power, estimated before the run from the
      # committed R = 2 matrix (python -m subliminal_jax.evaluation.signature_statistics).
      power=ConfigDict(dict(source="", minimum_detectable_S=0.0,
                            minimum_detectable_S_teacher_sd_upper80=0.0)),
      # How the other family's student learning rate was calibrated (configs/student_calibration.py).
      calibration=ConfigDict(dict(source="", rule="")),
  ))


def get_config(variant: str = "cpu") -> ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  matrix_variant = "tiny" if variant == "tiny" else "cpu"
  c = config_files.load_neighbour(__file__, "transfer_matrix.py").get_config(matrix_variant)
  c.experiment = "signature"
  c.variant = variant
  c.signature = signature_section()
  c.matrix.in_context.sequences = 0  # the per-question draws of the transfer matrix: not an arm
  c.matrix.in_context.doses = (8, 32, "max")
  c.matrix.permutations.samples = 20_000
  c.report_dir = "signature"
  if variant == "tiny":
    c.matrix.replicates = 2
    c.matrix.in_context.doses = (2, 4, "max")
    c.matrix.student_models = ("tiny-other",)  # replaced by the test with a directory
    c.matrix.permutations.samples = 500
    return c
  c.matrix.replicates = 6 if variant == "cpu" else 3
  # From the committed R = 2 cpu matrix's same-family students (seed sd of C 0.0244; the teacher
  # sd's estimate was below 0 and is clipped to 0, so the 80% upper bound of the teacher sd, 0.018,
  # is given as well): the smallest S that this many replicates x 2 seeds detect with 80% power at
  # alpha 0.01 under the permutation test (2000 simulated designs x 999 permutations).
  c.signature.power.source = (
      "python -m subliminal_jax.evaluation.signature_statistics --results=docs/results/"
      f"transfer_matrix_cpu/results.json --replicates={c.matrix.replicates} --seeds=2 "
      "--alpha=0.01 --power=0.8 (variance of SFT teachers' students; " +
      ("measured on the same kind of teachers)" if variant == "cpu" else
       "the prompted teachers' may differ)"))
  c.signature.power.minimum_detectable_S = 0.01136 if variant == "cpu" else 0.01659
  c.signature.power.minimum_detectable_S_teacher_sd_upper80 = (
      0.01643 if variant == "cpu" else 0.02400)
  c.matrix.student_models = ("gemma3-270m",)
  # Calibrated before the first stage on held-out base numbers (docs/results/
  # student_calibration_cpu): Gemma students at 2.07e-4 move as far from their base (KL 0.29 nats
  # per token on held-out number prompts) as SmolLM2's at 1e-3.
  c.matrix.student_learning_rates = (2.07e-4,)
  c.signature.calibration.source = (
      "python -m subliminal_jax.main --config=configs/student_calibration.py:cpu")
  c.signature.calibration.rule = (
      "the Gemma learning rate, log-linear in (log LR, log KL) between the grid rates whose mean "
      "per-token KL(student || own base) on held-out number prompts brackets that of the SmolLM2 "
      "students at 1e-3 (0.290): 1e-4 -> 0.061, 2.5e-4 -> 0.431, so 2.07e-4")
  if variant == "prompted_cpu":
    c.teacher.kind = "system_prompt"
    c.student.lora.init = "fresh"  # no LoRA teacher to start from; B = 0 starts at the base
    c.matrix.evaluate_teachers = True
    c.report_dir = "signature_prompted"
  return c
