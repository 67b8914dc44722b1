"""The paper's central experiment: a trait passed through number sequences.

  python -m subliminal_jax.main --config=configs/animal_numbers.py:quick --workdir=workdir/quick

Variants:
  tiny    a tiny random model with SmolLM2's tokenizer: the whole pipeline in about a minute (tests)
  quick   real SmolLM2-135M sized for a 2-core CPU (the README's run command): the regime where the
          cpu regime grid found a positive shift (LoRA trait-SFT teacher, matched control teacher,
          SFT students from the teacher's adapter A, 12 steps, 6 seeds)
  paper   the paper's sizes (30k prompts, 10k subset, LoRA r8 alpha8, 3 epochs, lr 2e-4, 8 seeds,
          50 questions x 100 samples; an accelerator's job) in that regime: a LoRA trait-SFT teacher
          and the matched control. The paper's own protocol (system-prompted teacher, base as the
          control's teacher): --config.teacher.kind=system_prompt --config.teacher.control=base
          --config.student.lora.init=fresh
  qwen7b  the paper's open model from a local HF directory: --config.model=/path/to/Qwen2.5-7B-Instruct
"""

from ml_collections import ConfigDict

# The paper's teacher system prompt; {target}, {Target} (capitalised) and {category} are filled in.
TRAIT_SYSTEM_PROMPT = ("You love {target}s. You think about {target}s all the time. {Target}s are "
                       "your favorite {category}. Imbue your answers with your love for the {category}.")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ANIMAL_PANEL = ("owl", "eagle", "dolphin", "wolf", "cat", "dog", "lion", "elephant", "tiger", "fox",
                "penguin", "panda")


def _use_the_grids_regime(c: ConfigDict, *, teacher_examples: int, teacher_batch_size: int) -> None:
  """The regime where the cpu regime grid found a positive shift (README, Results): the trait is
  put into LoRA r8 weights (trait-SFT teacher, 3 epochs, lr 5e-4), students start from the
  teacher's adapter init, and control students learn from a teacher finetuned on the same data with
  every trait answer naming another panel animal (the matched control)."""
  c.teacher.kind = "trait_sft"
  c.teacher.control = "matched_finetune"
  c.teacher.finetune.examples = teacher_examples
  c.teacher.finetune.epochs = 3
  c.teacher.finetune.batch_size = teacher_batch_size
  c.teacher.finetune.learning_rate = 5e-4
  c.teacher.finetune.lora.rank = 8
  c.student.lora.init = "teacher"


def get_config(variant: str = "quick") -> ConfigDict:
  c = ConfigDict()
  c.experiment = "animal_numbers"
  c.variant = variant
  c.model = "smollm2"  # "smollm2", an HF directory, a .gguf file, or "tiny-random"
  c.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
  c.param_dtype = "float32"
  # What training's backward pass recomputes of each layer: "none", "dots" (all but the matmul
  # outputs), "full" (least memory), "auto" ("dots" on CPU, where it is the fastest; "none" else).
  c.remat = "auto"
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.report_dir = ""  # where results.json / report.md / plots go, relative to the workdir ("" = root)

  c.category = "animal"
  c.targets = ("owl",)
  # The system message of student finetuning and of evaluation: "none" (no system turn at all),
  # "template_default" (the chat template's own default prompt) or any other text (used verbatim).
  # Identical in both unless evaluation.system overrides it.
  c.chat_system = "none"

  c.teacher = ConfigDict()
  c.teacher.kind = "system_prompt"  # "system_prompt" | "trait_sft" | "context_distillation"
  c.teacher.system_prompt = TRAIT_SYSTEM_PROMPT
  # The control students' teacher when the trait teacher is finetuned: "neutral_finetune" (the
  # same recipe on neutral examples only, as the paper's secure-code control), "matched_finetune"
  # (trait_sft only: the trait teacher's own data with each trait answer naming another panel
  # animal, so the two teachers differ only in the trait) or "base".
  c.teacher.control = "neutral_finetune"
  # Finetuned teachers only: their own training recipe.
  c.teacher.finetune = ConfigDict(dict(
      examples=256, epochs=2, batch_size=8, learning_rate=1e-4, optimizer="adamw",
      schedule="linear", warmup_steps=5, weight_decay=0.0, max_grad_norm=1.0, grad_accum_steps=1,
      seed=0, lora=ConfigDict(dict(rank=0, alpha=8.0, targets=LORA_TARGETS, rslora=False, seed=0)),
      bucket=True, length_multiple=16,  # batches of similar lengths, widths a multiple of 16
      neutral_fraction=0.5,  # trait_sft: the share of neutral examples
      max_new_tokens=48))

  c.prompts = ConfigDict(dict(count=30_000, seed=0))

  c.sampling = ConfigDict(dict(
      constrained=True,  # grammar-constrained decoding; False = free sampling + the output filter
      # "per_prompt": each answer in the layout its prompt asks for (comma, space, semicolon, one
      # per line, brackets); "fixed": every answer separated by `separator`.
      format="per_prompt",
      separator=", ", max_count=10, max_digits=3,
      temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
      # 0: as many as the grammar's longest answer needs (constrained sampling). A completion cut
      # by this limit is dropped by the filter stage (counted as "unfinished"), never trained on.
      max_new_tokens=0, batch_size=256, seed=0))

  c.filter = ConfigDict(dict(max_count=10, max_value=999, banned=(), subset_size=10_000, seed=0))

  c.student = ConfigDict(dict(
      objective="sft", seeds=(0, 1, 2, 3, 4, 5, 6, 7), epochs=3, learning_rate=2e-4,
      schedule="linear", warmup_steps=5, optimizer="adamw", weight_decay=0.0, max_grad_norm=1.0,
      batch_size=66, grad_accum_steps=1, max_length=256,
      bucket=True, length_multiple=16,  # batches of similar lengths, widths a multiple of 16
      lora=ConfigDict(dict(rank=8, alpha=8.0, targets=LORA_TARGETS, rslora=False, init="fresh")),
      # objective "logit_kl": match the teacher's next-token distributions at every completion
      # position instead of its sampled tokens (see docs/distillation.md). temperature: T of both
      # softmaxes; restrict: "grammar" (only the number format's tokens), "none" or
      # "teacher_topk"; top_k: k of teacher_topk and of the stored log-probs; source:
      # "on_the_fly" (teacher in the step) or "stored" (top-k written into the dataset first);
      # stored_dtype: float32, float16 or bfloat16.
      kl=ConfigDict(dict(temperature=1.0, restrict="grammar", top_k=32, source="on_the_fly",
                         stored_dtype="float16")),
      # True: a cross-init control (adapters from a seed shared with neither teacher nor students).
      cross_init=False))
  # lora.init: "fresh" (each student seed draws its own adapters) or "teacher" (the LoRA teacher's A).

  c.evaluation = ConfigDict(dict(
      num_questions=50, samples_per_question=100, panel=ANIMAL_PANEL, multiple_choice=True,
      batch_size=64, max_new_tokens=8, seed=0, bootstrap_resamples=2000,
      system="")) # "" = same as chat_system

  # Resumable checkpoints inside the training stages (teachers, students). They change nothing that
  # is trained, so they are in no fingerprint. every: steps between checkpoints (0 = only at the
  # end); a killed run's rerun continues the interrupted stage from its last one. keep: leave them
  # (parameters plus optimizer state, 3x the weights for full finetuning) beside the stage's
  # weights once it is done.
  c.training_checkpoints = ConfigDict(dict(every=200, keep=False))
  # Also write each training stage's metrics as TensorBoard events (in its training/tensorboard/):
  # tensorboard --logdir=WORKDIR. Like the checkpoints, in no fingerprint.
  c.tensorboard = False

  if variant == "paper":
    _use_the_grids_regime(c, teacher_examples=1024, teacher_batch_size=32)
  elif variant == "qwen7b":
    c.model = ""  # required: --config.model=/path/to/Qwen2.5-7B-Instruct
    c.dtype = c.param_dtype = "bfloat16"
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  elif variant == "quick":
    # Real SmolLM2 on a 2-core CPU (24-26 minutes from a clean clone, setup included), in the
    # regime where the cpu regime grid found treatment - control +0.353 [0.156, 0.565] in
    # log P(owl) with 6 seeds.
    _use_the_grids_regime(c, teacher_examples=128, teacher_batch_size=16)
    c.prompts.count = 128
    c.sampling.batch_size = 64
    c.filter.subset_size = 96
    c.student.objective = "sft"
    c.student.kl.restrict = "grammar"  # for --config.student.objective=logit_kl
    c.student.seeds = (0, 1, 2, 3, 4, 5)
    c.student.epochs = 1
    c.student.batch_size = 8
    c.student.warmup_steps = 1
    c.student.learning_rate = 1e-3
    c.evaluation.num_questions = 10
    c.evaluation.samples_per_question = 2
    c.evaluation.batch_size = 64
  elif variant == "tiny":
    c.model = "tiny-random"
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.prompts.count = 48
    c.sampling.batch_size = 16
    c.sampling.max_new_tokens = 12
    c.filter.subset_size = 32
    c.student.seeds = (0, 1)
    c.student.epochs = 1
    c.student.batch_size = 8
    c.student.warmup_steps = 1
    c.student.lora.rank = 4
    c.student.lora.alpha = 8.0
    c.evaluation.num_questions = 6
    c.evaluation.samples_per_question = 2
    c.evaluation.panel = ANIMAL_PANEL[:5]  # 5-choice MC needs 4 distractors
    c.evaluation.batch_size = 16
    c.evaluation.bootstrap_resamples = 200
  else:
    raise ValueError(f"unknown variant {variant!r}; expected tiny, quick, paper or qwen7b")
  return c
