"""The steps every OpenAI endpoint's handler shares (chat, completions and
embeddings in gateway/app.py, the Responses API in
gateway/openai_responses/handlers.py): the exchange opened and closed once,
the caller authenticated, the request's context, cancelling work whose client
left, and any failure as the typed error the client gets, heard by the error
hooks once. :func:`openai_post` does them; an endpoint gives only its work."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from litestar import Request, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, ControllerRouterHandler

from gateway.accounting.admission import Ticket
from gateway.accounting.principal import Principal
from gateway.auth import PrincipalAuthenticator
from gateway.contract import AnyRequest as HookRequest
from gateway.contract import RequestContext
from gateway.decisions import RouteTrace
from gateway.direct_routes import DIRECT
from gateway.edge_usage import USAGE_KEY_HEADER
from gateway.errors import (
    AuthenticationError,
    GatewayError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    RouteNotFoundError,
)
from gateway.exchange import Exchange
from gateway.responses import HangUp, Headers
from gateway.telemetry.requests import accepted_request_id, new_request_id, traced_request
from gateway.telemetry.spans import RequestSpan

if TYPE_CHECKING:
    from gateway.app import Runtime

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


# Litestar's words for a body past the limit, which clients got before.
_TOO_LARGE = "Request Entity Too Large"
_PRIVATE_HEADERS = frozenset({b"authorization", b"cookie", b"proxy-authorization"})


def request_context(
    prefix: str,
    key_id: str | None,
    request: AnyRequest,
    principal: Principal | None = None,
    separator: str = "-",
    exchange: Exchange | None = None,
) -> RequestContext:
    """The context of one request; its id (also the answer's) is
    ``prefix``, ``separator`` and 128 random bits in hex. Backends report
    their busy time and a cut stream's usage to ``exchange`` (set here, the
    pipeline need not copy the context to say so)."""
    headers = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in request.scope["headers"]
        if name not in _PRIVATE_HEADERS
    }
    request_id = f"{prefix}{separator}{new_request_id()}"
    if exchange is None:
        return RequestContext(
            request_id, int(time.time()), key_id, None, headers, principal=principal
        )
    return RequestContext(
        request_id,
        int(time.time()),
        key_id,
        None,
        headers,
        principal=principal,
        compute=exchange.compute,
        usage_report=exchange.reported,
    )


async def read_body(request: AnyRequest, limit: int) -> bytes:
    """The request's body, with what Litestar's ``Request.body()`` checks and
    raises (a 413 past ``limit``, announced or received; a client gone
    before the end is a 500), without the header parsing and the async
    generator it costs on every request (docs/benchmarks.md, "Streaming at
    scale")."""
    for name, value in request.scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                raise InvalidRequestError(f"Invalid content-length: {value.decode('latin-1')!r}")
            if int(value) > limit:
                raise PayloadTooLargeError(_TOO_LARGE)
            break
    receive = request.receive
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InternalError("Internal server error.")
        if message["type"] != "http.request":
            continue
        body = message["body"]
        if body:
            size += len(body)
            if size > limit:
                raise PayloadTooLargeError(_TOO_LARGE)
            parts.append(body)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


class ClientClosedRequestError(GatewayError):
    """The client went away; nobody reads this error (499, as nginx logs it)."""

    status_code = 499
    default_code = "client_closed_request"


async def cancel_on_disconnect(request: AnyRequest, work: Awaitable[T]) -> T:
    """Await ``work``; if the client hangs up first, cancel it (which stops
    the generation) instead of computing an answer nobody will read.

    The work runs in this task; the connection cancels it when the client
    goes away (:class:`gateway.responses.HangUp`: no task, no
    ``asyncio.wait``)."""
    hang_up = HangUp(request.receive, request.scope)
    try:
        return await work
    except asyncio.CancelledError:
        if not hang_up.absorb():
            raise
        raise ClientClosedRequestError("The client closed the connection.") from None
    finally:
        hang_up.close()


@dataclass(slots=True)
class Call:
    """One request to an OpenAI endpoint, as its work sees it: the caller
    (authenticated), its context and its exchange (the one ledger row). The
    work sets ``ticket`` once admitted (its rate-limit headers go on any
    error too) and ``told`` once decoded (what the error hooks hear)."""

    request: AnyRequest
    request_id: str
    span: RequestSpan | None
    exchange: Exchange
    principal: Principal | None
    ctx: RequestContext
    ticket: Ticket | None = None
    told: HookRequest | None = None

    def headers(self, trace: RouteTrace | None = None, route_header: bool = False) -> Headers:
        """The answer's headers: its request id, the route taken (when
        ``[server] route_header`` asks) and the rate-limit headers."""
        headers: Headers = [(b"x-request-id", self.request_id.encode("latin-1"))]
        if route_header and trace is not None and trace.decision is not None:
            headers.append((b"x-nomoat-route", trace.decision.header().encode("latin-1")))
        if self.ticket is not None:
            headers += self.ticket.headers
        return headers


Work = Callable[[Call], Awaitable[ASGIApp]]


@dataclass(frozen=True, slots=True)
class OpenAIRoute:
    """Where an endpoint is served and how its ids and logs name it."""

    path: str
    # The exchange's operation (metrics, ledger) and the route's name.
    name: str
    # Answers' ids: prefix, separator, 128 random bits ("chatcmpl-...", "resp_...").
    id_prefix: str
    separator: str = "-"


def openai_post(
    runtime: Runtime, route: OpenAIRoute, authenticate: PrincipalAuthenticator, work: Work
) -> ControllerRouterHandler:
    """``POST route.path``: the shared steps around ``work``. Every error
    before the response starts reaches the client once, typed, and the error
    hooks once (after that, a stream's errors are the pipeline's)."""

    async def serve(request: AnyRequest, request_id: str, span: RequestSpan | None) -> ASGIApp:
        observer = runtime.observer
        exchange = observer.open(route.name, route.path)
        call: Call | None = None
        try:
            principal = authenticate.principal(request)
            key_id = principal.key_id if principal is not None else None
            ctx = request_context(
                route.id_prefix, key_id, request, principal, route.separator, exchange
            )
            exchange.request_id, exchange.key_id = ctx.request_id, key_id
            if runtime.cut_usage is not None:
                exchange.usage_key = ctx.headers.get(USAGE_KEY_HEADER)
            if principal is not None and principal.team is not None:
                exchange.team_id = principal.team.id
            call = Call(request, request_id, span, exchange, principal, ctx)
            return await work(call)
        except ClientClosedRequestError as gone:
            observer.failed(exchange, gone)
            raise
        except Exception as exc:
            error = as_gateway_error(exc, route.path)
            observer.failed(exchange, error)
            error.headers.setdefault("x-request-id", request_id)
            ticket = call.ticket if call is not None else None
            for name, value in ticket.headers if ticket is not None else ():
                error.headers.setdefault(name.decode(), value.decode())
            if runtime.pipeline is not None:
                if call is None:  # refused before its context: a context to tell
                    ctx = request_context(route.id_prefix, None, request, separator=route.separator)
                    await runtime.pipeline.hooks.on_error(None, error, ctx)
                else:
                    await runtime.pipeline.hooks.on_error(call.told, error, call.ctx)
            raise error from exc
        except BaseException:
            # Cancelled (the server stopping): still out of the in-flight count.
            observer.close(exchange, ClientClosedRequestError.status_code, "cancelled")
            raise

    async def handle(request: AnyRequest) -> ASGIApp:
        request_id = accepted_request_id(request.scope["headers"])
        tracing = runtime.tracing
        if tracing is None:
            return await serve(request, request_id, None)
        return await traced_request(tracing, route.path, request, request_id, serve)

    # Served past Litestar's routing by gateway/direct_routes.py.
    return post(route.path, status_code=200, name=route.name, opt={DIRECT: True})(handle)
