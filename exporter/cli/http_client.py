"""The small HTTP client of ``query --url``: a GET to a running exporter, its JSON answer."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request

from ..errors import OperatorError


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: urllib would resend the ``Authorization`` header to wherever a
    redirect points."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        """Refuse the redirect; the 3xx answer becomes an HTTPError."""
        return None


def get_json(url: str, token: str | None, timeout: float, command: str) -> object:
    """GET ``url`` (with a bearer ``token`` when given) and parse its JSON answer.

    Requests never go through a proxy from the environment: the exporter is asked
    directly. Every failure is an :class:`~exporter.errors.OperatorError` naming ``url``:
    an error status with the exporter's own ``error`` message, an unreachable address,
    or an answer that is not JSON.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
    try:
        request = urllib.request.Request(url, headers=headers)
    except ValueError as error:  # no scheme, or not a URL at all
        raise OperatorError(f"{command}: --url {url!r} is not a URL: {error}", 2) from None
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:
            error.close()
            where = error.headers.get("Location", "elsewhere")
            raise OperatorError(
                f"{command}: {url} answered {error.code}, a redirect to {where}; --url must "
                "name the exporter itself (a redirect is never followed: it would carry the "
                "token to another address)"
            ) from None
        with error:
            detail = error.read().decode("utf-8", errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = str(json.loads(detail)["error"])
        raise OperatorError(f"{command}: {url} answered {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise OperatorError(
            f"{command}: cannot reach an exporter at {url}: {reason}; check --url and that "
            "the exporter runs"
        ) from None
    try:
        return json.loads(body)
    except ValueError:
        raise OperatorError(f"{command}: {url} did not answer JSON; is it an exporter?") from None
