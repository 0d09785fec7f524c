"""Type-check Flux queries with the official Flux compiler front end, without a server.

The checker is ``tests/flux/check.mjs``: npm ``@influxdata/flux-lsp-browser`` (the Flux parser
and semantic analyser compiled to WASM) under Node, one Node process per :func:`check_flux`
call however many queries it checks. Install it with ``npm ci --prefix tests/flux``. Without
Node or the package the calling test is skipped, and fails under CI.

Queries are checked as the server will see them: the exporter passes values through
influxdb-client's query ``params`` (a ``datetime`` arrives as a Flux time, a ``timedelta`` as a
duration, ``str``/``int``/``float``/``bool`` as themselves), Grafana defines the ``v`` record.
A preamble declaring those records with representative typed values is inserted after the
query's imports; reported line numbers are the query's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import pytest
from conftest import in_ci

FLUX_DIR = Path(__file__).resolve().parent / "flux"
"""The Node project holding the checker and the pinned npm package."""

CHECKER = FLUX_DIR / "check.mjs"
PACKAGE_DIR = FLUX_DIR / "node_modules" / "@influxdata" / "flux-lsp-browser"
INSTALL_HINT = (
    "install Node.js >= 18.19 (Debian: apt-get install nodejs npm), "
    "then run `npm ci --prefix tests/flux`"
)
TIMEOUT_S = 120.0
"""Upper bound for one checker run; ~30 queries take well under a second."""

PARAMS_PREAMBLE = """\
params = {
    start: 2026-01-01T00:00:00Z,
    stop: 2026-01-02T00:00:00Z,
    bucket: "payments",
    network: "eip155:8453",
    every: 1h,
    limit: 10,
}"""
"""The ``params`` record the exporter passes through influxdb-client (extend when a query needs
another parameter, with a value of the type the exporter will pass)."""

GRAFANA_PREAMBLE = """\
v = {
    timeRangeStart: 2026-01-01T00:00:00Z,
    timeRangeStop: 2026-01-02T00:00:00Z,
    windowPeriod: 10s,
    defaultBucket: "payments",
    organization: "org",
}"""
"""Grafana's ``v`` record, as its InfluxDB data source defines it for Flux panels."""


def _unavailable(problem: str) -> NoReturn:
    """Skip the calling test, or fail it under CI, because the checker cannot run."""
    message = f"Flux checker unavailable: {problem}; {INSTALL_HINT}"
    if in_ci():
        pytest.fail(f"{message} (CI must run this test)")
    pytest.skip(message)


def _node() -> str:
    """The node executable, with the pinned package installed; skip/fail otherwise."""
    node = shutil.which("node")
    if node is None:
        _unavailable("node is not on PATH")
    lock = json.loads((FLUX_DIR / "package-lock.json").read_text(encoding="utf-8"))
    wanted = lock["packages"]["node_modules/@influxdata/flux-lsp-browser"]["version"]
    manifest = PACKAGE_DIR / "package.json"
    if not manifest.is_file():
        _unavailable(f"@influxdata/flux-lsp-browser is not installed in {FLUX_DIR}")
    installed = json.loads(manifest.read_text(encoding="utf-8"))["version"]
    if installed != wanted:
        _unavailable(f"@influxdata/flux-lsp-browser {installed} installed, the lock pins {wanted}")
    return node


def check_flux(queries: Mapping[str, str], preamble: str = PARAMS_PREAMBLE) -> dict[str, list[str]]:
    """Errors of each query (name -> messages, empty when valid), in one Node run."""
    if not queries:
        return {}
    node = _node()
    request = [{"name": n, "source": src, "preamble": preamble} for n, src in queries.items()]
    proc = subprocess.run(
        [node, str(CHECKER)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{CHECKER.name} exited with {proc.returncode}: {proc.stderr.strip()}")
    results = json.loads(proc.stdout)
    errors = {str(r["name"]): [str(e) for e in r["errors"]] for r in results}
    if errors.keys() != queries.keys():
        raise RuntimeError(f"{CHECKER.name} answered for {sorted(errors)}, asked {sorted(queries)}")
    return errors


def assert_flux_valid(queries: Mapping[str, str], preamble: str = PARAMS_PREAMBLE) -> None:
    """Fail with every error of every invalid query, if any query is invalid."""
    invalid = {name: errs for name, errs in check_flux(queries, preamble).items() if errs}
    if invalid:
        report = "\n".join(f"{name}:\n  " + "\n  ".join(errs) for name, errs in invalid.items())
        noun = "query" if len(invalid) == 1 else "queries"
        raise AssertionError(f"{len(invalid)} invalid Flux {noun}:\n{report}")


def collect_flux(directory: Path) -> dict[str, str]:
    """Every ``*.flux`` file under ``directory``, keyed by its path relative to it."""
    return {
        path.relative_to(directory).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(directory.rglob("*.flux"))
        if path.is_file()
    }
