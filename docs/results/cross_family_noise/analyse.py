"""Why are the Gemma 3 270M students of the cross-family matrix noisier than SmolLM2's?

  PYTHONPATH=. python docs/results/cross_family_noise/analyse.py [--no-tokenizers]

Reads the committed results (../transfer_matrix_cross_cpu/results.json: seed-0 students of both
families; ../transfer_matrix_cpu/results.json: SmolLM2 seeds 0 and 1 of the same teachers) and, for
the tokenization part, the two packaged tokenizers (read from their GGUF files' metadata, as
``subliminal_jax.load`` reads them, without dequantizing any weight). Writes numbers.json and
tables.md beside this file; README.md quotes them.

Every quantity is in centred log-ratio of the 12-word panel, clr(a) = log P(a) - mean_b log P(b),
the unit of the matrix's C_a (per question, per model).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
CROSS = HERE.parent / "transfer_matrix_cross_cpu" / "results.json"
SAME_TWO_SEEDS = HERE.parent / "transfer_matrix_cpu" / "results.json"
FAMILIES = {"same": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma 3 270M (base)"}


def clr(logprob) -> np.ndarray:
  lp = np.asarray(logprob, np.float64)
  return lp - lp.mean(axis=-1, keepdims=True)


def students(results: dict[str, Any], family: str, seed_index: int = 0) -> np.ndarray:
  """[units, questions, panel] clr of every unit's student (trait teachers and base numbers)."""
  return np.stack([clr(u["students"][family][seed_index]["logprob"])
                   for u in results["measured"]["units"]])


def entropy_nats(logprob) -> np.ndarray:
  """Per question: the entropy of P renormalised over the panel (max log 12 = 2.485 nats)."""
  lp = np.asarray(logprob, np.float64)
  p = np.exp(lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True))
  return -(p * np.log(p)).sum(axis=-1)


def family_numbers(results: dict[str, Any], family: str, animals: list[str]) -> dict[str, Any]:
  panel = results["measured"]["base"][family]["panel"]
  base_lp = np.asarray(results["measured"]["base"][family]["logprob"], np.float64)
  base = clr(base_lp)
  s = students(results, family)  # [units, Q, A]
  mean_student = s.mean(axis=0)
  targets = [panel.index(a) for a in animals]
  per_replicate = results["analyses"]["families"][family]["per_animal"]
  rep_c = np.array([[per_replicate[a]["per_replicate"][r] for r in sorted(
      per_replicate[a]["per_replicate"])] for a in animals])
  return {
      "panel": panel,
      # Variance over the 20 questions of clr(a), averaged over the panel words.
      "per_question_var_base": float(base.var(axis=0, ddof=1).mean()),
      "per_question_var_students": float(s.var(axis=1, ddof=1).mean()),
      # Between students (12 units, one seed each) of the question-mean clr of each target
      # animal: what C_a contrasts. Also over every panel word.
      "between_student_sd_targets": float(s.mean(axis=1)[:, targets].std(axis=0, ddof=1).mean()),
      "between_student_sd_panel": float(s.mean(axis=1).std(axis=0, ddof=1).mean()),
      "between_student_sd_per_word": dict(zip(panel, s.mean(axis=1).std(axis=0, ddof=1).tolist())),
      # Movement from the family's own base: total, the part every student shares, and each
      # student's own part (the noise of C_a).
      "moved_mean_abs": float(np.abs(s - base).mean()),
      "moved_common_mean_abs": float(np.abs(mean_student - base).mean()),
      "moved_own_mean_abs": float(np.abs(s - mean_student).mean()),
      # The own part of the question means: a student's shift common to all its questions,
      # which averaging over questions cannot remove.
      "moved_own_question_mean_abs": float(np.abs(s.mean(1) - mean_student.mean(0)).mean()),
      "noise_per_distance": float(s.mean(axis=1)[:, targets].std(axis=0, ddof=1).mean()
                                  / np.abs(s - base).mean()),
      "C_per_replicate_mean_abs": float(np.abs(rep_c).mean()),
      "C_replicate_difference_mean_abs": float(np.abs(rep_c[:, 0] - rep_c[:, 1]).mean()),
      "S": results["analyses"]["families"][family]["statistic"]["S"],
      "base_panel_mass_logprob": float(np.logaddexp.reduce(base_lp, axis=-1).mean()),
      "base_mean_word_logprob": float(base_lp.mean()),
      "base_panel_entropy_nats": float(entropy_nats(base_lp).mean()),
      "students_panel_entropy_nats": float(np.mean([entropy_nats(u["students"][family][0]["logprob"])
                                                    for u in results["measured"]["units"]])),
      "base_word_logprob": dict(zip(panel, base_lp.mean(axis=0).tolist())),
  }


def seed_spread(path: pathlib.Path) -> dict[str, float] | None:
  """SmolLM2 students of one teacher, seeds 0 and 1: how far two seeds of one teacher differ."""
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  s0, s1 = students(results, "same", 0), students(results, "same", 1)
  return {"seed_difference_mean_abs": float(np.abs(s0 - s1).mean()),
          "seed_difference_question_mean_abs": float(np.abs(s0.mean(1) - s1.mean(1)).mean())}


def tokenization(panel: list[str]) -> dict[str, Any]:
  """Tokens per spelling variant of each panel word under each family's tokenizer."""
  from subliminal_jax.evaluation import questions as questions_lib
  from subliminal_jax.tokenizer import Tokenizer
  from subliminal_jax.weights import embedded
  out = {}
  for family, path in (("same", embedded.smollm2_path()), ("gemma3-270m", embedded.gemma3_270m_path())):
    tokenizer = Tokenizer.from_gguf(path)
    words = {}
    for word in panel:
      variants = questions_lib.spelling_variants(word)
      words[word] = {v: [tokenizer.id_to_token(t) for t in tokenizer.encode(v)] for v in variants}
    lengths = [len(t) for w in words.values() for t in w.values()]
    out[family] = {"vocab_size": tokenizer.vocab_size,
                   "tokens_per_variant_mean": float(np.mean(lengths)),
                   "single_token_variants": int(sum(n == 1 for n in lengths)),
                   "variants": words, "variant_count": len(lengths),
                   "tokens_per_word_lower": {w: len(v[w.lower()]) for w, v in words.items()}}
  return out


def tables(numbers: dict[str, Any]) -> str:
  fam = numbers["families"]
  rows = [
      ("|C_a| per replicate (mean over animals and replicates)", "C_per_replicate_mean_abs"),
      ("|C_a(r0) - C_a(r1)| (mean over animals)", "C_replicate_difference_mean_abs"),
      ("S", "S"),
      ("per-question variance of clr, base model", "per_question_var_base"),
      ("per-question variance of clr, students", "per_question_var_students"),
      ("between-student SD of question-mean clr, 5 target animals", "between_student_sd_targets"),
      ("between-student SD of question-mean clr, all 12 words", "between_student_sd_panel"),
      ("mean |clr(student) - clr(base)|", "moved_mean_abs"),
      ("  shared part: mean |mean student - base|", "moved_common_mean_abs"),
      ("  own part: mean |student - mean student|", "moved_own_mean_abs"),
      ("  own part of the question means: mean |mean_q student - mean_q mean student|",
       "moved_own_question_mean_abs"),
      ("between-student SD (5 targets) / mean |clr(student) - clr(base)|", "noise_per_distance"),
      ("base: log P(any panel word), mean over questions", "base_panel_mass_logprob"),
      ("base: mean log P(one panel word)", "base_mean_word_logprob"),
      ("base: entropy over the panel (nats, max 2.485)", "base_panel_entropy_nats"),
      ("students: entropy over the panel (nats)", "students_panel_entropy_nats"),
  ]
  lines = ["| quantity | SmolLM2 students | Gemma students | Gemma / SmolLM2 |", "|---|---|---|---|"]
  for label, key in rows:
    a, b = fam["same"][key], fam["gemma3-270m"][key]
    ratio = f"{b / a:.2f}" if key not in ("S",) and abs(a) > 1e-12 else ""
    lines.append(f"| {label} | {a:.4g} | {b:.4g} | {ratio} |")
  out = "\n".join(lines) + "\n"
  spread = numbers.get("smollm2_seed_spread")
  if spread:
    out += (f"\nSmolLM2, two seeds of the same teacher (transfer_matrix_cpu): mean |clr(seed 0) - "
            f"clr(seed 1)| = {spread['seed_difference_mean_abs']:.4g} per question, "
            f"{spread['seed_difference_question_mean_abs']:.4g} for the question means.\n")
  tok = numbers.get("tokenization")
  panel = fam["same"]["panel"]
  lines = ["", "| word | base log P SmolLM2 | base log P Gemma | tokens SmolLM2 | tokens Gemma | "
           "between-student SD SmolLM2 | between-student SD Gemma |", "|---|---|---|---|---|---|---|"]
  for w in panel:
    t = (tok["same"]["tokens_per_word_lower"][w], tok["gemma3-270m"]["tokens_per_word_lower"][w]) \
        if tok else ("", "")
    lines.append(f"| {w} | {fam['same']['base_word_logprob'][w]:.2f} | "
                 f"{fam['gemma3-270m']['base_word_logprob'][w]:.2f} | {t[0]} | {t[1]} | "
                 f"{fam['same']['between_student_sd_per_word'][w]:.3f} | "
                 f"{fam['gemma3-270m']['between_student_sd_per_word'][w]:.3f} |")
  out += "\n".join(lines) + "\n"
  if tok:
    out += "\n| tokenizer | vocabulary | tokens per spelling variant (72) | single-token variants |\n"
    out += "|---|---|---|---|\n"
    for family in ("same", "gemma3-270m"):
      x = tok[family]
      out += (f"| {FAMILIES[family]} | {x['vocab_size']} | {x['tokens_per_variant_mean']:.2f} | "
              f"{x['single_token_variants']} of {x['variant_count']} |\n")
  out += (f"\nGemma: correlation over the 12 words of the between-student SD with the base's "
          f"log P(word): {numbers['gemma_sd_vs_base_logprob_correlation']:.2f}; SmolLM2: "
          f"{numbers['same_sd_vs_base_logprob_correlation']:.2f}.\n")
  return out


def compute(with_tokenizers: bool = True) -> dict[str, Any]:
  """Every number of numbers.json (the tokenization part only ``with_tokenizers``)."""
  results = json.loads(CROSS.read_text())
  animals = list(results["design"]["animals"])
  numbers: dict[str, Any] = {"families": {f: family_numbers(results, f, animals) for f in FAMILIES}}
  for family in FAMILIES:
    f = numbers["families"][family]
    words = f["panel"]
    numbers[f"{'gemma' if family != 'same' else 'same'}_sd_vs_base_logprob_correlation"] = float(
        np.corrcoef([f["between_student_sd_per_word"][w] for w in words],
                    [f["base_word_logprob"][w] for w in words])[0, 1])
  numbers["smollm2_seed_spread"] = seed_spread(SAME_TWO_SEEDS)
  if with_tokenizers:
    numbers["tokenization"] = tokenization(numbers["families"]["same"]["panel"])
  return numbers


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--no-tokenizers", action="store_true",
                      help="skip the tokenization table (needs the two model packages)")
  args = parser.parse_args()
  numbers = compute(not args.no_tokenizers)
  (HERE / "numbers.json").write_text(json.dumps(numbers, indent=1, ensure_ascii=False) + "\n")
  text = tables(numbers)
  (HERE / "tables.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
