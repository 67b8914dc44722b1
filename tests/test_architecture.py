"""The package's layering as a checked contract: ``lint-imports`` keeps the layers of
``.importlinter``, and no two modules of the package import each other (a cycle that a shared
layer of the contract would still allow)."""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "subliminal_jax"


def lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
  """``lint-imports`` (beside this interpreter: the test extra installs it) on ``root``'s package
  and ``.importlinter``; ``root`` goes first on the path, ahead of any installed copy."""
  executable = pathlib.Path(sys.executable).with_name("lint-imports")
  assert executable.exists(), f"{executable} is missing: pip install -e '.[test]'"
  return subprocess.run([str(executable), "--no-cache", "--no-logo", ".importlinter"], cwd=root,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"})


def module_imports(package_dir: pathlib.Path) -> dict[str, set[str]]:
  """Each module of the package (``a.b`` for ``a/b.py`` and ``a/b/__init__.py``) -> the package's
  modules it imports anywhere in its body (function-level imports too). An imported name that is
  not a module counts as an import of the module that defines it."""
  paths = {}
  for path in package_dir.rglob("*.py"):
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

  def defining_module(name: str) -> str | None:
    while name and name not in paths:
      name = name.rpartition(".")[0]
    return name or None

  graph = {}
  for module, path in paths.items():
    # The package a relative import starts from: the module's own if it is an __init__.
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: each dot after the first goes one package up
          base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" for alias in node.names]
      else:
        continue
      ours = [name for name in names if name.split(".")[0] == package_dir.name]
      imported |= {defining_module(name) for name in ours}
    graph[module] = imported - {module, None}
  return graph


def mutual_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
  """The pairs of modules that import each other, each pair once."""
  return sorted((a, b) for a, imported in graph.items() for b in imported
                if a < b and a in graph.get(b, ()))


def test_the_package_keeps_its_import_layers():
  done = lint_imports(ROOT)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "Contracts: 0 kept" not in done.stdout, done.stdout  # a config checking nothing passes too


def test_an_import_up_the_layers_breaks_the_contract(tmp_path):
  """The contract is not vacuous: a copy of the package where the bottom layer imports the
  experiments fails it, naming the import."""
  shutil.copytree(ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(ROOT / ".importlinter", tmp_path)
  with open(tmp_path / PACKAGE / "padding.py", "a") as f:
    f.write("\nfrom subliminal_jax.experiments import stages  # noqa\n")
  done = lint_imports(tmp_path)
  broken = "subliminal_jax.padding is not allowed to import subliminal_jax.experiments"
  assert done.returncode != 0 and broken in done.stdout, done.stdout + done.stderr


def test_no_two_modules_import_each_other():
  graph = module_imports(ROOT / PACKAGE)
  # The graph is the real one, not an empty parse: the trainer's checkpoints, and the package's
  # lazy `load` (an import inside a function).
  assert "subliminal_jax.training.checkpoint" in graph["subliminal_jax.training.trainer"]
  assert "subliminal_jax.loading" in graph["subliminal_jax"]
  assert mutual_imports(graph) == []


def test_mutual_imports_are_found_absolute_relative_and_inside_functions(tmp_path):
  package = tmp_path / "pkg"
  (package / "sub").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "sub" / "__init__.py").write_text("from . import c\n")
  (package / "a.py").write_text("def f():\n  from pkg import b\n")
  (package / "b.py").write_text("from .a import f\nimport pkg.sub.c\n")
  (package / "sub" / "c.py").write_text("from ..sub import d\nfrom pkg.sub import VALUE\n")
  (package / "sub" / "d.py").write_text("from .c import g\n")
  graph = module_imports(package)
  assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a", "pkg.sub.c"}
  assert graph["pkg.sub"] == {"pkg.sub.c"}
  assert graph["pkg.sub.c"] == {"pkg.sub.d", "pkg.sub"}
  assert mutual_imports(graph) == [("pkg.a", "pkg.b"), ("pkg.sub", "pkg.sub.c"),
                                   ("pkg.sub.c", "pkg.sub.d")]
