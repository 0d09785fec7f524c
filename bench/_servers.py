"""Server subprocesses for the benchmarks: start on a free loopback port, wait for
``/healthz``, read peak memory, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
START_DEADLINE_S = 60.0
STOP_DEADLINE_S = 20.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def write(text: str) -> None:
    """One line of benchmark output on stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def clean_env() -> dict[str, str]:
    """This environment without ``EXPORTER_*`` settings, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class Server:
    """A server subprocess and where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    log_file: IO[bytes]

    def peak_rss_mib(self) -> float | None:
        """VmHWM of the process (peak resident set) in MiB, None once it is gone."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return None

    def rss_mib(self) -> float | None:
        """VmRSS of the process (resident set now) in MiB, None once it is gone."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the process has used so far, None once it is gone.

        CPU per event varies less than throughput on a shared machine: it does not
        count the time the server waited for a core.
        """
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's combined stdout/stderr."""
        self.log_file.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_DEADLINE_S)
        self.log_file.close()


def exporter_serve(port: int, *options: str) -> list[str]:
    """The argv of ``facilitator-exporter serve`` on loopback ``port`` with ``options``."""
    return [sys.executable, "-m", "exporter", "serve", "--listen", f"127.0.0.1:{port}", *options]


def get_json(url: str) -> Any:
    """``GET url`` (never through a proxy) and decode the JSON answer."""
    with _NO_PROXY.open(url, timeout=10.0) as response:
        return json.loads(response.read())


def store_backlog(ready: dict[str, Any]) -> int:
    """The largest store backlog in a ``/readyz`` document: every store in ``stores`` (one
    per sink of ``EXPORTER_STORES``), so a wait on it ends only once every store has all."""
    stores = ready.get("stores") or [ready["store"]]
    return max(int(store["backlog"]) for store in stores)


def healthy(url: str) -> bool:
    """Whether ``GET url/healthz`` answers 200 now."""
    try:
        with _NO_PROXY.open(url + "/healthz", timeout=2.0) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def start(
    name: str, argv: list[str], port: int, workdir: Path, env: dict[str, str] | None = None
) -> Server:
    """Spawn a server and poll (bounded) until ``GET /healthz`` answers 200."""
    log_path = workdir / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env if env is not None else clean_env(),
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    server = Server(name, process, f"http://127.0.0.1:{port}", log_path, log_file)
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")
        if healthy(server.url):
            return server
        time.sleep(0.1)
    tail = server.log_tail()
    server.stop()
    raise RuntimeError(f"{name} did not answer /healthz within {START_DEADLINE_S:.0f}s:\n{tail}")
