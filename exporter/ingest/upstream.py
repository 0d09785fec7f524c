"""The proxy's one upstream: where a request may be forwarded, with which headers and bytes.

Everything here treats the client's request as hostile. A request target is forwarded only
in origin form (``/path?query``), its dot-segments resolved and confined to the configured
base path, and the URL is rebuilt from the configured scheme, host and port, so no
request can make the proxy connect anywhere else. Credentials written in the upstream URL
travel only in the ``Authorization`` header the proxy sets, and are never shown: what logs,
error bodies and ``check-config`` print is :attr:`Upstream.shown`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import StreamReader
from multidict import CIMultiDict
from yarl import URL

from ..addresses import redact_url

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
"""Headers that describe one connection (RFC 9110 section 7.6.1), never forwarded."""

# RFC 3986 pchar plus "/" in the path and "?" in the query; anything else is refused.
_ORIGIN_FORM = re.compile(
    r"/(?!/)[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*(\?[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*)?"
)
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")


class ForwardRefused(Exception):
    """A request the proxy will not forward; ``status`` and ``str()`` form the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Upstream:
    """The facilitator the proxy stands in front of: origin, base path and credentials."""

    origin: URL
    """Scheme, host and port only; every forwarded URL is built on it."""
    base_path: str
    """The configured path prefix without its trailing slash ("" for the root)."""
    authorization: str | None
    """``Basic ...`` from the URL's user info, sent instead of any client credentials."""
    shown: str
    """The URL without credentials: the only form logs and answers may carry."""

    @classmethod
    def parse(cls, url: str) -> Upstream:
        """The upstream named by ``url`` (an http or https base URL, validated by config)."""
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{redact_url(url)} is not an http(s) URL with a host")
        authorization = None
        if parsed.user is not None or parsed.password is not None:
            pair = f"{parsed.user or ''}:{parsed.password or ''}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        origin = URL.build(scheme=parsed.scheme, host=parsed.host, port=parsed.explicit_port)
        return cls(origin, parsed.raw_path.rstrip("/"), authorization, redact_url(url))

    def target(self, raw_target: str) -> URL:
        """The upstream URL for a client's request target, or :class:`ForwardRefused`.

        Only origin form is accepted; dot-segments (also percent-encoded ones) are resolved
        and may not climb above the base path; an encoded slash or backslash inside a
        segment is refused, since the upstream might decode it into a separator.
        """
        if not _ORIGIN_FORM.fullmatch(raw_target) or _PCT.search(raw_target):
            raise ForwardRefused(
                400, "only origin-form request targets (/path?query) are forwarded"
            )
        path, _, query = raw_target.partition("?")
        kept: list[str] = []
        segments = path.split("/")[1:]
        for index, segment in enumerate(segments):
            decoded = unquote(segment)
            if "/" in decoded or "\\" in decoded:
                raise ForwardRefused(400, "an encoded slash or backslash in the path is refused")
            if decoded == "..":
                if not kept:
                    raise ForwardRefused(400, "the path leaves the upstream's base path")
                kept.pop()
            elif decoded != "." and (segment or index == len(segments) - 1):
                kept.append(segment)
        if segments and unquote(segments[-1]) in (".", "..") and kept:
            kept.append("")  # "/a/b/.." names the directory "/a/"
        url = URL.build(
            scheme=self.origin.scheme,
            host=self.origin.raw_host or "",
            port=self.origin.explicit_port,
            path=self.base_path + "/" + "/".join(kept),
            query_string=query,
            encoded=True,
        )
        if (url.scheme, url.host, url.port) != (
            self.origin.scheme,
            self.origin.host,
            self.origin.port,
        ):
            raise ForwardRefused(400, "the request target names another host")  # unreachable
        return url


def end_to_end(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """``headers`` without hop-by-hop ones, including every header ``Connection`` names."""
    items = list(headers.items() if isinstance(headers, Mapping) else headers)
    named = {
        token.strip().lower()
        for name, value in items
        if name.lower() == "connection"
        for token in value.split(",")
    }
    drop = HOP_BY_HOP | named
    return CIMultiDict((name, value) for name, value in items if name.lower() not in drop)


async def read_bounded(content: StreamReader, limit: int) -> bytes | None:
    """Read a body of at most ``limit`` bytes; None (and stop reading) when it is larger."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
