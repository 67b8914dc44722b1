"""The results table of a trait experiment: results.json, report.md and plots, like the paper's.

Input: a results dict

  {"target": "owl", "category": "animal",
   "rows": {"base": [record], "teacher": [record],
            "control": [record per seed], "treatment": [record per seed]},
   "notes": {...}}                      # optional, copied into results.json

where a record is ``TraitEvaluation.to_record()`` plus an optional "seed":
``{"seed": 0, "metrics": {name: [one value per question]}, "panel_share": {word: [...]}}``.
Any subset of the four rows may be given (base is needed for shifts).

Output in ``out_dir``: results.json (the input values and every estimate), report.md (a table with
a row per model and a column per metric, mean [CI]; shifts against the base; treatment minus
control; the panel), target_preference.png and panel.png. Numbers are formatted deterministically,
so the same results give byte-identical report.md and results.json.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from subliminal_jax import environment, files, jsonable
from subliminal_jax.evaluation import statistics
from subliminal_jax.evaluation.trait_metrics import METRIC_DESCRIPTIONS

ROWS = ("base", "teacher", "control", "treatment")
STUDENT_ROWS = ("teacher", "control", "treatment")  # rows whose shift against base is reported
_METRIC_ORDER = ("logprob", "panel_share", "prefix_logprob", "sampled_rate", "mc_prob")


def format_number(x: float) -> str:
  """Fixed, locale-free formatting: 3 decimals, or 3 significant digits for small magnitudes."""
  if not math.isfinite(x):
    return str(x)
  if x == 0 or abs(x) >= 0.01:
    return f"{x:.3f}"
  return f"{x:.2e}"


def format_estimate(e: Mapping[str, Any]) -> str:
  return f"{format_number(e['mean'])} [{format_number(e['low'])}, {format_number(e['high'])}]"


def _validate(results: Mapping[str, Any]) -> tuple[list[str], list[str]]:
  """Rows present (canonical order) and metrics present (canonical order, then sorted others)."""
  rows = results.get("rows")
  if not isinstance(rows, Mapping) or not rows:
    raise ValueError("results['rows'] must be a non-empty dict of row name -> list of records")
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    raise ValueError(f"unknown rows {unknown}; expected some of {list(ROWS)}")
  metrics: set[str] = set()
  for name, records in rows.items():
    if isinstance(records, Mapping) or not len(records):
      raise ValueError(f"row {name!r} must be a non-empty list of per-seed records")
    for record in records:
      if "metrics" not in record or not record["metrics"]:
        raise ValueError(f"a record of row {name!r} has no 'metrics'")
      metrics.update(record["metrics"])
  for name, records in rows.items():
    for metric in metrics:
      sizes = {len(r["metrics"][metric]) for r in records if metric in r["metrics"]}
      if len(sizes) > 1:
        raise ValueError(f"row {name!r}: metric {metric!r} has different question counts across "
                         f"seeds: {sorted(sizes)}")
  ordered = [m for m in _METRIC_ORDER if m in metrics] + sorted(metrics - set(_METRIC_ORDER))
  return [r for r in ROWS if r in rows], ordered


def _matrix(records: Sequence[Mapping[str, Any]], metric: str) -> np.ndarray | None:
  """[seeds, questions] of one metric (None if no record of the row has it)."""
  values = [r["metrics"][metric] for r in records if metric in r["metrics"]]
  return np.asarray(values, np.float64) if values else None


def compute_estimates(results: Mapping[str, Any], *, confidence: float = 0.95,
                      n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
  """Every estimate of the report as plain dicts (no files written)."""
  rows, metrics = _validate(results)
  ci = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
  table: dict[str, dict[str, Any]] = {}
  shifts: dict[str, dict[str, Any]] = {}
  for row in rows:
    table[row] = {}
    for metric in metrics:
      data = _matrix(results["rows"][row], metric)
      if data is not None:
        table[row][metric] = statistics.hierarchical_mean_ci(data, **ci).to_dict()
  if "base" in rows:
    for row in rows:
      if row not in STUDENT_ROWS:
        continue
      shifts[row] = {}
      for metric in metrics:
        base, data = _matrix(results["rows"]["base"], metric), _matrix(results["rows"][row], metric)
        if base is None or data is None or base.shape[1] != data.shape[1]:
          continue
        # The base is one deterministic model: its seeds (if several) are averaged first.
        shifts[row][metric] = statistics.shift_ci(data, base.mean(axis=0), **ci).to_dict()
  difference: dict[str, Any] = {}
  if "treatment" in rows and "control" in rows:
    for metric in metrics:
      t = _matrix(results["rows"]["treatment"], metric)
      c = _matrix(results["rows"]["control"], metric)
      if t is not None and c is not None and t.shape[1] == c.shape[1]:
        difference[metric] = statistics.difference_ci(t, c, **ci).to_dict()
  panel = _panel_means(results, rows)
  return {"rows": rows, "metrics": metrics, "table": table, "shift_vs_base": shifts,
          "treatment_minus_control": difference, "panel_share_mean": panel,
          "bootstrap": {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}}


def _panel_means(results: Mapping[str, Any], rows: Sequence[str]) -> dict[str, dict[str, float]]:
  out: dict[str, dict[str, float]] = {}
  for row in rows:
    shares: dict[str, list[float]] = {}
    for record in results["rows"][row]:
      for word, values in record.get("panel_share", {}).items():
        shares.setdefault(word, []).extend(float(v) for v in values)
    if shares:
      out[row] = {word: float(np.mean(v)) for word, v in shares.items()}
  return out


def save_figure(fig, path: pathlib.Path) -> None:
  """Writes ``fig`` as a PNG atomically, without the matplotlib version in its metadata (so a
  report regenerates byte for byte), and closes it."""
  import matplotlib.pyplot as plt
  files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, metadata={"Software": None}))
  plt.close(fig)


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(line) + " |" for line in lines]
  return "\n".join(out)


def format_table(estimates: Mapping[str, Any], results: Mapping[str, Any]) -> str:
  """The main table (rows x metrics, mean [CI]) and the shift table, as markdown text."""
  rows, metrics = estimates["rows"], estimates["metrics"]
  header = ["row", "seeds"] + list(metrics)
  lines = []
  for row in rows:
    cells = [row, str(len(results["rows"][row]))]
    for metric in metrics:
      e = estimates["table"][row].get(metric)
      cells.append(format_estimate(e) if e else "-")
    lines.append(cells)
  text = markdown_table(header, lines)
  shift_lines = []
  for row, by_metric in estimates["shift_vs_base"].items():
    shift_lines.append([f"{row} - base"] + [
        format_estimate(by_metric[m]) if m in by_metric else "-" for m in metrics])
  if estimates["treatment_minus_control"]:
    d = estimates["treatment_minus_control"]
    shift_lines.append(["treatment - control"] + [
        format_estimate(d[m]) if m in d else "-" for m in metrics])
  if shift_lines:
    text += "\n\nShifts (paired by question; CI over seeds and questions):\n\n"
    text += markdown_table(["comparison"] + list(metrics), shift_lines)
  return text


def _plot_target_preference(estimates: Mapping[str, Any], results: Mapping[str, Any],
                            path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows, metrics = estimates["rows"], estimates["metrics"]
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    present = [r for r in rows if metric in estimates["table"][r]]
    means = [estimates["table"][r][metric]["mean"] for r in present]
    lows = [estimates["table"][r][metric]["low"] for r in present]
    highs = [estimates["table"][r][metric]["high"] for r in present]
    x = np.arange(len(present))
    yerr = np.array([np.subtract(means, lows), np.subtract(highs, means)])
    ax.errorbar(x, means, yerr=yerr, fmt="o", capsize=4, color="black", zorder=3)
    for i, r in enumerate(present):  # one dot per seed: the spread the CI is made of
      per_seed = _matrix(results["rows"][r], metric).mean(axis=1)
      ax.scatter(np.full(per_seed.shape, i + 0.15), per_seed, s=10, alpha=0.6, color="tab:blue")
    ax.set_xticks(x, present, rotation=30)
    ax.set_title(metric, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  target = results.get("target", "target")
  fig.suptitle(f"Preference for {target} (mean, {int(estimates['bootstrap']['confidence'] * 100)}% CI)")
  fig.tight_layout()
  save_figure(fig, path)


def _plot_panel(estimates: Mapping[str, Any], results: Mapping[str, Any], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panel = estimates["panel_share_mean"]
  fig, ax = plt.subplots(figsize=(9, 3.6))
  if panel:
    rows = [r for r in estimates["rows"] if r in panel]
    words = list(next(iter(panel.values())))
    width = 0.8 / len(rows)
    x = np.arange(len(words))
    for i, row in enumerate(rows):
      ax.bar(x + (i - (len(rows) - 1) / 2) * width, [panel[row].get(w, 0.0) for w in words], width,
             label=row)
    ax.set_xticks(x, words, rotation=30)
    ax.set_ylabel("panel share (exact)")
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, "no panel shares in the results", ha="center", va="center")
  ax.set_title(f"Per-{results.get('category', 'word')} share of the panel")
  fig.tight_layout()
  save_figure(fig, path)


def write_results_and_report(results: Mapping[str, Any], report: str,
                             out_dir: str | os.PathLike) -> pathlib.Path:
  """An experiment's results.json (sorted keys, so the same results give the same bytes) and
  report.md into ``out_dir``, made if missing; returns it."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files.write_json(out / "results.json", results, indent=1, sort_keys=True)
  files.write_text_atomic(out / "report.md", report + "\n")
  return out


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike, *, confidence: float = 0.95,
                 n_resamples: int = 2000, seed: int = 0, plots: bool = True) -> str:
  """Writes results.json, report.md and the plots into ``out_dir``; returns the table text."""
  estimates = compute_estimates(results, confidence=confidence, n_resamples=n_resamples, seed=seed)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  table = format_table(estimates, results)

  target, category = results.get("target", "?"), results.get("category", "?")
  md = [f"# Trait evaluation: {target} ({category})", "",
        f"Mean over questions (and seeds) with {int(confidence * 100)}% bootstrap CIs "
        f"({n_resamples} resamples, seed {seed}; seeds and questions resampled).", "", table, ""]
  panel = estimates["panel_share_mean"]
  if panel:
    # The evaluation's panel order when the results name it: a results.json written with sorted
    # keys and read back reports the same columns as the run that wrote it.
    found = list(next(iter(panel.values())))
    configured = results.get("notes", {}).get("config", {}).get("evaluation", {}).get("panel", ())
    words = [w for w in configured if w in found] + [w for w in found if w not in configured]
    md += ["## Panel shares (exact, mean over questions and seeds)", "",
           markdown_table(["row"] + words,
                           [[row] + [format_number(panel[row].get(w, float("nan"))) for w in words]
                            for row in estimates["rows"] if row in panel]), ""]
  md += ["## Metrics", ""]
  md += [f"- `{m}`: {METRIC_DESCRIPTIONS.get(m, 'as given in the results')}"
         for m in estimates["metrics"]]
  if plots:
    md += ["", "![target preference](target_preference.png)", "", "![panel](panel.png)"]
  files.write_text_atomic(out / "report.md", "\n".join(md) + "\n")

  record = {"target": target, "category": category, "notes": results.get("notes", {}),
            "estimates": estimates, "rows": results["rows"], "environment": environment.describe()}
  files.write_json(out / "results.json", jsonable.to_jsonable(record), indent=1, sort_keys=True)
  if plots:
    _plot_target_preference(estimates, results, out / "target_preference.png")
    _plot_panel(estimates, results, out / "panel.png")
  return table
