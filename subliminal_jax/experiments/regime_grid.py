"""A grid of regimes of the trait-through-numbers experiment, with a control for every cell.

  python -m subliminal_jax.main --config=configs/regime_grid.py:cpu --workdir=workdir/grid_cpu

Each cell is a set of overrides of one base ``animal_numbers`` config (``config.base``), one level of
every axis of ``config.axes``; running a cell is running :func:`animal_numbers.run` on its config,
which trains treatment students (the trait teacher's numbers) and control students (the same
knobs, the control teacher's numbers) for every seed. All cells run in ONE workdir: the
fingerprinted stages that two cells have in common (teachers, prompts, samples, filters, datasets,
the base's and teacher's evaluations) are built once and skipped afterwards, and each cell's
report goes to ``cells/<cell>/``. The cell with the largest lower CI bound of the treatment -
control shift of log P(target) is then rerun with ``student.cross_init`` (students whose init is not
the teacher's) on the same data: the cross-init control, reported beside it.

Outputs in the workdir: grid.json (every cell's knobs, seeds, shifts with CIs, target shares, wall
time; the cross-init control; artifact counts per stage), grid.md (the table, printed at the end)
and grid_heatmap.png (two axes as rows and columns, colour = shift, each cell annotated with its CI).

:func:`from_config` reads the grid's own settings once (:class:`GridSettings`, every check in the
dataclass that holds the value); the cells' configs stay ConfigDicts, each run by
:func:`animal_numbers.run`, which checks its config.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import pathlib
import re
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from subliminal_jax import config_files, files
from subliminal_jax.experiments import animal_numbers

CROSS_INIT_RUNS = ("always", "if_positive", "never")
CELLS_DIR = "cells"
CROSS_INIT_SUFFIX = "__cross_init"
LEVEL_SEPARATOR = "__"
# Names become directory names and markdown cells: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Keys a cell may not change: they fix the workdir's identity or the grid's own layout.
_FIXED_KEYS = ("experiment", "model", "report_dir", "targets")


@dataclasses.dataclass
class Cell:
  """One regime: the full animal_numbers config of a combination of axis levels."""
  name: str
  levels: dict[str, str]  # axis name -> level label
  overrides: dict[str, Any]  # dotted key -> value, all levels merged
  config: ConfigDict
  cross_init_of: str | None = None  # the cell whose cross-init control this is


# ---------------------------------------------------------------------------------------------
# The grid's settings


def _check_name(name: str, what: str) -> None:
  if not isinstance(name, str) or not _NAME.match(name) or LEVEL_SEPARATOR in name:
    raise ValueError(f"{what} {name!r} must be letters, digits, '_', '.', '+' or '-' (no "
                     f"{LEVEL_SEPARATOR!r}), starting with a letter or digit")


@dataclasses.dataclass(frozen=True)
class Level:
  label: str
  set: Mapping[str, Any]  # dotted key of the base config -> value


@dataclasses.dataclass(frozen=True)
class Axis:
  name: str
  levels: tuple[Level, ...]

  def __post_init__(self):
    _check_name(self.name, "axis name")
    if not self.levels:
      raise ValueError(f"axis {self.name!r} has no levels")
    for level in self.levels:
      _check_name(level.label, f"axis {self.name!r}: level label")
      fixed = [k for k in level.set if k.split(".")[0] in _FIXED_KEYS]
      if fixed:
        raise ValueError(f"axis {self.name!r}, level {level.label!r}: {fixed} cannot vary within a "
                         f"grid ({', '.join(_FIXED_KEYS)} are shared by all cells; change them in "
                         "config.base)")
    labels = [level.label for level in self.levels]
    if len(set(labels)) != len(labels):
      raise ValueError(f"axis {self.name!r} has repeated level labels {labels}")

  @classmethod
  def read(cls, axis: Mapping[str, Any]) -> "Axis":
    """From a config axis ``{name, levels: ({label, set}, ...)}``."""
    levels = []
    for level in axis["levels"]:
      if set(level) != {"label", "set"} or not isinstance(level["set"], Mapping):
        raise ValueError(f"axis {axis['name']!r}: level {level!r} must be {{'label': str, 'set': "
                         "{dotted key: value}}")
      levels.append(Level(level["label"], dict(level["set"])))
    return cls(axis["name"], tuple(levels))


@dataclasses.dataclass(frozen=True)
class Heatmap:
  """Two axis names ("" = the first and the second axis), checked against the axes by the grid."""
  rows: str
  cols: str


def _cell_name(levels: Sequence[Level]) -> str:
  return LEVEL_SEPARATOR.join(level.label for level in levels)


@dataclasses.dataclass(frozen=True)
class GridSettings:
  """The grid's own settings; ``base`` is the cells' animal_numbers config (a copy, never changed:
  each cell's config is a copy with its overrides)."""

  variant: str
  axes: tuple[Axis, ...]
  heatmap: Heatmap
  cross_init: str  # the cross-init control of the best cell: always, if_positive or never
  min_seeds: int  # every cell must train at least this many seeds per group
  only: str  # comma-separated cell names to run ("" = every cell)
  base: ConfigDict

  def __post_init__(self):
    if not self.axes:
      raise ValueError("config.axes is empty: give at least one axis {name, levels}")
    names = [a.name for a in self.axes]
    if len(set(names)) != len(names):
      raise ValueError(f"repeated axis names {names}")
    for role in ("rows", "cols"):
      chosen = getattr(self.heatmap, role)
      if chosen and chosen not in names:
        raise ValueError(f"heatmap.{role}={chosen!r} is not an axis; axes: {names}")
    rows, cols = self.heatmap_axes
    if rows == cols:
      raise ValueError(f"heatmap.rows and heatmap.cols are both {rows!r}")
    if self.cross_init not in CROSS_INIT_RUNS:
      raise ValueError(f"cross_init={self.cross_init!r}; expected one of {CROSS_INIT_RUNS}")
    if self.min_seeds < 1:
      raise ValueError(f"min_seeds={self.min_seeds} must be >= 1")
    if len(self.base.targets) != 1:
      raise ValueError(f"base.targets={tuple(self.base.targets)}: a grid summarises one target; "
                       "run one grid per target")
    known = [_cell_name(levels) for levels in self.level_combinations()]
    unknown = [n for n in self.only_cells if n not in known]
    if unknown:
      raise ValueError(f"only={self.only!r} names no cells {unknown}; cells: {known}")

  @property
  def heatmap_axes(self) -> tuple[str, str]:
    """(rows, cols) of the heatmap: the chosen axes, by default the first two ("" = none)."""
    names = [a.name for a in self.axes]
    rows = self.heatmap.rows or names[0]
    cols = self.heatmap.cols or next((n for n in names if n != rows), "")
    return rows, cols

  @property
  def only_cells(self) -> tuple[str, ...]:
    return tuple(n.strip() for n in self.only.split(",") if n.strip())

  def level_combinations(self) -> list[tuple[Level, ...]]:
    """Every cell's levels, one per axis: the product of the axes."""
    return list(itertools.product(*(axis.levels for axis in self.axes)))


def from_config(config: ConfigDict) -> GridSettings:
  """The grid's settings from its config, checked (the cells' configs: :func:`grid_cells`)."""
  return GridSettings(
      variant=config.variant, axes=tuple(Axis.read(axis) for axis in config.axes),
      heatmap=Heatmap(config.heatmap.rows, config.heatmap.cols), cross_init=config.cross_init,
      min_seeds=config.min_seeds, only=config.only, base=copy.deepcopy(config.base))


# ---------------------------------------------------------------------------------------------
# Building the cells


def grid_cells(grid: GridSettings) -> list[Cell]:
  """Every cell of the product of the axes (restricted to ``grid.only``), validated."""
  cells = []
  for levels in grid.level_combinations():
    name = _cell_name(levels)
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for axis, level in zip(grid.axes, levels):
      for key, value in level.set.items():
        if key in merged and merged[key] != value:
          raise ValueError(f"cell {name}: axes {origin[key]!r} and {axis.name!r} both set {key!r} "
                           f"({merged[key]!r} vs {value!r})")
        merged[key], origin[key] = value, axis.name
    cell_config = config_files.apply_overrides(grid.base, merged, f"cell {name}")
    cell_config.report_dir = f"{CELLS_DIR}/{name}"
    cells.append(Cell(name, {a.name: l.label for a, l in zip(grid.axes, levels)}, merged,
                      cell_config))
  if grid.only_cells:
    cells = [c for c in cells if c.name in grid.only_cells]
  for cell in cells:
    seeds = tuple(cell.config.student.seeds)
    if len(seeds) < grid.min_seeds:
      raise ValueError(f"cell {cell.name}: student.seeds={seeds} has fewer than min_seeds="
                       f"{grid.min_seeds} seeds")
    try:
      animal_numbers.validate(cell.config, None)
    except ValueError as e:
      raise ValueError(f"cell {cell.name}: {e}") from e
  return cells


def cross_init_cell(cell: Cell) -> Cell:
  """The same recipe and data with ``student.cross_init`` (raises ValueError where undefined)."""
  config = config_files.apply_overrides(cell.config, {"student.cross_init": True},
                                        f"cross-init of {cell.name}")
  config.report_dir = f"{CELLS_DIR}/{cell.name}{CROSS_INIT_SUFFIX}"
  animal_numbers.validate(config, None)
  return Cell(cell.name + CROSS_INIT_SUFFIX, dict(cell.levels),
              {**cell.overrides, "student.cross_init": True}, config, cross_init_of=cell.name)


# ---------------------------------------------------------------------------------------------
# Summaries


def summarize_cell(cell: Cell, results: Mapping[str, Any], seconds: float) -> dict[str, Any]:
  """The grid's view of one cell's results.json: shift of log P(target), target shares, seeds."""
  target = results["target"]
  estimates = results["estimates"]
  difference = estimates["treatment_minus_control"]
  if "logprob" not in difference:
    raise ValueError(f"cell {cell.name}: its results have no treatment - control logprob estimate")
  panel = estimates.get("panel_share_mean", {})
  shift_vs_base = estimates.get("shift_vs_base", {})
  return {
      "name": cell.name, "levels": cell.levels, "overrides": cell.overrides,
      "cross_init_of": cell.cross_init_of, "report_dir": cell.config.report_dir,
      "seeds": {row: len(results["rows"][row]) for row in ("treatment", "control")},
      "student_seeds": list(cell.config.student.seeds),
      "shift_logprob": difference["logprob"],
      "shift_panel_share": difference.get("panel_share"),
      "target_share": {row: shares[target] for row, shares in panel.items() if target in shares},
      "logprob": {row: e["logprob"] for row, e in estimates["table"].items() if "logprob" in e},
      "logprob_vs_base": {row: e["logprob"] for row, e in shift_vs_base.items() if "logprob" in e},
      "seconds": round(seconds, 1)}


def best_cell(summaries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The grid cell (not a cross-init control) with the largest lower CI bound of the shift."""
  candidates = [s for s in summaries if not s.get("cross_init_of")]
  if not candidates:
    return None
  return max(candidates, key=lambda s: s["shift_logprob"]["low"])


def artifact_counts(workdir: pathlib.Path) -> dict[str, int]:
  """How many artifacts each stage holds: shared stages are built once for the whole grid."""
  counts: dict[str, int] = {}
  for done in workdir.glob("*/*/DONE.json"):
    stage = done.parent.parent.name
    counts[stage] = counts.get(stage, 0) + 1
  return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# Output: grid.json, grid.md, grid_heatmap.png


def _number(x: float | None) -> str:
  if x is None or not math.isfinite(x):
    return "-" if x is None else str(x)
  if x == 0 or abs(x) >= 0.01:
    return f"{x:.3f}"
  return f"{x:.2e}"


def _estimate(e: Mapping[str, Any] | None) -> str:
  if not e:
    return "-"
  return f"{_number(e['mean'])} [{_number(e['low'])}, {_number(e['high'])}]"


def format_grid_table(record: Mapping[str, Any]) -> str:
  """The markdown table: one line per cell (then the cross-init control), knobs as columns."""
  axes = [a["name"] for a in record["axes"]]
  target = record["target"]
  header = (["cell"] + axes + ["seeds T/C", f"shift log P({target}) [95% CI]",
                               f"{target} share T", f"{target} share C", "shift share [95% CI]"])
  lines = []
  rows = list(record["cells"])
  if record["cross_init"].get("summary"):
    rows.append(record["cross_init"]["summary"])
  for s in rows:
    name = s["name"] if not s["cross_init_of"] else f"{s['cross_init_of']} (cross-init)"
    shares = s["target_share"]
    lines.append([name] + [s["levels"][a] for a in axes] + [
        f"{s['seeds']['treatment']}/{s['seeds']['control']}", _estimate(s["shift_logprob"]),
        _number(shares.get("treatment")), _number(shares.get("control")),
        _estimate(s["shift_panel_share"])])
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(line) + " |" for line in lines]
  return "\n".join(out)


def _markdown(record: Mapping[str, Any], table: str) -> str:
  target, cross = record["target"], record["cross_init"]
  md = [f"# Regime grid: {target} ({record['category']}), variant {record['variant']}", "",
        "Each cell trains treatment students on the trait teacher's numbers and control students with "
        "the same knobs on the control teacher's numbers. Shift = treatment - control, mean over "
        f"seeds and questions, with a {int(record['confidence'] * 100)}% bootstrap CI (seeds and "
        f"questions resampled). `log P({target})`: the exact log-probability that the answer's first "
        f"word is {target}; share: {target}'s exact share of the {record['category']} panel "
        f"{list(record['panel'])}.", "", table, ""]
  best = record["best_cell"]
  if best:
    md.append(f"Best cell (largest lower CI bound of the shift): **{best['name']}**, lower bound "
              f"{_number(best['low'])} ({'above' if best['low'] > 0 else 'not above'} zero).")
  md.append(f"Cross-init control: {cross['status']}"
            + (f" ({cross['reason']})" if cross.get("reason") else "") + ".")
  md += ["", "![shift heatmap](grid_heatmap.png)", "", "## Cells", ""]
  for s in record["cells"] + ([cross["summary"]] if cross.get("summary") else []):
    # Sorted: grid.json is written with sorted keys, and a report regenerated from it must match.
    knobs = ", ".join(f"`{k}={v!r}`" for k, v in sorted(s["overrides"].items())) or "(the base config)"
    md.append(f"- {s['name']}: {knobs}; seeds {s['student_seeds']}; "
              f"[report]({s['report_dir']}/report.md); {s['seconds']} s")
  md += ["", "## Artifacts per stage (shared stages are built once)", "",
         ", ".join(f"{k}: {v}" for k, v in sorted(record["artifacts"].items())), ""]
  return "\n".join(md)


def plot_heatmap(record: Mapping[str, Any], path: pathlib.Path) -> None:
  """Rows x columns of two axes (one panel per level combination of any others), colour = shift."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  axes = {a["name"]: [level["label"] for level in a["levels"]] for a in record["axes"]}
  row_axis, col_axis = record["heatmap"]["rows"], record["heatmap"]["cols"]
  row_labels = axes[row_axis] if row_axis else [""]
  col_labels = axes[col_axis] if col_axis else [""]
  others = [a for a in axes if a not in (row_axis, col_axis)]
  facets = list(itertools.product(*(axes[a] for a in others)))
  by_levels = {tuple(sorted(s["levels"].items())): s for s in record["cells"]}
  means = [s["shift_logprob"]["mean"] for s in record["cells"]]
  limit = max([abs(m) for m in means if math.isfinite(m)] + [1e-9])

  fig, panels = plt.subplots(1, len(facets), squeeze=False, layout="constrained",
                             figsize=(2.0 + 2.3 * len(col_labels) * len(facets),
                                      1.6 + 1.0 * len(row_labels)))
  image = None
  for panel, facet in zip(panels[0], facets):
    grid = np.full((len(row_labels), len(col_labels)), np.nan)
    notes = [["no cell"] * len(col_labels) for _ in row_labels]
    for i, r in enumerate(row_labels):
      for j, c in enumerate(col_labels):
        levels = dict(zip(others, facet))
        if row_axis:
          levels[row_axis] = r
        if col_axis:
          levels[col_axis] = c
        s = by_levels.get(tuple(sorted(levels.items())))
        if s:
          e = s["shift_logprob"]
          grid[i, j] = e["mean"]
          star = " *" if e["low"] > 0 else ""
          notes[i][j] = (f"{e['mean']:+.3f}{star}\n[{e['low']:+.3f}, {e['high']:+.3f}]\n"
                         f"n={s['seeds']['treatment']}/{s['seeds']['control']}")
    image = panel.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(len(row_labels)):
      for j in range(len(col_labels)):
        dark = math.isfinite(grid[i, j]) and abs(grid[i, j]) > 0.6 * limit
        panel.text(j, i, notes[i][j], ha="center", va="center", fontsize=7,
                   color="white" if dark else "black")
    panel.set_xticks(range(len(col_labels)), col_labels)
    panel.set_yticks(range(len(row_labels)), row_labels)
    panel.set_xlabel(col_axis)
    panel.set_ylabel(row_axis)
    if others:
      panel.set_title(", ".join(f"{a}={v}" for a, v in zip(others, facet)), fontsize=8)
  fig.colorbar(image, ax=panels[0].tolist(),
               label=f"treatment - control, log P({record['target']})")
  title = f"Regime grid ({record['variant']}): shift [95% CI], * = CI above 0"
  cross = record["cross_init"].get("summary")
  if cross:
    e = cross["shift_logprob"]
    title += (f"\ncross-init control of {cross['cross_init_of']}: {e['mean']:+.3f} "
              f"[{e['low']:+.3f}, {e['high']:+.3f}]")
  fig.suptitle(title, fontsize=9)
  files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, metadata={"Software": None}))
  plt.close(fig)


def write_grid(record: Mapping[str, Any], out_dir: pathlib.Path) -> str:
  """Writes grid.json, grid.md and grid_heatmap.png; returns the table."""
  table = format_grid_table(record)
  out_dir.mkdir(parents=True, exist_ok=True)
  files.write_json(out_dir / "grid.json", record, indent=1, sort_keys=True, default=str)
  files.write_text_atomic(out_dir / "grid.md", _markdown(record, table) + "\n")
  plot_heatmap(record, out_dir / "grid_heatmap.png")
  return table


# ---------------------------------------------------------------------------------------------
# The run


def _run_cell(cell: Cell, workdir: str, stages: Sequence[str] | None) -> dict[str, Any]:
  start = time.time()
  results_by_target = animal_numbers.run(cell.config, workdir, stages=stages)
  (results,) = results_by_target.values()
  return summarize_cell(cell, results, time.time() - start)


def run(config: ConfigDict, workdir: str, stages: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs every cell (then the cross-init control of the best) in ``workdir``; returns grid.json's
  record."""
  grid = from_config(config)
  cells = grid_cells(grid)  # every cell validated before any work
  if stages:
    animal_numbers.validate(cells[0].config, stages)
  out = pathlib.Path(workdir)
  summaries = []
  cross: dict[str, Any] = {"status": "not run", "of": None}
  with tqdm(total=len(cells), desc="regime grid", unit="cell") as bar:
    for cell in cells:
      bar.set_postfix_str(cell.name)
      summary = _run_cell(cell, workdir, stages)
      summaries.append(summary)
      bar.update(1)
      logging.info("cell %s: shift %s in %.0f s", cell.name, _estimate(summary["shift_logprob"]),
                   summary["seconds"])

    best = best_cell(summaries)
    cross["of"] = best["name"]
    if grid.cross_init == "never":
      cross["reason"] = "cross_init='never'"
    elif grid.cross_init == "if_positive" and best["shift_logprob"]["low"] <= 0:
      cross["reason"] = (f"no cell's lower CI bound is above zero (best {best['name']}: "
                         f"{_number(best['shift_logprob']['low'])})")
    else:
      source = next(c for c in cells if c.name == best["name"])
      try:
        control = cross_init_cell(source)
      except ValueError as e:
        cross.update(status="unsupported", reason=str(e))
      else:
        bar.total += 1
        bar.set_postfix_str(control.name)
        logging.info("cross-init control of the best cell %s", source.name)
        cross.update(status="ran", summary=_run_cell(control, workdir, stages))
        bar.update(1)

  base = grid.base
  record = {
      "experiment": "regime_grid", "variant": grid.variant, "target": base.targets[0],
      "category": base.category, "panel": list(base.evaluation.panel),
      "confidence": summaries[0]["shift_logprob"].get("confidence", 0.95),
      "min_seeds": grid.min_seeds,
      "axes": [{"name": a.name, "levels": [dataclasses.asdict(level) for level in a.levels]}
               for a in grid.axes],
      "heatmap": dict(zip(("rows", "cols"), grid.heatmap_axes)),
      "cells": summaries,
      "best_cell": {"name": best["name"], "low": best["shift_logprob"]["low"]} if best else None,
      "cross_init": cross,
      "artifacts": artifact_counts(out),
      "base_config": base.to_dict()}
  if jax.process_index() == 0:
    table = write_grid(record, out)
    print(table)
  return record
