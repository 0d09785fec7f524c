"""The test suite's own shape: test modules never import each other.

A helper two test modules share lives in a helpers module under ``tests/`` (``*_helpers.py``,
``conftest.py`` and the like, never ``test_*.py``), so that running, moving or deleting one
test module never changes what another collects or runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> list[str]:
    """Names of test modules (``test_*``, bare or under a ``tests`` package) that ``source``
    imports anywhere: at the top, inside functions, ``import x`` and ``from x import y``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names = [node.module]
            if node.module == "tests":
                names += [f"tests.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # from . import test_x
            prefix = node.module or ""
            names = [f"{prefix}.{alias.name}".lstrip(".") for alias in node.names]
            names += [prefix] if prefix else []
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tests":
                parts = parts[1:]
            if parts and parts[0].startswith("test_"):
                found.append(name)
    return found


def test_no_test_module_imports_another() -> None:
    offenders = {
        path.name: imported
        for path in sorted(TESTS.glob("*.py"))
        if (imported := imported_test_modules(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, "move the shared helpers to a helpers module under tests/"


def test_the_import_check_sees_every_form_of_import() -> None:
    source = """
import test_ledger
import tests.test_events as events
from test_dashboards import unknown_metric_references
from tests.test_fuzz import strategy
from tests import test_receiver
from . import test_metrics

def later():
    from test_analytics_contract import delivered
"""
    assert imported_test_modules(source) == [
        "test_ledger",
        "tests.test_events",
        "test_dashboards",
        "tests.test_fuzz",
        "tests.test_receiver",
        "test_metrics",
        "test_analytics_contract",
    ]


def test_helpers_and_fixtures_may_be_imported() -> None:
    source = """
import conftest
from conftest import received
from ledger_helpers import prepare
from analytics_oracle import Oracle
from exporter.events import parse_event
import pytest
from tests import conftest as shared
"""
    assert imported_test_modules(source) == []
