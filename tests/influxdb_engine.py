"""A real InfluxDB engine for tests: Debian's ``influxd`` (1.x) on a loopback port.

:class:`InfluxEngine` writes a configuration whose data, meta and WAL directories live in
a directory of the test's own, starts ``influxd -config FILE`` in the foreground, and waits
until ``/ping`` answers. It can be killed with SIGKILL and started again on the same
directories (what a crash of the database looks like to the exporter). Queries go through
the v1 ``/query`` endpoint in InfluxQL.

Where ``influxd`` is missing the fixture skips with the way to install it; in CI (CI=true)
a skip fails the run (see ``conftest.py``), and ``.ci/run`` installs the package.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from conftest import free_port

INFLUXD = "influxd"
SKIP_REASON = "influxd is not installed (Debian: apt-get install influxdb)"

_CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"
  logging-enabled = false

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  wal-fsync-delay = "0s"
  query-log-enabled = false
  trace-logging-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[retention]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = {auth}
  log-enabled = false
  suppress-write-log = true
  max-body-size = 0
  pprof-enabled = false
"""


def influxd_path() -> str | None:
    """The ``influxd`` binary, or None where it is not installed."""
    return shutil.which(INFLUXD)


class InfluxEngine:
    """One ``influxd`` process over a directory that outlives its restarts."""

    def __init__(self, root: Path, *, auth: bool = False) -> None:
        binary = influxd_path()
        if binary is None:
            raise RuntimeError(SKIP_REASON)
        self.binary = binary
        self.root = root
        self.auth = auth
        self.http_port = free_port()
        self.rpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = root / "influxdb.conf"
        self.log = root / "influxd.log"
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            _CONFIG.format(
                root=root,
                http_port=self.http_port,
                rpc_port=self.rpc_port,
                auth="true" if auth else "false",
            )
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start ``influxd`` and wait until it answers ``/ping``."""
        assert self.process is None or self.process.poll() is not None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"influxd exited at start:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as answer:
                    if answer.status == 204:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"influxd did not answer /ping within {timeout} s")

    def kill(self) -> None:
        """SIGKILL the engine (no flush, no clean shutdown) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop the engine cleanly (SIGTERM), killing it if it lingers."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def query(self, influxql: str, database: str | None = None, **auth: str) -> list[Any]:
        """Run InfluxQL; the ``series`` of each statement's result (raises on an error)."""
        params = {"q": influxql, "epoch": "ns"}
        if database is not None:
            params["db"] = database
        data = urllib.parse.urlencode(params).encode()
        # InfluxDB 1.x reads the credentials ``u`` and ``p`` from the URL, not a form body.
        where = f"{self.url}/query" + (f"?{urllib.parse.urlencode(auth)}" if auth else "")
        request = urllib.request.Request(where, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = json.loads(answer.read())
        results = body.get("results", [])
        for result in results:
            if "error" in result:
                raise RuntimeError(f"InfluxQL error: {result['error']} ({influxql})")
        return [result.get("series", []) for result in results]

    def write(self, database: str, lines: bytes, precision: str = "ns") -> int:
        """POST line protocol to the v1 ``/write`` endpoint; the HTTP status."""
        url = f"{self.url}/write?" + urllib.parse.urlencode(
            {"db": database, "precision": precision}
        )
        request = urllib.request.Request(url, data=lines, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def count(self, database: str, measurement: str, field: str, where: str = "") -> int:
        """``SELECT count(field)`` over all time (0 when there are no points)."""
        clause = f" WHERE {where}" if where else ""
        (series,) = self.query(f'SELECT count("{field}") FROM "{measurement}"{clause}', database)
        return int(series[0]["values"][0][1]) if series else 0
