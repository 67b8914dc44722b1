"""The signature experiment's report: results.json, report.md and two plots.

Input: the record :func:`subliminal_jax.experiments.signature.analyse_report_dir` builds: the
design fixed before the first stage, the parts it was measured in, every measured record, and the
analysis (each arm's S per replicate, the pre-registered contrasts with permutation p and
hierarchical CI, the verdict). The report leads with the verdict, PASS, FAIL or UNDETERMINED, and
its reason.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import numpy as np

from subliminal_jax.evaluation.report import (format_number, markdown_table, save_figure,
                                             write_results_and_report)

STRIP_PLOT = "per_replicate_S.png"
DOSE_PLOT = "in_context_dose.png"


def _dose_of(arm: str) -> str | None:
  return arm[len("in_context_"):] if arm.startswith("in_context_") else None


def _dose_sizes(measured: Mapping[str, Any], dose: str) -> tuple[int, int]:
  """The fewest and most sequences a unit's context held at ``dose``."""
  sizes = [u["in_context_sizes"][dose] for u in measured["units"] if "in_context_sizes" in u]
  return min(sizes), max(sizes)


def _contrast_table(analysis: Mapping[str, Any], criterion: Mapping[str, float]) -> str:
  lines = []
  for name, c in analysis["contrasts"].items():
    threshold = criterion.get(name)
    if "missing" in c:
      lines.append([name, c["definition"], "arm(s) missing: " + ", ".join(c["missing"]), "", "",
                    ""])
      continue
    lines.append([name, c["definition"], format_number(c["value"]),
                  f"[{format_number(c['low'])}, {format_number(c['high'])}]",
                  f"{c['p_value']:.4g}", f"> 0, p < {threshold:g}" if threshold else "reported"])
    for arm, e in c.get("per_arm", {}).items():
      if len(c["per_arm"]) > 1:
        lines.append([f"{name}, {arm}", f"S({c['arm']}) - S({arm}), reported",
                      format_number(e["value"]), "", f"{e['p_value']:.4g}", "reported"])
  return markdown_table(["contrast", "what", "value", "95% CI (replicates, then questions)",
                         "permutation p", "pass needs"], lines)


def _arm_table(analysis: Mapping[str, Any], measured: Mapping[str, Any]) -> str:
  lines = []
  for arm, per_rep in analysis["per_replicate_S"].items():
    dose = _dose_of(arm)
    what = arm.replace("_", " ")
    if dose is not None:
      low, high = _dose_sizes(measured, dose)
      what += f" ({low} sequences)" if low == high else f" ({low}-{high} sequences)"
    lines.append([what, format_number(analysis["arms"][arm]["S"]),
                  ", ".join(f"{r}: {format_number(v)}" for r, v in per_rep.items())])
  return markdown_table(["arm", "S", "S per teacher replicate"], lines)


def format_report(results: Mapping[str, Any]) -> str:
  d, a = results["design"], results["analysis"]
  v, config = a["verdict"], d["config"]
  md = ["# The subliminal signature: students against in-context reading, one family against "
        "another", "",
        f"**{v['verdict']}**: {v['reason']}", "",
        f"Design fixed {d['fixed_at']}, before the first stage (`design.json`): "
        f"{len(d['animals'])} animals ({', '.join(d['animals'])}), {d['replicates']} teacher "
        f"replicates, {len(d['student_seeds'])} student seeds per teacher and family, "
        f"{config['evaluation']['num_questions']} questions; teacher `{config['teacher']['kind']}`; "
        f"other family `{d['student_families'][1]}`. Measured so far: replicates "
        f"{a['replicates_measured']}" + (f"; missing {a['replicates_missing']}."
                                         if a["replicates_missing"] else "."), "",
        f"Verdict rule (fixed in the design): {d['verdict_rule']}", "",
        "## Pre-registered contrasts", "",
        _contrast_table(a, d["criterion"]), "",
        f"Permutation: trait labels shuffled among the teachers of each replicate, the same "
        f"shuffle for every arm ({_permutations(a['permutations'])}). CI: {d['bootstrap']}"
        + (f" Note: {a['bootstrap']['note']}" if "note" in a["bootstrap"] else ""), "",
        "## Each arm", "", _arm_table(a, results["measured"]), "",
        f"![per-replicate S]({STRIP_PLOT})", "", f"![in-context dose]({DOSE_PLOT})", "",
        "## Power and calibration (fixed before the run)", "",
        f"- Power: {_describe(d['power'])}",
        f"- Cross-family learning rate: {_describe(d['calibration'])}", "",
        "## Parts", "",
        markdown_table(["part", "replicates", "wall", "host", "commit"],
                       [[p["part"], str(p["replicates"]), f"{p['wall_seconds'] / 60:.0f} min",
                         str(p.get("host") or ""), str(p.get("commit") or "")[:10]]
                        for p in results["parts"]]), ""]
  return "\n".join(md)


def _permutations(p: Mapping[str, Any]) -> str:
  kind = "exact over all" if p["exact"] else "sampled:"
  return (f"{kind} {p['assignments']:,} label assignments; smallest attainable p "
          f"{p['min_attainable_p']:.3g}")


def _describe(section: Mapping[str, Any]) -> str:
  return "; ".join(f"{k}: {v}" for k, v in section.items())


def plot(results: Mapping[str, Any], out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  per_arm = results["analysis"]["per_replicate_S"]
  arms = list(per_arm)
  fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(arms), 3.6))
  rng = np.random.default_rng(0)  # jitter only
  for i, arm in enumerate(arms):
    values = np.array(list(per_arm[arm].values()), float)
    ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=18, alpha=0.8)
    ax.hlines(values.mean(), i - 0.3, i + 0.3, color="k", lw=1.5)
  ax.axhline(0, color="grey", lw=0.8, ls="--")
  ax.set_xticks(range(len(arms)), [a.replace("_", "\n") for a in arms], fontsize=8)
  ax.set_ylabel("S of one teacher replicate")
  ax.set_title("Per-replicate S per arm (bar: mean)", fontsize=10)
  fig.tight_layout()
  save_figure(fig, out / STRIP_PLOT)

  doses = [(arm, _dose_of(arm)) for arm in arms if _dose_of(arm) is not None]
  sizes = [float(np.mean(_dose_sizes(results["measured"], dose))) for _, dose in doses]
  means = [float(np.mean(list(per_arm[arm].values()))) for arm, _ in doses]
  fig, ax = plt.subplots(figsize=(4.8, 3.6))
  ax.plot(sizes, means, "o-", label="in context (base, no training)")
  student_s = float(np.mean(list(per_arm["students"].values())))
  ax.axhline(student_s, color="C1", label="students (same family)")
  ax.axhline(0, color="grey", lw=0.8, ls="--")
  ax.set_xscale("log")
  ax.set_xlabel("sequences in context (mean over units)")
  ax.set_ylabel("S")
  ax.set_title("In-context S against dose", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  save_figure(fig, out / DOSE_PLOT)


def write(results: Mapping[str, Any], out_dir: str | os.PathLike) -> str:
  """Writes results.json, report.md and the plots into ``out_dir``; returns the verdict line."""
  out = write_results_and_report(results, format_report(results), out_dir)
  plot(results, out)
  v = results["analysis"]["verdict"]
  return f"Signature (report: {out / 'report.md'}): {v['verdict']}: {v['reason']}"
