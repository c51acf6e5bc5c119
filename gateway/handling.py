"""The steps every OpenAI endpoint's handler shares (gateway/app.py's chat
and completions, gateway/openai_responses/handlers.py): the request's
context, cancelling work whose client left, and any failure as the typed
error the client gets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from litestar import Request
from litestar.datastructures import State
from litestar.exceptions import HTTPException

from gateway.accounting.principal import Principal
from gateway.contract import RequestContext
from gateway.errors import (
    AuthenticationError,
    GatewayError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    RouteNotFoundError,
)
from gateway.responses import HangUp
from gateway.telemetry.requests import new_request_id

_log = logging.getLogger(__name__)
AnyRequest = Request[Any, Any, State]
T = TypeVar("T")

_HTTP_ERRORS: dict[int, type[GatewayError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: RouteNotFoundError,
    405: MethodNotAllowedError,
    413: PayloadTooLargeError,
}


def as_gateway_error(exc: Exception, path: str) -> GatewayError:
    """Any failure as the typed error the client gets (internals never)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, HTTPException):
        kind = _HTTP_ERRORS.get(exc.status_code, InternalError)
        message = exc.detail if exc.status_code < 500 else "Internal server error."
        if exc.status_code == 404:
            message = f"Unknown path {path}"
        error = kind(message)
        # A 405 says which methods the path has (RFC 9110 requires it).
        allow = (exc.headers or {}).get("allow")
        if exc.status_code == 405 and allow:
            error.headers["Allow"] = allow
        return error
    _log.exception("unhandled error on %s", path)
    return InternalError("Internal server error.")


_PRIVATE_HEADERS = frozenset({b"authorization", b"cookie", b"proxy-authorization"})


def request_context(
    prefix: str,
    key_id: str | None,
    request: AnyRequest,
    principal: Principal | None = None,
    separator: str = "-",
) -> RequestContext:
    """The context of one request; its id (also the answer's) is
    ``prefix``, ``separator`` and 128 random bits in hex."""
    headers = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in request.scope["headers"]
        if name not in _PRIVATE_HEADERS
    }
    request_id = f"{prefix}{separator}{new_request_id()}"
    return RequestContext(request_id, int(time.time()), key_id, None, headers, principal=principal)


class ClientClosedRequestError(GatewayError):
    """The client went away; nobody reads this error (499, as nginx logs it)."""

    status_code = 499
    default_code = "client_closed_request"


async def cancel_on_disconnect(request: AnyRequest, work: Awaitable[T]) -> T:
    """Await ``work``; if the client hangs up first, cancel it (which stops
    the generation) instead of computing an answer nobody will read.

    The work runs in this task; a watcher task cancels it when the client
    goes away (one task per request, not two and an ``asyncio.wait``)."""
    hang_up = HangUp(request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if not hang_up.absorb():
            raise
        raise ClientClosedRequestError("The client closed the connection.") from None
    finally:
        hang_up.close()
