"""Addresses: listen strings, Host headers, loopback checks and URLs shown without their
credentials. Shared by the settings, the HTTP guards, the proxy and the stores."""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit, urlunsplit


def split_host_port(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be an integer, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    return host, port


def is_loopback_host(host: str) -> bool:
    """True when ``host`` names only loopback addresses (``localhost``, 127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host != "localhost":
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(str(info[4][0])).is_loopback for info in infos)


def redact_url(url: str) -> str:
    """``url`` with any user info replaced by ``***``: the only form a URL may be shown in.

    Logs, error answers and ``check-config`` print URLs through this, so credentials
    written into a URL (``https://user:pass@host``) never leave the process.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc="***@" + host))


def host_name(host_header: str | None) -> str | None:
    """The name in a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``), lower
    case; None when there is none or it is malformed."""
    if not host_header:
        return None
    text = host_header.strip().lower()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not re.fullmatch(r":[0-9]{1,5}", rest)):
            return None
        return name
    name, _, port = text.partition(":")
    if port and not re.fullmatch(r"[0-9]{1,5}", port):
        return None
    return name or None


def is_loopback_name(name: str) -> bool:
    """Whether ``name`` is ``localhost`` or a loopback address literal (no DNS lookup: a
    name from a request must not make the exporter resolve anything)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def base_url(value: str) -> str:
    """An http(s) base URL without query or fragment, without its trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {redact_url(value)!r}")
    if parts.query or parts.fragment:
        raise ValueError("must be a base URL without query or fragment")
    return value.rstrip("/")
