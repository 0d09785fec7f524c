"""What operators' tools print is safe to open: no spreadsheet formulas, no terminal control
characters, and no token carried across a redirect."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.cli.http_client import get_json
from exporter.cli.main import main
from exporter.cli.render import clip, render_data, render_table
from exporter.errors import OperatorError
from exporter.ledger import DeadLetter, Ledger, Submission


def test_csv_cells_that_start_like_a_formula_are_neutralised() -> None:
    rows = [
        {"address": "=cmd|'/C calc'!A0", "totalPaid": "1.500000", "growth": -12.5},
        {"address": "+1+1", "totalPaid": "-3", "growth": "@SUM(A1)"},
    ]
    cells = list(csv.reader(io.StringIO(render_data(rows, "csv"))))
    assert cells[1] == ["'=cmd|'/C calc'!A0", "1.500000", "-12.5"]
    assert cells[2] == ["'+1+1", "-3", "'@SUM(A1)"]


def test_tables_show_control_characters_instead_of_sending_them() -> None:
    table = render_table(["raw"], [["a\x1b[2Jb\x07c\x9bd"]])
    assert "\x1b" not in table and "\x07" not in table and "\x9b" not in table
    assert "a\\x1b[2Jb\\x07c\\x9bd" in table
    assert clip("x\x1by", 0) == "x\\x1by"


def test_dead_letters_shows_a_refused_bodys_control_characters_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    ledger = Ledger(data_dir / "ledger.sqlite3")
    hostile = b'{"payee": "\x1b]0;owned\x07\x1b[2J"}'
    ledger.commit([Submission(dead_letters=[DeadLetter("malformed", "bad \x1b[31m", hostile)])])
    ledger.close()
    assert main(["dead-letters", "--width", "0", "--data-dir", str(data_dir)]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b]0;owned\\x07\\x1b[2J" in shown and "bad \\x1b[31m" in shown


async def test_query_url_never_follows_a_redirect_with_the_token(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(other.make_url("/v1/analytics/health")))

    other_app = web.Application()
    other_app.router.add_get("/{tail:.*}", elsewhere)
    other = await aiohttp_server(other_app, port=0)
    app = web.Application()
    app.router.add_get("/{tail:.*}", redirect)
    server = await aiohttp_server(app, port=0)
    url = str(server.make_url("/v1/analytics/health"))
    with pytest.raises(OperatorError, match="redirect"):
        await asyncio.to_thread(get_json, url, "secret-token-0123456789", 5.0, "query")
    assert seen == []
