"""The small HTTP client of ``query --url``: one analytics question to a running exporter."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import OperatorError


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """One analytics question, as the HTTP API takes it."""

    name: str
    window: str
    at_ms: int | None
    limit: int
    metric: str


def query_exporter(url: str, token: str | None, request: QueryRequest, timeout: float) -> object:
    """Ask a running exporter's ``GET /v1/analytics/{name}``; its JSON answer."""
    params: dict[str, str] = {"window": request.window, "limit": str(request.limit)}
    if request.name == "timeseries":
        params["metric"] = request.metric
    if request.at_ms is not None:
        params["at"] = str(request.at_ms)
    target = f"{url.rstrip('/')}/v1/analytics/{request.name}?{urllib.parse.urlencode(params)}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(target, headers=headers), timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as error:
        with error:
            body = error.read().decode("utf-8", errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            body = str(json.loads(body)["error"])
        raise OperatorError(f"query: {url} answered {error.code}: {body}") from None
    except (urllib.error.URLError, OSError) as error:
        raise OperatorError(f"query: cannot reach an exporter at {url}: {error}") from None

