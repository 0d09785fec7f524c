"""What every store shares: how a failed write is classified, and how a store is named.

A store's errors and logs name its address or file; an address never carries the user
info (``user:password@``) a URL may hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from ..errors import (
    StoreAuthError,
    StoreClientError,
    StoreRetryAfterError,
    StoreServerError,
    StoreTimeoutError,
)
from ..records import StoreRecord, StoreRejection

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


@runtime_checkable
class PreparingStore(Protocol):
    """A store whose CPU work per batch (rendering, compressing) can run ahead of its write.

    The forwarder calls :meth:`prepare` in a worker thread for the next batch while the
    current one is being written, then hands the result to :meth:`write_prepared`, so
    the store's remote end never waits on that work. Writes themselves stay one at a time.
    """

    def prepare(self, records: Sequence[StoreRecord]) -> object:
        """The batch's payload, ready to send; pure CPU, safe in a worker thread."""
        ...

    async def write_prepared(
        self, records: list[StoreRecord], prepared: object
    ) -> list[StoreRejection]:
        """:meth:`~exporter.records.Store.write` of ``records`` from their prepared payload."""
        ...
