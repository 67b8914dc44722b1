"""Every committed report under docs/results regenerates from its results.json byte for byte, with
today's code: the numbers a report shows are the ones its results.json holds, and a change of the
reporting code that would alter a committed report shows up here."""

import json
import pathlib

import pytest

from subliminal_jax.evaluation import matrix_report
from subliminal_jax.evaluation import report as report_lib
from subliminal_jax.experiments import regime_grid

RESULTS = pathlib.Path(__file__).parent.parent / "docs" / "results"
MATRICES = sorted(p.parent for p in RESULTS.glob("*/results.json")
                  if json.loads(p.read_text()).get("experiment") == "transfer_matrix")
GRIDS = sorted(p.parent for p in RESULTS.glob("*/grid.json"))
CELLS = sorted(p.parent for p in RESULTS.glob("*/cells/*/results.json"))


def test_every_committed_result_is_covered():
  assert len(MATRICES) >= 7 and len(GRIDS) >= 3 and len(CELLS) >= 8


@pytest.mark.parametrize("directory", MATRICES, ids=lambda p: p.name)
def test_matrix_report_regenerates(directory):
  results = json.loads((directory / "results.json").read_text())
  assert matrix_report.format_report(results) + "\n" == (directory / "report.md").read_text()


@pytest.mark.parametrize("directory", GRIDS, ids=lambda p: p.name)
def test_grid_report_regenerates(directory, tmp_path):
  record = json.loads((directory / "grid.json").read_text())
  regime_grid.write_grid(record, tmp_path)
  assert (tmp_path / "grid.md").read_text() == (directory / "grid.md").read_text()


@pytest.mark.parametrize("directory", CELLS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_cell_report_regenerates(directory, tmp_path):
  results = json.loads((directory / "results.json").read_text())
  bootstrap = results["estimates"]["bootstrap"]
  report_lib.write_report(results, tmp_path, confidence=bootstrap["confidence"],
                          n_resamples=bootstrap["n_resamples"], seed=bootstrap["seed"], plots=False)
  regenerated = (tmp_path / "report.md").read_text()
  # Without plots only the image links at the end are not written (the PNGs are not compared).
  plot_links = "\n![target preference](target_preference.png)\n\n![panel](panel.png)\n"
  assert regenerated.rstrip("\n") + "\n" + plot_links == (directory / "report.md").read_text()
