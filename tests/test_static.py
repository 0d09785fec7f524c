"""The project's own checks: ruff, mypy and the import-linter contract are clean, and every
third-party distribution the code imports is declared, so CI enforces them."""

from __future__ import annotations

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def test_ruff_is_clean() -> None:
    result = _run_module("ruff", "check", "exporter", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = _run_module("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_are_kept() -> None:
    """The layers contract of pyproject.toml ([tool.importlinter]) holds: no stage imports
    one above it, and parsing an event loads no server, scheduler or database."""
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("lint-imports is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [lint_imports, "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def imported_distributions(*trees: str) -> dict[str, set[str]]:
    """{canonical distribution name: modules importing it} over the Python files of
    ``trees``; the standard library and the trees' own modules are left out."""
    # Importable by their bare names: the package and the modules beside the tests and
    # benchmarks (both directories are on the path of the scripts and tests they hold).
    local = {"exporter"} | {
        path.stem for tree in trees if tree != "exporter" for path in (ROOT / tree).glob("*.py")
    }
    providers = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for tree in trees:
        for path in (ROOT / tree).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.partition(".")[0]
                    if top in sys.stdlib_module_names or top in local:
                        continue
                    for distribution in providers.get(top, [top]):
                        found.setdefault(canonicalize_name(distribution), set()).add(
                            str(path.relative_to(ROOT))
                        )
    return found


def declared(*groups: str) -> set[str]:
    """Canonical names of pyproject's runtime dependencies and of the extras ``groups``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for group in groups:
        texts += project["optional-dependencies"][group]
    return {canonicalize_name(Requirement(text).name) for text in texts}


def test_every_distribution_the_package_imports_is_a_runtime_dependency() -> None:
    imported = imported_distributions("exporter")
    assert {"duckdb", "multidict", "yarl", "pydantic-core"} <= set(imported)
    undeclared = {name: files for name, files in imported.items() if name not in declared()}
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"


def test_every_distribution_the_tests_and_benchmarks_import_is_declared() -> None:
    imported = imported_distributions("tests", "bench")
    undeclared = {
        name: files for name, files in imported.items() if name not in declared("test", "dev")
    }
    assert not undeclared, f"imported but not declared for tests: {undeclared}"
