"""Secrets handling: no configured secret (tokens, signing secrets) ever leaves the process.

The exporter runs as a subprocess with every secret set, debug logging, and an InfluxDB
that refuses its token (so the store's error path logs too). Then the test exercises
refused and accepted ingest, the analytics API, every open endpoint and check-config,
and searches all of it, and the whole log, for each secret.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _exporter_process import clean_env, http_request, run_cli, start_exporter
from conftest import BASE_MS, received, wait_until
from influx_fault_server import threaded_fault_server

from exporter.ingest.signing import SIGNATURE_HEADER, signature_header
from exporter.ledger import DataDirLock

INGEST_TOKEN = "ingest-token-5b1f0c9e"
INFLUX_TOKEN = "influx-token-92d4a7e3"
"""Not the fault server's token: the store's credentials are refused, and logged as such."""
SIGNING_SECRET = "signing-secret-3e8c61d0"
PREVIOUS_SIGNING_SECRET = "signing-secret-old-a47b2f19"
SECRETS = (INGEST_TOKEN, INFLUX_TOKEN, SIGNING_SECRET, PREVIOUS_SIGNING_SECRET)


def _secrets_env(influx_url: str) -> dict[str, str]:
    return {
        "EXPORTER_INGEST_TOKEN": INGEST_TOKEN,
        "EXPORTER_INFLUX_URL": influx_url,
        "EXPORTER_INFLUX_TOKEN": INFLUX_TOKEN,
        "EXPORTER_INFLUX_ORG": "test-org",
        "EXPORTER_INFLUX_TIMEOUT_SECONDS": "2",
        "EXPORTER_INGEST_SIGNING_SECRET": SIGNING_SECRET,
        "EXPORTER_INGEST_SIGNING_SECRET_PREVIOUS": PREVIOUS_SIGNING_SECRET,
        "EXPORTER_LOG_LEVEL": "debug",
    }


def _assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} shows a secret"


@pytest.mark.slow
def test_no_secret_reaches_logs_answers_metrics_or_check_config(tmp_path: Path) -> None:
    """Secrets stay out of the log (at debug level), every HTTP answer and check-config."""
    with threaded_fault_server() as (server, _):
        env = _secrets_env(server.url)
        process = start_exporter(tmp_path / "data", tmp_path / "exporter.log", env=clean_env(**env))
        try:
            body = json.dumps(received("p-1", BASE_MS)).encode()
            json_type = {"Content-Type": "application/json"}
            bearer = {**json_type, "Authorization": "Bearer " + INGEST_TOKEN}
            answers: dict[str, tuple[int, bytes]] = {
                "ingest without token": http_request(process.events_url, body, json_type),
                "ingest with a wrong token": http_request(
                    process.events_url,
                    body,
                    {**json_type, "Authorization": "Bearer " + INGEST_TOKEN[:-1]},
                ),
                "ingest with the token, unsigned": http_request(process.events_url, body, bearer),
                "ingest signed with a wrong secret": http_request(
                    process.events_url,
                    body,
                    {
                        **bearer,
                        SIGNATURE_HEADER: signature_header(
                            SIGNING_SECRET[:-1], body, content_type="application/json"
                        ),
                    },
                ),
                "ingest with the token, signed": http_request(
                    process.events_url,
                    body,
                    {
                        **bearer,
                        SIGNATURE_HEADER: signature_header(
                            SIGNING_SECRET, body, content_type="application/json"
                        ),
                    },
                ),
                "analytics without token": http_request(process.url + "/v1/analytics/summary"),
            }
            assert answers["ingest without token"][0] == 401
            assert answers["ingest with a wrong token"][0] == 401
            assert answers["ingest with the token, unsigned"][0] == 401
            assert answers["ingest signed with a wrong secret"][0] == 401
            assert answers["ingest with the token, signed"][0] == 202
            assert answers["analytics without token"][0] in (401, 503)

            def store_refused() -> bool:
                status, ready = process.readyz()
                return status == 503 and bool(ready["store"]["authFailed"])

            wait_until(store_refused, 20.0, 0.1, "the store to report refused credentials")
            for path in ("/readyz", "/healthz", "/metrics"):
                answers[path] = http_request(process.url + path)
            for where, (_, answer) in answers.items():
                _assert_no_secret(where, answer.decode(errors="replace"))
        finally:
            assert process.terminate() == 0
        log = process.log()
        assert "credentials" in log, "the store's refusal should be logged"
        _assert_no_secret("the log", log)
        checked = run_cli("check-config", **env)
        assert checked.returncode == 0, checked.stderr
        _assert_no_secret("check-config", checked.stdout + checked.stderr)


def test_a_data_dir_the_exporter_creates_is_private(tmp_path: Path) -> None:
    """The ledger holds payer addresses and refused bodies: only the exporter's user reads it."""
    created = tmp_path / "new" / "data"
    DataDirLock(created).release()
    assert created.stat().st_mode & 0o777 == 0o700
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o750)
    existing.chmod(0o750)
    DataDirLock(existing).release()
    assert existing.stat().st_mode & 0o777 == 0o700, "an existing directory is made private"
