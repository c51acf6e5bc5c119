"""Sheds requests past ``limits.max_requests`` in progress, before they cost
anything: 503 with ``Retry-After`` and an OpenAI-shaped body, the connection
closed. A stream is in progress until its last byte.

``/health`` and ``/ready`` are always answered: an overloaded gateway is
alive, and a liveness probe that failed under load would get it restarted
(dropping every stream it serves) just when it is busiest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway import wire
from gateway.errors import ErrorBody, ErrorDetail

ALWAYS_ANSWERED = frozenset({"/health", "/ready"})
RETRY_AFTER_SECONDS = 1


class LoadWatch(Protocol):
    """Told when the requests in progress rise to ``busy_at`` and when they
    fall to ``quiet_at`` (the garbage collector: gateway/collector.py). Both
    may be told more than once in a row."""

    busy_at: int
    quiet_at: int

    def busy(self) -> None: ...

    def quiet(self) -> None: ...


class _Unwatched:
    busy_at = -1
    quiet_at = -1

    def busy(self) -> None:
        return None

    def quiet(self) -> None:
        return None


class RequestShedder:
    """ASGI middleware around the whole application."""

    def __init__(
        self,
        app: ASGIApp,
        max_requests: int,
        on_shed: Callable[[Scope], None] | None = None,
        load: LoadWatch | None = None,
    ) -> None:
        """``on_shed``: told of each request shed (its ledger row:
        gateway/accounting/shed.py), on the refusal path only. ``load``: told
        as the count crosses its marks (two comparisons a request)."""
        self.app = app
        self.max_requests = max_requests
        self.on_shed = on_shed
        self._load: LoadWatch = load if load is not None else _Unwatched()
        self._busy_at = self._load.busy_at
        self._quiet_at = self._load.quiet_at
        self.in_progress = 0
        self.shed = 0
        detail = ErrorDetail(
            "The gateway is overloaded: too many requests are in progress. Retry later.",
            "server_error",
            None,
            "server_overloaded",
        )
        self._body = wire.encoder.encode(ErrorBody(detail))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["path"] in ALWAYS_ANSWERED:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.max_requests:
            self.shed += 1
            if self.on_shed is not None:
                self.on_shed(scope)
            await self._refuse(send)
            return
        self.in_progress += 1
        if self.in_progress == self._busy_at:
            self._load.busy()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1
            if self.in_progress == self._quiet_at:
                self._load.quiet()

    async def _refuse(self, send: Send) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self._body)).encode()),
            (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": self._body, "more_body": False})
