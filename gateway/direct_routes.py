"""The OpenAI endpoints' POSTs, straight to their handlers.

Litestar's path to a handler (its router and routing cache, the exception
middleware, the HTTP route's request, kwargs and response handling) does
nothing for these endpoints that their handlers do not do themselves
(:func:`gateway.handling.openai_post`: authentication, every error typed,
the answer a plain ASGI application), yet it was about a fifth of a relayed
stream's set-up, and the exception middleware's wrapper around ``send`` ran
once for every chunk (docs/benchmarks.md, "Streaming at scale").
:class:`DirectRoutes` sits in front of the application: a POST whose path
is exactly one of those routes' (marked with :data:`DIRECT` in their
``opt``) calls the route's handler function with a Litestar ``Request`` and
sends what it returns; a failure before that is the same error response
Litestar's exception handler makes (``handle_exception``). Anything else
(another method, a path spelt otherwise, an invalid ``Host``) goes to
Litestar, unchanged: the routes stay registered there, so 405s, shedding's
path list and the route names are as before.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, cast

from litestar import Litestar, Request
from litestar.enums import ScopeType
from litestar.handlers import HTTPRouteHandler
from litestar.response import Response
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Receive, Scope, Send

# In a route handler's ``opt``: served by :class:`DirectRoutes`.
DIRECT = "nomoat_direct"
# What Litestar's router accepts as a Host header (litestar._asgi.utils).
_VALID_HOST = re.compile(rb"\A[0-9A-Za-z!$&'()*+,;=\-._~:\[\]@%]*\Z")

AnyRequest = Request[Any, Any, Any]
HandlerFunction = Callable[[AnyRequest], Awaitable[ASGIApp]]
ErrorHandler = Callable[[AnyRequest, Exception], Response[bytes]]


class DirectRoutes:
    """ASGI application: the marked POST routes of ``app`` served directly,
    everything else by ``app``."""

    __slots__ = ("_app", "_on_error", "_routes")

    def __init__(self, app: Litestar, on_error: ErrorHandler) -> None:
        self._app = app
        self._on_error = on_error
        self._routes: dict[str, tuple[HTTPRouteHandler, HandlerFunction]] = {}
        for route in app.routes:
            if not isinstance(route, HTTPRoute) or "POST" not in route.route_handler_map:
                continue
            handler = route.route_handler_map["POST"][0]
            if handler.opt.get(DIRECT):
                self._routes[route.path] = (handler, cast(HandlerFunction, handler.fn))

    @property
    def litestar(self) -> Litestar:
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP and scope["method"] == "POST":
            found = self._routes.get(scope["path"])
            if found is not None and _host_valid(scope):
                await self._serve(found[0], found[1], scope, receive, send)
                return
        await self._app(scope, receive, send)

    async def _serve(
        self,
        handler: HTTPRouteHandler,
        function: HandlerFunction,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        # What Litestar's app and router put in the scope, for the Request
        # (its body limit is the route handler's) and anything reading it.
        scope["app"] = scope["litestar_app"] = self._app
        scope.setdefault("state", {})
        scope["route_handler"] = handler
        scope.setdefault("path_params", {})
        request: AnyRequest = Request(scope, receive, send)
        try:
            answer = await function(request)
        except Exception as exc:
            response = self._on_error(request, exc)
            answer = response.to_asgi_response(None, request)
        # The answers (gateway.responses, gateway.relay_response) send their
        # status first: a failure inside one reaches the server, as it did
        # through Litestar once the response had started.
        await answer(scope, receive, send)


def _host_valid(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"host":
            return _VALID_HOST.match(value) is not None
    return True
