"""A ledger row for each request shed before the app (gateway/shedding.py).

Past ``limits.max_requests`` in progress, the shedder answers 503 without
calling the application, so no exchange is opened and the observer never
hears of the request. The issue's rule is one ledger record per request,
refusals included: the shedder calls :class:`ShedRecorder` on its refusal
path only (the requests it lets through pay nothing for it). The record
has what can be known without reading the body: the endpoint, the key and
team if the ``Authorization`` header names one (its hash looked up, as the
app would), status 503 and error ``server_overloaded``; no model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from litestar.types import Scope

from gateway.accounting.runtime import Accounting
from gateway.auth import PrincipalAuthenticator
from gateway.errors import GatewayError
from gateway.exchange import Exchange

SHED_STATUS = 503
SHED_ERROR = "server_overloaded"


@dataclass(frozen=True, slots=True)
class _Scoped:
    """A request as the authenticators read it: its scope."""

    scope: Scope


class ShedRecorder:
    """Told of each shed request (``RequestShedder(on_shed=...)``)."""

    def __init__(
        self,
        accounting: Callable[[], Accounting | None],
        authenticate: PrincipalAuthenticator,
        paths: frozenset[str],
    ) -> None:
        """``accounting``: the ledger's holder once started (None: off);
        ``paths``: the endpoints whose requests the ledger records."""
        self._accounting = accounting
        self._authenticate = authenticate
        self._paths = paths

    def __call__(self, scope: Scope) -> None:
        accounting = self._accounting()
        path = scope["path"]
        if accounting is None or scope.get("method") != "POST" or path not in self._paths:
            return
        exchange = Exchange("", "", time.monotonic(), path=path)
        try:
            principal = self._authenticate.principal(_Scoped(scope))
        except GatewayError:
            principal = None  # no key, or a wrong one: recorded without
        if principal is not None:
            exchange.key_id = principal.key_id
            exchange.team_id = principal.team.id if principal.team is not None else None
        accounting.ended(exchange, SHED_STATUS, SHED_ERROR)
