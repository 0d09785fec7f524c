"""A facilitator process killed with ``kill -9`` mid-run, while the exporter is down, and
restarted on its spool: every payment whose hooks returned reaches the exporter, once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _exporter_process import http_request
from conftest import free_port
from hooks_helpers import start_on

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("hooks_facilitator.py")


def test_every_payment_whose_hooks_returned_survives_kill_9(tmp_path: Path) -> None:
    spool, port = tmp_path / "spool", free_port()
    data, log_path = tmp_path / "data", tmp_path / "exporter.log"
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parent))
    exporter = start_on(port, data, log_path)
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), "run", exporter.url, str(spool), "200"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert child.stdin is not None and child.stdout is not None
    done: list[str] = []

    def next_payment() -> None:
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()

    try:
        while len(done) < 20:
            next_payment()
            line = child.stdout.readline().decode()
            assert line, "the facilitator process ended early"
            done.append(line)
            if len(done) == 8:
                exporter.terminate()  # from here on, answers wait in the spool
        next_payment()  # killed mid-run: this payment may be under way
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        exporter.kill()
    done += [line.decode() for line in child.stdout.readlines()]
    child.stdout.close()
    child.stdin.close()
    assert len(done) < 200 and all(line.endswith("success\n") for line in done)
    exporter = start_on(port, data, log_path)
    try:
        drained = subprocess.run(
            [sys.executable, str(SCRIPT), "drain", exporter.url, str(spool)],
            capture_output=True,
            env=env,
            timeout=120,
            check=True,
        )
        flushed, delivered = drained.stdout.decode().split()[1::2]
        assert flushed == "True"
        assert int(delivered) >= 3 * (len(done) - 8)  # what the dead process had spooled
        exporter.wait_caught_up()
        at = int(time.time() * 1000)
        status, body = http_request(f"{exporter.url}/v1/analytics/payments?window=1h&at={at}")
        assert status == 200
        totals = json.loads(body)
        # the payment under way when the process died may have ended its hooks unreported
        assert len(done) <= totals["successfulPayments"] <= len(done) + 1
        assert totals["failedPayments"] == 0
        assert sum(exporter.metric("exporter_events_rejected_total").values()) == 0
    finally:
        exporter.kill()
