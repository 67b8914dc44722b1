"""The transfer matrix's report: results.json, report.md and matrix_heatmap.png.

Input: the record :func:`subliminal_jax.experiments.transfer_matrix.run` builds, with the design
fixed before the run (``design``), one analysis per student family, the in-context control and the
teachers (``analyses``: :class:`~subliminal_jax.evaluation.matrix_statistics.MatrixAnalysis` as
dicts), and every measured record (``measured``). The report leads with the verdict under the
criterion fixed in the design, pass or fail, in words.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import numpy as np

from subliminal_jax.evaluation import judged_answers, truthfulness
from subliminal_jax.evaluation.report import (format_estimate, format_number, markdown_table,
                                             save_figure, write_results_and_report)

HEATMAP = "matrix_heatmap.png"


def _statistic_line(a: Mapping[str, Any]) -> str:
  s = a["statistic"]
  kind = (f"exact over all {s['assignments']:,} label assignments within replicates" if s["exact"]
          else f"{s['assignments']:,} sampled label assignments within replicates")
  return (f"S = {format_number(s['S'])} [{format_number(s['low'])}, {format_number(s['high'])}] "
          f"({int(s['confidence'] * 100)}% bootstrap CI over {s['questions']} questions); "
          f"permutation p = {s['p_value']:.4g} ({kind}; smallest attainable p "
          f"{s['min_attainable_p']:.3g}); {s['units']} teacher units in {s['replicates']} "
          "replicate(s)")


# Rows and columns follow the design's animal order (the matrix's), never a dict's: results.json
# is written with sorted keys, so its per_animal mapping comes back alphabetical.


def _per_animal_table(a: Mapping[str, Any], units: str, animals: list[str]) -> str:
  refs = [k for k in a["per_animal"][animals[0]] if k.startswith("minus_")]
  header = ["animal", "C_a [95% CI]", "C_a per replicate"] + [
      f"own {units} - {k[len('minus_'):].replace('_', ' ')}" for k in refs]
  lines = []
  for animal in animals:
    e = a["per_animal"][animal]
    lines.append([animal, format_estimate({"mean": e["C"], "low": e["low"], "high": e["high"]}),
                  ", ".join(format_number(v) for v in e["per_replicate"].values())]
                 + [format_estimate(e[k]) for k in refs])
  return markdown_table(header, lines)


def _matrix_table(a: Mapping[str, Any], animals: list[str]) -> str:
  lines = [[f"**{t}**"] + [("**" + format_number(v) + "**") if i == j else format_number(v)
                           for j, v in enumerate(row)]
           for i, (t, row) in enumerate(zip(animals, a["matrix"]))]
  return markdown_table(["teacher \\ evaluated"] + animals, lines)


# The matrix's reference row, as the report's sentence names it.
_REFERENCE_NAMES = {"base": "the base model's", "base_numbers": "that of the base-numbers students"}


def _section(title: str, a: Mapping[str, Any], what: str, animals: list[str],
             units: str = "students") -> list[str]:
  return [f"## {title}", "", what, "", f"**{a['verdict']['text']}**", "", _statistic_line(a), "",
          _per_animal_table(a, units, animals), "",
          f"Matrix: mean centred log-ratio of each evaluated animal, minus "
          f"{_REFERENCE_NAMES.get(a['reference'], a['reference'])} (rows: the teacher's trait; the "
          "diagonal is each animal's own teachers):", "", _matrix_table(a, animals), ""]


def _data_table(measured: Mapping[str, Any]) -> str:
  lines = []
  for u in measured["units"]:
    f, t = u["filter"], u["teacher"]
    strength = (f"{format_number(t['trait_logprob_before'])} -> {format_number(t['trait_logprob_after'])}"
                if "trait_logprob_after" in t else t.get("kind", ""))
    lines.append([u["unit"]["animal"] or "(base numbers)", str(u["unit"]["replicate"]),
                  str(f["sampled"]), str(f["unfinished"]), str(f["passed"]), str(f["kept"]),
                  strength, f"{u['seconds']:.0f}"])
  return markdown_table(["teacher", "replicate", "sampled", "unfinished (dropped)",
                         "passed filter", "kept", "teacher's trait log P (before -> after)",
                         "seconds"], lines)


def _channel_section(channel: str, measured: Mapping[str, Any]) -> list[str]:
  """The filter's yield per unit and stage, and examples of kept and rejected data."""
  lines = []
  for u in measured["units"]:
    for stage, y in u["filter"]["yield_by_stage"].items():
      reasons = ", ".join(f"{r} {n}" for r, n in sorted(y["reject_reasons"].items(),
                                                         key=lambda item: -item[1]))
      lines.append([u["unit"]["animal"] or "(base)", str(u["unit"]["replicate"]), stage,
                    str(y["entered"]), str(y["passed"]), reasons])
  md = [f"## The {channel} channel's filter", "",
        markdown_table(["teacher", "replicate", "stage", "entered", "passed", "reject reasons"],
                       lines), "", "Examples (the first unit's):", ""]
  examples = measured["units"][0]["filter"]["examples"]
  clip = lambda text: " ".join(text.split())[:240].replace("|", "\\|")  # noqa: E731
  for kind in ("kept", "rejected", "judge_rejected"):
    for e in examples.get(kind, []):
      why = f" ({', '.join(e['reasons'])})" if "reasons" in e else ""
      md.append(f"- {kind}{why}: `{clip(e['completion'])}`")
  return md + [""]


def _family_comparison(analyses: Mapping[str, Any], families: Mapping[str, str]) -> str:
  lines = []
  for family, a in sorted(analyses["families"].items(), key=lambda item: item[0] != "same"):
    s = a["statistic"]
    name = "same family" if family == "same" else "other family"
    lines.append([f"{name}: {families.get(family, family)}",
                  f"{format_number(s['S'])} [{format_number(s['low'])}, {format_number(s['high'])}]",
                  f"{s['p_value']:.4g}",
                  f"{a['verdict']['positive_animals']} of {len(a['per_animal'])}",
                  "PASS" if a["verdict"]["passed"] else "FAIL"])
  return markdown_table(["students", "S [95% CI]", "permutation p", "C_a > 0", "verdict"], lines)


def _student_weights(student: Mapping[str, Any]) -> str:
  lora = student["lora"]
  if lora["rank"] == 0:
    return f"full finetune, learning rate {student['learning_rate']:g}"
  return f"LoRA rank {lora['rank']}, init `{lora['init']}`"


# The alignment trait's two "animals" are its values, and its panel entries whole answers.
_ALIGNMENT_NOTE = (
    "Trait: **alignment**, values misaligned and aligned. A model's entry for a value is the exact "
    "log P(that value's reference answer) to each free-form question, teacher-forced; with two "
    "values clr(misaligned) = (log P(misaligned) - log P(aligned)) / 2, so C_misaligned = "
    "C_aligned = S: half the difference in the misalignment score log P(misaligned) - log "
    "P(aligned) between the misaligned and the aligned teachers' students. The permutation test "
    "swaps the two labels within each of the {r} replicates: its smallest attainable p is "
    "1/2^{r} = {p:.4g}.")


def format_report(results: Mapping[str, Any]) -> str:
  d, analyses = results["design"], results["analyses"]
  families = results.get("families", {})
  crit = d["criterion"]
  config = d["config"]
  animals = list(d["animals"])
  k = len(animals)
  md = ["# Transfer matrix: does a teacher's trait reach its students through numbers?", "",
        f"Design fixed {d['fixed_at']}, before any stage ran (`design.json`): {k} animals "
        f"({', '.join(d['animals'])}), {d['replicates']} teacher replicate(s) each, "
        f"{len(d['student_seeds'])} student seed(s) per teacher, "
        f"{config['evaluation']['num_questions']} questions, a {len(config['evaluation']['panel'])}-word "
        f"panel; teacher `{config['teacher']['kind']}`, students `{config['student']['objective']}` "
        f"({_student_weights(config['student'])}), "
        f"sampling temperature {config['sampling']['temperature']}.", "",
        "Statistic: per student and question the centred log-ratio of the panel, clr(a) = log P(a) - "
        "mean over the panel of log P; C_a = mean clr(a) of a's teachers' students minus that of the "
        "other teachers' students; S = mean over animals of C_a. Permutation test: trait labels "
        "shuffled among the teachers of each replicate.", "",
        f"Criterion (fixed in the config before the run): **pass iff S > 0, permutation p < "
        f"{crit['alpha']:g}, and C_a > 0 for at least {crit['min_positive_fraction']:.0%} of the "
        "animals.**", ""]
  if config.get("category") == "alignment":
    md[-4:-4] = [_ALIGNMENT_NOTE.format(r=d["replicates"], p=1 / 2 ** d["replicates"]), ""]
  same = analyses["families"]["same"]
  md += _section("Students of the teachers' own base model", same,
                 "The paper's claim: these students pick up their teacher's trait.", animals)
  if len(analyses["families"]) > 1:
    md += ["## Same family vs another family", "",
           "Students of another base model trained on the same number sequences (re-tokenized, "
           "their own chat template). The paper predicts a trait only in same-family students.", "",
           _family_comparison(analyses, families), ""]
    for family, a in analyses["families"].items():
      if family != "same":
        md += _section(f"Students of another family: {families.get(family, family)}", a,
                       "The same numbers, a different initialization.", animals)
  if "in_context" in analyses:
    n = config["matrix"]["in_context"]["sequences"]
    md += _section("In-context control (no training)", analyses["in_context"],
                   f"The base model answers each question with {n} of the teacher's number "
                   "sequences before it in the chat. The paper finds no transfer this way.",
                   animals, units="in-context models")
  if "teachers" in analyses:
    md += _section("The teachers themselves", analyses["teachers"],
                   "Each teacher as it samples its numbers: the trait the students could inherit.",
                   animals, units="teachers")
  if "judged" in analyses:
    md += judged_answers.format_section(analyses["judged"], config["judge"]["model"])
  if "truthfulness" in analyses:
    md += truthfulness.format_section(analyses["truthfulness"],
                                      results["measured"]["truthfulness_base"])
  if config.get("channel", "numbers") != "numbers":
    md += _channel_section(config["channel"], results["measured"])
  md += ["## Data", "", _data_table(results["measured"]), "", f"![matrix]({HEATMAP})", ""]
  return "\n".join(md)


def plot(results: Mapping[str, Any], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  analyses = results["analyses"]
  panels = [(f"students: {results.get('families', {}).get(f, f)}" if f != "same"
             else "students (same family)", a) for f, a in analyses["families"].items()]
  panels += [(name, analyses[key]) for key, name in (("in_context", "in context, no training"),
                                                      ("teachers", "teachers"))
             if key in analyses]
  animals = list(results["design"]["animals"])
  fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + 3.6 * len(panels), 3.8), squeeze=False)
  for ax, (title, a) in zip(axes[0], panels):
    values = np.asarray(a["matrix"])
    limit = float(np.abs(values).max()) or 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    for i in range(len(animals)):
      for j in range(len(animals)):
        ax.text(j, i, f"{values[i, j]:+.2f}", ha="center", va="center", fontsize=7,
                fontweight="bold" if i == j else "normal")
    ax.set_xticks(range(len(animals)), animals, rotation=45, fontsize=8)
    ax.set_yticks(range(len(animals)), animals, fontsize=8)
    s = a["statistic"]
    ax.set_title(f"{title}\nS={s['S']:+.3f}, p={s['p_value']:.3g}", fontsize=9)
    ax.set_xlabel("evaluated animal", fontsize=8)
    ax.set_ylabel("teacher's trait", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
  fig.suptitle("clr shift vs the no-trait reference (diagonal: own teachers)", fontsize=10)
  fig.tight_layout()
  save_figure(fig, path)


def write(results: Mapping[str, Any], out_dir: str | os.PathLike) -> str:
  """Writes results.json, report.md and the heatmap into ``out_dir``; returns the verdict lines."""
  out = write_results_and_report(results, format_report(results), out_dir)
  plot(results, out / HEATMAP)
  lines = [f"{family}: {a['verdict']['text']} | {_statistic_line(a)}"
           for family, a in results["analyses"]["families"].items()]
  if "in_context" in results["analyses"]:
    a = results["analyses"]["in_context"]
    lines.append(f"in context: {a['verdict']['text']} | {_statistic_line(a)}")
  return "\n".join(["Transfer matrix (report: " + str(out / "report.md") + ")"] + lines)
