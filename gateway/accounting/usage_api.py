"""``GET /admin/usage``: the ledger summed per group over a time window
(admin keys only, like the rest of /admin)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.types import ControllerRouterHandler

from gateway import wire
from gateway.accounting.runtime import Accounting
from gateway.accounting.usage import (
    UsageQueryError,
    parse_group,
    parse_time,
    report,
    usage_by,
)
from gateway.auth import AdminAuthenticator
from gateway.errors import EngineOverloadedError, InvalidRequestError, NotFoundError

_log = logging.getLogger(__name__)
AnyRequest = Request[Any, Any, State]


class AccountingUnavailableError(EngineOverloadedError):
    """The accounting database did not answer (503: try again)."""

    default_code = "accounting_unavailable"


def build_usage_handlers(
    accounting: Callable[[], Accounting | None], authenticate: AdminAuthenticator
) -> list[ControllerRouterHandler]:
    """``accounting`` is called per request: it exists once started."""

    @get("/admin/usage")
    async def usage_report(request: AnyRequest) -> Response[bytes]:
        authenticate(request)
        running = accounting()
        if running is None:
            raise NotFoundError("Accounting is off ([accounting] enabled = false).", code=None)
        query = request.query_params
        try:
            group_by = parse_group(query.get("group_by") or "model")
            since = parse_time(query.get("since"), "since")
            until = parse_time(query.get("until"), "until")
        except UsageQueryError as error:
            raise InvalidRequestError(str(error), param=error.param) from None
        try:
            # What the gateway has answered so far is in the sums.
            await running.ledger.flush()
            data = await usage_by(running.engine, group_by, since, until)
        except Exception as error:
            _log.warning("usage query failed: %s", error)
            raise AccountingUnavailableError(
                "The accounting database is unreachable; try again."
            ) from None
        payload = wire.encoder.encode(report(group_by, since, until, data))
        return Response(payload, media_type="application/json")

    return [usage_report]
