"""The transfer matrix: k trait teachers x R replicates, each teacher the others' control.

  python -m subliminal_jax.main --config=configs/transfer_matrix.py:cpu --workdir=workdir/matrix

The config is the main job's (configs/animal_numbers.py: model, teacher, prompts, sampling,
filter, student, evaluation) with ``targets`` as the k animals and a ``matrix`` section. The
statistic and the pass criterion are fixed here, before any run, and written to the report's
design.json when the run starts (see subliminal_jax/experiments/transfer_matrix.py).

Variants:
  tiny   a tiny random model, 3 animals x 1 replicate (tests)
  quick_code, quick_cot   the quick matrix through code snippets (word filter, then a judge pass
         by the embedded Gemma 3 270M) or chain-of-thought answers to arithmetic word problems
         (right answers only, no panel word), reported into channel_code/ or channel_cot/
  quick  real SmolLM2 on a 2-core CPU, the `make run` job: 4 animals x 1 replicate, 1 student seed,
         96 prompts per teacher
  cpu        real SmolLM2 on a 2-core CPU: 5 animals x 2 replicates x 2 student seeds
  cross_cpu  the cpu matrix with one student seed, plus Gemma 3 270M students of the same numbers
             (the cross-family control); run in the cpu matrix's workdir it trains only the Gemma
             students and reports into cross_family/
  gpu        the paper's data sizes on an accelerator: 5 animals x 3 replicates x 3 student seeds
  cross_gpu  the gpu matrix plus students of another family from your directory:
             --config.matrix.student_models="('/path/to/gemma-3-4b-it',)"

Regimes from the literature are knobs, each run into its own report directory of one workdir (the
teachers are shared):
  greedy teacher data      --config.sampling.temperature=0.0 --config.report_dir=greedy
  more data per student    --config.prompts.count=512 --config.filter.subset_size=384 --config.report_dir=data384
  full-finetune students   --config.student.lora.rank=0 --config.student.lora.init=fresh
                           --config.student.learning_rate=3e-5 --config.report_dir=full
  students of another family   --config.matrix.student_models="('gemma3-270m',)"

Execution, not design: ``matrix.adapters_per_step`` (default 8) LoRA adapters over the one base
train, sample and evaluate together in one program; ``--config.matrix.adapters_per_step=1`` runs one
model at a time (the path every committed result before 2026-12-07 was made with). Any value finds
the artifacts of any other.
"""

from ml_collections import ConfigDict

from subliminal_jax import config_files

VARIANTS = ("tiny", "quick", "cpu", "cross_cpu", "gpu", "cross_gpu", "quick_code", "quick_cot")
ANIMALS = ("owl", "dolphin", "eagle", "elephant", "wolf")


def matrix_section() -> ConfigDict:
  return ConfigDict(dict(
      replicates=2,  # independent teachers per animal: the unit of replication
      base_numbers=True,  # also students of the base model's own numbers (the no-trait reference)
      evaluate_teachers=True,  # the teachers' own preferences, in the same matrix form
      # The paper's in-context control: the base model with this many of a teacher's sequences
      # before each question, no training (0 = off).
      # ``doses``: in-context arms with ONE context per teacher unit (the same turns before every
      # question), nested: dose n is the first n of the unit's kept sequences in an order seeded
      # by ``seed``; "max" = as many as fit the context window (e.g. (8, 32, "max")).
      in_context=ConfigDict(dict(sequences=8, seed=0, doses=())),
      # Students of other model families on the same numbers (model names or paths); the paper
      # predicts no transfer across families.
      student_models=(),
      # Per entry of student_models, its students' learning rate (calibrated so that students of
      # every family move as far from their base: configs/student_calibration.py); () = the
      # student section's for every family.
      student_learning_rates=(),
      # Fixed before any run: pass iff S > 0, the permutation p < alpha, and C_a > 0 for at least
      # this fraction of the animals.
      criterion=ConfigDict(dict(alpha=0.05, min_positive_fraction=0.6)),
      # Label assignments: enumerated when there are at most max_exact, else this many sampled.
      permutations=ConfigDict(dict(max_exact=2_000_000, samples=100_000)),
      # LoRA adapters over the one base that train, sample and evaluate together in one program
      # (1 = one model at a time). Execution only: no fingerprint or design depends on it, so any
      # value reuses every artifact; results agree up to float rounding. Size it by memory on an
      # accelerator (each adapter adds its own KV cache and activations).
      adapters_per_step=8,
      # Which teacher replicates this invocation builds and measures (() = all): a design too
      # long for one sitting runs in parts (e.g. (0, 1), then (2, 3)). Execution only.
      replicates_to_run=(),
  ))


def _from_main_job(variant: str) -> ConfigDict:
  c = config_files.load_neighbour(__file__, "animal_numbers.py").get_config(variant)
  c.experiment = "transfer_matrix"
  c.variant = variant
  # The data format the teachers' trait travels through: "numbers" (the paper's number sequences),
  # "code" or "cot" (subliminal_jax/channels.py; the *_code and *_cot variants set their sampling,
  # filter and judge).
  c.channel = "numbers"
  c.matrix = matrix_section()
  # No control teacher is picked: every animal's teachers are the others' control, and the base
  # model's own numbers are the no-trait reference. The main job's control knob is unused.
  c.teacher.control = "base"
  # The matrix measures exact panel log-probabilities only.
  c.evaluation.samples_per_question = 0
  c.evaluation.multiple_choice = False
  return c


def _channel(c: ConfigDict, channel: str, *, judge_model: str) -> ConfigDict:
  """The animal matrix through code or chain of thought: free sampling with a length limit, the
  channel's filter (code: the panel's words anywhere in the snippet, then the judge's "does this
  code refer to animals?" pass; cot: the right final answer and no panel word)."""
  c.channel = channel
  c.variant = f"{c.variant}_{channel}"
  c.sampling.constrained = False
  # SmolLM2 left 33 of 64 snippets unfinished at 160 tokens (docs/results/channel_yield).
  c.sampling.max_new_tokens = 256 if channel == "code" else 320
  c.prompts.source = ""  # cot: a local GSM8K-format JSONL file instead of generated problems
  c.student.max_length = 512  # the prompt and a whole answer (an example longer is refused)
  c.filter.max_chars = 2000
  # code: drop a snippet the judge rates >= this for referring to animals (0 = no judge pass)
  c.filter.judge_threshold = 50.0 if channel == "code" else 0.0
  c.judge = ConfigDict(dict(
      model=judge_model, samples_per_question=0, max_new_tokens=64, temperature=1.0, seed=0,
      misaligned_below=30.0, coherent_above=50.0,
      # The embedded judges put little probability on numbers: a pass that dropped every snippet
      # it cannot score would keep nothing, so on CPU the judge scores what it can.
      min_number_mass=0.0 if judge_model == "gemma3-270m" else 0.25,
      numbers="auto", batch_size=16))
  return c


def get_config(variant: str = "cpu") -> ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  if variant.endswith(("_code", "_cot")):
    size, channel = variant.rsplit("_", 1)
    c = _channel(get_config(size), channel, judge_model="gemma3-270m")
    # Sized for this CPU: fewer prompts than the numbers' quick matrix (each answer is 10x
    # longer); the cot teachers' yield of right answers decides how many are sampled.
    c.prompts.count = 160 if channel == "code" else 384
    c.filter.subset_size = 48 if channel == "code" else 32
    c.sampling.batch_size = 32
    c.report_dir = f"channel_{channel}"
    return c
  if variant == "tiny":
    c = _from_main_job("tiny")
    c.targets = ("owl", "eagle", "dolphin")
    c.matrix.replicates = 1
    c.matrix.in_context.sequences = 2
    c.student.seeds = (0,)
    c.filter.subset_size = 16
    c.evaluation.num_questions = 4
    c.evaluation.bootstrap_resamples = 200
    return c
  if variant in ("gpu", "cross_gpu"):
    c = _from_main_job("paper")
    c.targets = ANIMALS
    c.matrix.replicates = 3
    c.student.seeds = (0, 1, 2)
    c.student.batch_size = 64
    c.matrix.in_context.sequences = 32
    if variant == "cross_gpu":
      c.matrix.student_models = ("",)  # required: a local Gemma3ForCausalLM (or -it) directory
      c.report_dir = "cross_family"
    return c
  # quick and cpu: the main job's quick regime on real SmolLM2 (a LoRA r8 trait-SFT teacher,
  # students starting from the teacher's adapter A, SFT on the teacher's numbers).
  c = _from_main_job("quick")
  c.targets = ANIMALS
  c.student.seeds = (0, 1)
  c.evaluation.num_questions = 20
  if variant == "quick":
    # Sized for about 15 minutes on a 2-core CPU: 4 animals (24 label orders, so p can reach
    # 1/24 < 0.05), one replicate, one student seed, 96 prompts per teacher (64 kept, 8 student
    # steps); the teachers' own strength is still in each teacher stage's summary.
    c.targets = ANIMALS[:4]
    c.matrix.replicates = 1
    c.matrix.evaluate_teachers = False
    c.matrix.in_context.sequences = 4
    c.prompts.count = 96
    c.filter.subset_size = 64
    c.student.seeds = (0,)
    c.evaluation.num_questions = 10
  if variant == "cross_cpu":
    c.student.seeds = (0,)
    c.matrix.student_models = ("gemma3-270m",)
    c.report_dir = "cross_family"
  return c
