"""What every store shares: how a failed write is classified, and how a store is named.

A store's errors and logs name its address or file; an address never carries the user
info (``user:password@``) a URL may hold.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import (
    StoreAuthError,
    StoreClientError,
    StoreRetryAfterError,
    StoreServerError,
    StoreTimeoutError,
)

ERROR_CLASSES = ("retry_after", "auth", "timeout", "server", "client", "other")
"""Every value of ``exporter_store_errors_total{class}``."""

ANSWERED_CLASSES = frozenset({"retry_after", "auth", "client"})
"""Error classes in which the store answered, and refused (it is reachable)."""


def error_class(error: BaseException) -> str:
    """The ``class`` label of a store failure (one of :data:`ERROR_CLASSES`)."""
    if isinstance(error, StoreRetryAfterError):
        return "retry_after"
    if isinstance(error, StoreAuthError):
        return "auth"
    if isinstance(error, StoreTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(error, StoreServerError | ConnectionError):
        return "server"
    if isinstance(error, StoreClientError):
        return "client"
    return "other"


def has_user_info(url: str) -> bool:
    """Whether ``url`` carries ``user[:password]@`` before its host."""
    return "@" in urlsplit(url).netloc
