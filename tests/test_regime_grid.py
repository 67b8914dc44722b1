"""The regime grid: a 2 x 2 grid end to end on the tiny model, shared artifacts built once, the
table's structure and numbers against each cell's own records, the cross-init control of the best
cell, a rerun that builds nothing, and the grid config's errors."""

import itertools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import regime_grid as grid_config
from subliminal_jax.experiments import regime_grid

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _done_records(workdir: pathlib.Path) -> dict[str, float]:
  return {str(p.relative_to(workdir)): p.stat().st_mtime for p in workdir.glob("*/*/DONE.json")}


def test_tiny_grid_end_to_end_then_rerun_builds_nothing(tmp_path):
  # One test (not a module fixture): pytest-xdist would run a shared fixture once per worker.
  config = grid_config.get_config("tiny")
  # One student seed per arm instead of the tiny grid's two: half the students and evaluations,
  # the same stages, cells, table and cross-init control (over one seed and 4 questions each
  # cell's shift still has an interval of nonzero width; several seeds per cell are the main job's
  # tests' and the statistics tests' business).
  config.min_seeds = 1
  config.base.student.seeds = (0,)
  record = regime_grid.run(config, str(tmp_path))
  _check_cells_and_table(config, tmp_path, record)
  _check_shared_stages_built_once(config, tmp_path, record)
  _check_cross_init_of_the_best_cell(tmp_path, record)

  before = _done_records(tmp_path)
  again = regime_grid.run(config, str(tmp_path))
  assert _done_records(tmp_path) == before
  strip = lambda cells: [{k: v for k, v in c.items() if k != "seconds"} for c in cells]
  assert strip(again["cells"]) == strip(record["cells"])


def _check_cells_and_table(config, workdir, record):
  on_disk = json.loads((workdir / "grid.json").read_text())
  assert on_disk["cells"] == json.loads(json.dumps(record["cells"]))
  axes = [[level["label"] for level in axis.levels] for axis in config.axes]
  assert len(axes) == 2 and all(len(levels) == 2 for levels in axes)
  expected_names = ["__".join(labels) for labels in itertools.product(*axes)]
  assert [cell["name"] for cell in record["cells"]] == expected_names
  target = config.base.targets[0]
  for cell in record["cells"]:
    assert cell["seeds"]["treatment"] >= config.min_seeds
    assert cell["seeds"]["control"] >= config.min_seeds
    shift = cell["shift_logprob"]
    assert shift["low"] < shift["high"] and shift["num_seeds"] >= config.min_seeds
    # The grid's numbers are the cell's own records: recompute them from the raw per-question rows.
    results = json.loads((workdir / cell["report_dir"] / "results.json").read_text())
    rows = results["rows"]
    treatment = np.array([r["metrics"]["logprob"] for r in rows["treatment"]])
    control = np.array([r["metrics"]["logprob"] for r in rows["control"]])
    assert treatment.shape == (cell["seeds"]["treatment"], config.base.evaluation.num_questions)
    np.testing.assert_allclose(shift["mean"], treatment.mean() - control.mean(), rtol=1e-9, atol=1e-12)
    for row in ("treatment", "control"):
      share = np.mean([r["panel_share"][target] for r in rows[row]])
      np.testing.assert_allclose(cell["target_share"][row], share, rtol=1e-9)
      assert 0 <= share <= 1
    # The cell ran with its own knobs.
    cell_config = results["notes"]["config"]
    for key, value in cell["overrides"].items():
      node = cell_config
      for part in key.split("."):
        node = node[part]
      assert node == value, (cell["name"], key)
    assert (workdir / cell["report_dir"] / "report.md").exists()

  text = (workdir / "grid.md").read_text()
  table = regime_grid.format_grid_table(record)
  assert table in text
  lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
  assert len(lines) == len(expected_names) + (record["cross_init"]["status"] == "ran")
  for name in expected_names:
    assert any(line.startswith(f"| {name} |") for line in lines)
  png = (workdir / "grid_heatmap.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def _check_shared_stages_built_once(config, workdir, record):
  counts = {stage: len(list((workdir / stage).glob("*/DONE.json")))
            for stage in {p.parent.parent.name for p in workdir.glob("*/*/DONE.json")}}
  assert counts == record["artifacts"]
  # One set of prompts, one sampling and filter per teacher (owl's and the control's) for all
  # cells and the cross-init control (the tiny grid's teacher is system-prompted: no artifact).
  assert counts["prompts"] == 1 and counts["sampling"] == counts["filter"] == 2, counts
  assert "teacher" not in counts
  # Datasets depend on the objective only: 2 per teacher across 4 cells.
  assert counts["dataset"] == 2 * 2
  # Students differ in every cell; the cross-init control adds one more set. Base and teacher are
  # evaluated once, each student once.
  cells = len(record["cells"]) + (record["cross_init"]["status"] == "ran")
  students = 2 * cells * len(config.base.student.seeds)
  assert counts["student"] == students and counts["evaluation"] == 2 + students


def _check_cross_init_of_the_best_cell(workdir, record):
  lows = {cell["name"]: cell["shift_logprob"]["low"] for cell in record["cells"]}
  best = max(lows, key=lows.get)
  assert record["best_cell"] == {"name": best, "low": lows[best]}
  cross = record["cross_init"]
  assert cross["of"] == best
  best_cell = next(c for c in record["cells"] if c["name"] == best)
  if best_cell["overrides"].get("student.lora.rank", 4) > 0:
    assert cross["status"] == "ran", cross
    summary = cross["summary"]
    assert summary["cross_init_of"] == best and summary["overrides"]["student.cross_init"] is True
    assert summary["levels"] == best_cell["levels"]
    assert summary["seeds"] == best_cell["seeds"]
    results = json.loads((workdir / summary["report_dir"] / "results.json").read_text())
    assert results["notes"]["config"]["student"]["cross_init"] is True
    # Same data, different students: the datasets are the best cell's, the students are new.
    best_results = json.loads((workdir / best_cell["report_dir"] / "results.json").read_text())
    assert results["rows"]["treatment"] != best_results["rows"]["treatment"]
    assert f"| {best} (cross-init) |" in (workdir / "grid.md").read_text()
  else:  # a full-finetune student has no adapter init to change
    assert cross["status"] == "unsupported" and "cross_init" in cross["reason"]


# ---------------------------------------------------------------------------------------------
# Fast: config errors and the pure parts


def _cells(config):
  return regime_grid.grid_cells(regime_grid.from_config(config))


def test_grid_config_errors_name_the_bad_value():
  def config_with(axes=None, **changes):
    c = grid_config.get_config("tiny")
    if axes is not None:
      c.axes = axes
    for key, value in changes.items():
      section, _, leaf = key.rpartition(".")
      node = c
      for part in filter(None, section.split(".")):
        node = node[part]
      node[leaf] = value
    return c

  axis = grid_config.axis
  with pytest.raises(ValueError, match="'student.lerning_rate' names no key"):
    _cells(config_with(axes=(axis("lr", ("a", {"student.lerning_rate": 1e-3})),)))
  with pytest.raises(ValueError, match="no section 'studnt'"):
    _cells(config_with(axes=(axis("lr", ("a", {"studnt.epochs": 2})),)))
  with pytest.raises(ValueError, match="axes 'a' and 'b' both set 'student.epochs'"):
    _cells(config_with(axes=(axis("a", ("x", {"student.epochs": 1})),
                                             axis("b", ("y", {"student.epochs": 2})))))
  with pytest.raises(ValueError, match="cannot vary within a grid"):
    _cells(config_with(axes=(axis("m", ("x", {"model": "smollm2"})),)))
  with pytest.raises(ValueError, match="repeated level labels"):
    _cells(config_with(axes=(axis("a", ("x", {}), ("x", {})),)))
  with pytest.raises(ValueError, match="level label 'a b'"):
    _cells(config_with(axes=(axis("a", ("a b", {})),)))
  with pytest.raises(ValueError, match="heatmap.cols='nope' is not an axis"):
    _cells(config_with(**{"heatmap.cols": "nope"}))
  with pytest.raises(ValueError, match="fewer than min_seeds=3"):
    _cells(config_with(min_seeds=3))
  with pytest.raises(ValueError, match="names no cells \\['sft__lora9'\\]"):
    _cells(config_with(only="sft__lora9"))
  with pytest.raises(ValueError, match="cross_init='sometimes'"):
    _cells(config_with(cross_init="sometimes"))
  # A cell the main job would refuse fails before any work, naming the cell.
  with pytest.raises(ValueError, match="cell sft__lora4: student.lora.init='teacher' needs a LoRA"):
    _cells(config_with(**{"base.student.lora.init": "teacher"}))

  config = config_with(only="logit_kl__full, sft__lora4")
  cells = _cells(config)
  assert [c.name for c in cells] == ["sft__lora4", "logit_kl__full"]
  assert cells[1].config.student.lora.rank == 0 and cells[1].config.student.objective == "logit_kl"
  assert cells[1].config.report_dir == "cells/logit_kl__full"
  assert config.base.student.lora.rank == 4 and config.base.report_dir == ""  # base not mutated


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_cpu_and_gpu_variants_are_valid_grids_with_at_least_three_seeds(variant):
  config = grid_config.get_config(variant)
  cells = _cells(config)
  assert config.min_seeds >= 3 and len(cells) >= 4
  for cell in cells:
    assert len(cell.config.student.seeds) >= 3
  assert len({json.dumps(c.config.student.to_dict(), sort_keys=True) for c in cells}) == len(cells)


def _estimate(mean, low, high):
  return {"mean": mean, "low": low, "high": high, "confidence": 0.95, "num_seeds": 3,
          "num_questions": 4, "method": "test"}


def test_best_cell_is_the_largest_lower_bound_and_ignores_cross_init_rows():
  cells = [{"name": "a", "shift_logprob": _estimate(0.5, -0.1, 1.1), "cross_init_of": None},
           {"name": "b", "shift_logprob": _estimate(0.2, 0.05, 0.35), "cross_init_of": None},
           {"name": "b__cross_init", "shift_logprob": _estimate(0.9, 0.8, 1.0), "cross_init_of": "b"}]
  assert regime_grid.best_cell(cells)["name"] == "b"
  assert regime_grid.best_cell([cells[2]]) is None


def test_heatmap_and_table_with_three_axes_and_a_missing_cell(tmp_path):
  axes = [{"name": "x", "levels": [{"label": "x0", "set": {}}, {"label": "x1", "set": {}}]},
          {"name": "y", "levels": [{"label": "y0", "set": {}}, {"label": "y1", "set": {}},
                                   {"label": "y2", "set": {}}]},
          {"name": "z", "levels": [{"label": "z0", "set": {}}, {"label": "z1", "set": {}}]}]
  cells = []
  for i, (x, y, z) in enumerate(itertools.product(["x0", "x1"], ["y0", "y1", "y2"], ["z0", "z1"])):
    if (x, y, z) == ("x1", "y2", "z1"):
      continue  # left out by `only`
    mean = (i - 5) / 10
    cells.append({"name": f"{x}__{y}__{z}", "levels": {"x": x, "y": y, "z": z}, "overrides": {},
                  "cross_init_of": None, "report_dir": f"cells/{x}__{y}__{z}",
                  "seeds": {"treatment": 3, "control": 3}, "student_seeds": [0, 1, 2],
                  "shift_logprob": _estimate(mean, mean - 0.1, mean + 0.1),
                  "shift_panel_share": None, "target_share": {"treatment": 0.1, "control": 0.2},
                  "seconds": 1.0})
  record = {"variant": "test", "target": "owl", "category": "animal", "panel": ["owl", "cat"],
            "confidence": 0.95, "axes": axes, "heatmap": {"rows": "y", "cols": "x"}, "cells": cells,
            "best_cell": {"name": cells[-1]["name"], "low": 0.5},
            "cross_init": {"status": "unsupported", "of": cells[-1]["name"], "reason": "full"},
            "artifacts": {"prompts": 1}}
  table = regime_grid.write_grid(record, tmp_path)
  assert table.count("\n") == len(cells) + 1
  assert "| x0__y0__z0 | x0 | y0 | z0 | 3/3 | -0.500 [-0.600, -0.400] | 0.100 | 0.200 | - |" in table
  assert json.loads((tmp_path / "grid.json").read_text())["cells"] == cells
  assert "Cross-init control: unsupported (full)." in (tmp_path / "grid.md").read_text()
  assert (tmp_path / "grid_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_command_line_rejects_an_unknown_cell_before_any_work(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "subliminal_jax.main", "--config=configs/regime_grid.py:tiny",
       f"--workdir={tmp_path}", "--config.only=sft__lora9", "--config.base.student.epochs=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert result.returncode != 0
  assert "names no cells ['sft__lora9']" in result.stderr
  assert not any(tmp_path.iterdir())


def test_config_files_load_a_neighbour_by_path_and_name_a_missing_one(tmp_path):
  from subliminal_jax import config_files
  (tmp_path / "base.py").write_text("def get_config(v='x'):\n  return {'variant': v}\n")
  assert config_files.load_neighbour(str(tmp_path / "grid.py"), "base.py").get_config("y") == {"variant": "y"}
  with pytest.raises(FileNotFoundError, match=r"config file .*missing\.py not found \(loaded by .*grid\.py\)"):
    config_files.load_neighbour(str(tmp_path / "grid.py"), "missing.py")
