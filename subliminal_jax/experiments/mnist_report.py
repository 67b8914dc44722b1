"""report.md, the table and the plots of the MNIST auxiliary-logit experiment, from its JSON files.

Reads only what the stages wrote into the workdir (results.json, alignment_training.json,
run_info.json, theorem.json; for a sweep, each point's results.json), so the report can be
rebuilt without retraining (``--stages=report``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from subliminal_jax import files  # noqa: E402

ROW_LABELS = {
    "reference": "reference (untrained)",
    "teacher": "teacher",
    "student_same_init_aux": "student, same init, aux logits only",
    "student_same_init_all": "student, same init, all logits",
    "student_cross_init_aux": "student, cross init, aux logits only",
    "student_cross_init_all": "student, cross init, all logits",
}
# What the paper and an independent rerun report (REFERENCE.md section 1), for the table.
PUBLISHED = {
    "reference": "~0.10 (chance)",
    "teacher": "0.89-0.98",
    "student_same_init_aux": "> 0.5 (paper); 0.463 +- 0.023 (rerun)",
    "student_cross_init_aux": "0.098 (rerun)",
}


def _read(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.exists() else None


def rows_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
  lines = ["| row | test accuracy (mean) | std | models | published |",
           "|---|---|---|---|---|"]
  for row, stats in rows.items():
    lines.append(f"| {ROW_LABELS.get(row, row)} | {stats['mean']:.4f} | {stats['std']:.4f} | "
                 f"{stats['num_models']} | {PUBLISHED.get(row, '')} |")
  return "\n".join(lines)


def theorem_table(theorem: Mapping[str, Any]) -> str:
  epsilons = theorem["epsilons"]
  lines = ["| optimizer | " + " | ".join(f"eps={e:g}" for e in epsilons) + " |",
           "|---|" + "---|" * len(epsilons)]
  for optimizer, per_eps in theorem["one_step"].items():
    cells = [f"{per_eps[str(float(e))]['share_nonnegative']:.3f} "
             f"(cos {per_eps[str(float(e))]['cosine_mean']:+.3f})" for e in epsilons]
    lines.append(f"| {optimizer} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_report(workdir: str | pathlib.Path) -> pathlib.Path:
  """report.md (+ mnist_aux.png, theorem.png) from the JSON files present in ``workdir``."""
  workdir = pathlib.Path(workdir)
  rows = _read(workdir / "results.json")
  info = _read(workdir / "run_info.json")
  along = _read(workdir / "alignment_training.json")
  theorem = _read(workdir / "theorem.json")
  if rows is None and theorem is None:
    raise FileNotFoundError(f"{workdir} has neither results.json nor theorem.json: run the train "
                            "or theorem stage first")
  parts = ["# MNIST: subliminal learning through auxiliary logits", ""]
  if rows is not None:
    parts += ["Test accuracy on the 10,000 MNIST test digits; students never saw a digit or a "
              "label.", "", rows_table(rows), ""]
  if info is not None:
    c = info["config"]
    device = info["device"]
    parts += [f"Run: {c['num_models']} models x seeds {list(c['seeds'])}, MLP 784-"
              f"{'-'.join(str(h) for h in c['model']['hidden_sizes'])}-(10+{c['model']['num_aux']}), "
              f"compute dtype {c['model']['compute_dtype']}, teacher {c['teacher']['epochs']} "
              f"epochs, students {c['student']['epochs']} epochs of "
              f"{c['student']['examples_per_epoch']} {c['student']['inputs']} inputs, loss "
              f"{c['student']['loss']}, optimizer {c['student']['optimizer']} lr "
              f"{c['student']['learning_rate']}.",
              f"Train stage wall time: {info['wall_seconds']:.1f} s on {device['device_count']} x "
              f"{device['platform']} ({device['device_kind']}, {device['cpu_count']} CPUs).", ""]
  if rows is not None or along:
    plot = plot_rows(rows or {}, along or {}, workdir / "mnist_aux.png")
    parts += [f"![accuracies and alignment]({plot.name})", ""]
  if along:
    parts += ["Alignment along training: cosine between the student's displacement "
              "theta_S - theta_S0 and its teacher's theta_T - theta_T0.", "",
              "| student | first recorded step: cos / share dot >= 0 | last step: cos / share |",
              "|---|---|---|"]
    for key, series in along.items():
      if key == "steps":
        continue
      parts.append(f"| {ROW_LABELS.get(key, key)} | {series['cosine_mean'][0]:+.4f} / "
                   f"{series['share_dot_nonnegative'][0]:.2f} | {series['cosine_mean'][-1]:+.4f} "
                   f"/ {series['share_dot_nonnegative'][-1]:.2f} |")
    parts.append("")
  if theorem is not None:
    fo = theorem["first_order"]
    parts += ["## Theorem check (one imitation step, float32)", "", theorem["statement"], "",
              f"Draws per cell: {theorem['draws_per_cell']} (seeds x models x inputs x losses x "
              "directions). Cell: share of draws with update . (theta_T - theta0) >= 0, and the "
              "mean cosine.", "", theorem_table(theorem), "",
              f"First-order coefficient E[(J D)^T H (J D)] by JVPs: share >= 0 "
              f"{fo['share_nonnegative']:.3f}, min {fo['min']:.3g}, median {fo['median']:.3g} "
              f"over {fo['num_draws']} draws."]
    sgd = theorem["one_step"].get("sgd")
    if sgd:
      ratios = ", ".join(f"eps={float(e):g}: {v['ratio_to_first_order_median']:.4f}"
                         for e, v in sgd.items())
      parts.append(f"Gradient step . D / (lr eps) over that coefficient (median; -> 1 as eps -> 0): "
                   f"{ratios}.")
    trajectory = theorem.get("sgd_trajectory")
    if trajectory:
      parts.append(f"Plain gradient descent (lr {trajectory['learning_rate']}) for "
                   f"{len(trajectory['steps'])} steps: share of (step, model) with dot >= 0 "
                   f"{trajectory['share_nonnegative_all_steps']:.3f}; cosine after the last step "
                   f"{trajectory['cosine_mean'][-1]:+.4f}.")
    plot = plot_theorem(theorem, workdir / "theorem.png")
    parts += ["", f"![theorem check]({plot.name})", ""]
  path = workdir / "report.md"
  files.write_text_atomic(path, "\n".join(parts) + "\n")
  return path


def plot_rows(rows: Mapping[str, Any], along: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  ax = axes[0]
  names = list(rows)
  for i, row in enumerate(names):
    accuracies = np.asarray(rows[row]["accuracies"])
    ax.bar(i, rows[row]["mean"], yerr=rows[row]["std"], color="C%d" % i, alpha=0.6, capsize=4)
    jitter = np.random.default_rng(i).uniform(-0.2, 0.2, accuracies.size)
    ax.scatter(i + jitter, accuracies, s=6, color="k", zorder=3)
  ax.axhline(0.1, color="gray", ls="--", lw=1, label="chance")
  ax.set_xticks(range(len(names)),
                [ROW_LABELS.get(r, r).replace(", ", "\n") for r in names], fontsize=7)
  ax.set_ylabel("MNIST test accuracy")
  ax.set_ylim(0, 1)
  ax.legend(loc="upper right")
  ax.set_title("Teachers, and students trained on noise")
  ax = axes[1]
  if along:
    steps = np.asarray(along["steps"])
    for key, series in along.items():
      if key == "steps":
        continue
      mean, std = np.asarray(series["cosine_mean"]), np.asarray(series["cosine_std"])
      ax.plot(steps, mean, label=ROW_LABELS.get(key, key).replace("student, ", ""))
      ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xscale("log")
    ax.axhline(0, color="gray", lw=1)
    ax.legend(fontsize=8)
  ax.set_xlabel("student step")
  ax.set_ylabel("cos(theta_S - theta_S0, theta_T - theta_T0)")
  ax.set_title("Student update vs teacher displacement")
  fig.tight_layout()
  files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
  plt.close(fig)
  return path


def plot_theorem(theorem: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  epsilons = np.asarray(theorem["epsilons"])
  ax = axes[0]
  for optimizer, per_eps in theorem["one_step"].items():
    ax.plot(epsilons, [per_eps[str(float(e))]["share_nonnegative"] for e in epsilons], "o-",
            label=f"{optimizer}: share dot >= 0")
    ax.plot(epsilons, [per_eps[str(float(e))]["cosine_mean"] for e in epsilons], "x--",
            label=f"{optimizer}: mean cosine")
  ax.set_xscale("log")
  ax.set_xlabel("eps (teacher = theta0 + eps * D)")
  ax.set_ylim(-0.05, 1.05)
  ax.set_title("One imitation step from the shared init")
  ax.legend(fontsize=7)
  ax = axes[1]
  trajectory = theorem.get("sgd_trajectory")
  if trajectory:
    steps = np.asarray(trajectory["steps"])
    mean, std = np.asarray(trajectory["cosine_mean"]), np.asarray(trajectory["cosine_std"])
    ax.plot(steps, mean, label="cosine (mean over models, seeds)")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.plot(steps, trajectory["share_nonnegative"], label="share dot >= 0")
    ax.set_xlabel("plain gradient step")
    ax.set_title(f"Along training (lr {trajectory['learning_rate']})")
    ax.legend(fontsize=8)
  fig.tight_layout()
  files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
  plt.close(fig)
  return path


def write_sweep_report(workdir: pathlib.Path, name: str, value_name: str,
                       points: Sequence[tuple[str, Mapping[str, Any], pathlib.Path]]) -> pathlib.Path:
  """sweep.json, sweep.md (one table: points x rows) and sweep.png (one plot)."""
  collected = []
  for label, overrides, point_dir in points:
    rows = _read(point_dir / "results.json")
    if rows is None:
      raise FileNotFoundError(f"sweep point {label!r} has no {point_dir / 'results.json'}: run "
                              "the train stage first")
    info = _read(point_dir / "run_info.json") or {}
    collected.append({"label": label, "overrides": dict(overrides), "rows": rows,
                      "wall_seconds": info.get("wall_seconds")})
  row_names = [r for r in ROW_LABELS if any(r in p["rows"] for p in collected)]
  files.write_json(workdir / "sweep.json", {"name": name, "points": collected})
  header = "| " + (value_name or name) + " | " + " | ".join(ROW_LABELS[r] for r in row_names) + \
      " | wall s |"
  lines = [f"# MNIST auxiliary-logit sweep: {name}", "",
           "Test accuracy, mean +- std over models and seeds.", "", header,
           "|---|" + "---|" * (len(row_names) + 1)]
  for p in collected:
    cells = [f"{p['rows'][r]['mean']:.3f} +- {p['rows'][r]['std']:.3f}" if r in p["rows"] else ""
             for r in row_names]
    lines.append(f"| {p['label']} | " + " | ".join(cells) + f" | {p['wall_seconds']} |")
  lines += ["", f"![sweep](sweep.png)", ""]
  files.write_text_atomic(workdir / "sweep.md", "\n".join(lines))

  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  x = np.arange(len(collected))
  for r in row_names:
    if r == "reference":
      continue
    means = [p["rows"].get(r, {}).get("mean", np.nan) for p in collected]
    stds = [p["rows"].get(r, {}).get("std", np.nan) for p in collected]
    ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=ROW_LABELS[r])
  ax.axhline(0.1, color="gray", ls="--", lw=1, label="chance")
  ax.set_xticks(x, [p["label"] for p in collected])
  ax.set_xlabel(value_name or name)
  ax.set_ylabel("MNIST test accuracy")
  ax.set_ylim(0, 1)
  ax.set_title(f"Sweep: {name}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  files.write_atomic(workdir / "sweep.png", lambda tmp: fig.savefig(tmp, dpi=120))
  plt.close(fig)
  return workdir / "sweep.md"
