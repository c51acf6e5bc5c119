"""What an upstream's failure becomes: a typed gateway error for the client,
and a log line for the operator.

An upstream's own error text never reaches a client: a hosted API's 401 names
part of the key it refused ("Incorrect API key provided: sk-ab***yz"), and a
5xx may carry stack traces or internal host names. The operator reads it in
the log; the client gets a generic message naming the backend and the status,
with the status the official SDK maps to the right exception:

======================  ==========================================  ===========
upstream                gateway error                               client gets
======================  ==========================================  ===========
401, 403                UpstreamError (the operator's key is bad)    502
429                     UpstreamRateLimitedError, with Retry-After  503 (retried
                                                                    elsewhere
                                                                    first)
503                     EngineOverloadedError, with Retry-After     503
other 5xx               UpstreamError                               502
404                     NotFoundError                               404
413                     PayloadTooLargeError                        413
400 context length      ContextLengthExceededError                  400
other 4xx               InvalidRequestError                         400
======================  ==========================================  ===========
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
import time
from collections.abc import Mapping

import msgspec

from gateway.errors import (
    ContextLengthExceededError,
    EngineOverloadedError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UpstreamError,
    UpstreamRateLimitedError,
)

_log = logging.getLogger("gateway.upstream")

# The longest wait an upstream may ask for; the pipeline caps its own pause
# lower (retry_after_cap_seconds), this bounds what a client is told.
MAX_RETRY_AFTER_SECONDS = 3600
# How much of an upstream's error text goes to the log.
_LOGGED_CHARS = 500
# An upstream's `param` passes on only if it looks like a field path.
_PARAM = re.compile(r"^[A-Za-z0-9_.\[\]-]{1,64}$")


class _ErrorDetail(msgspec.Struct):
    message: str | None = None
    param: str | None = None
    code: str | int | None = None


class _ErrorBody(msgspec.Struct):
    # {"error": {...}} (OpenAI, vLLM), {"error": "text"} (some servers).
    error: _ErrorDetail | str | None = None


_error_decoder = msgspec.json.Decoder(_ErrorBody)


def upstream_error_detail(content: bytes) -> _ErrorDetail | None:
    """The ``error`` of an upstream's error body, or None if it is not one."""
    try:
        body = _error_decoder.decode(content)
    except msgspec.DecodeError:
        return None
    if isinstance(body.error, str):
        return _ErrorDetail(message=body.error)
    return body.error


def retry_after_seconds(headers: Mapping[str, str], default: int = 1) -> int:
    """How long the upstream asked to wait, in whole seconds (at least 1):
    ``retry-after-ms`` (OpenAI sends it), else ``Retry-After`` as seconds or as
    an HTTP date."""
    seconds: float | None = None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        seconds = _number(milliseconds)
        seconds = seconds / 1000 if seconds is not None else None
    value = headers.get("retry-after")
    if seconds is None and value:
        seconds = _number(value)
        if seconds is None:
            seconds = _until(value)
    if seconds is None:
        return default
    return min(max(1, math.ceil(seconds)), MAX_RETRY_AFTER_SECONDS)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _until(http_date: str) -> float | None:
    try:
        moment = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    return moment.timestamp() - time.time()


def status_error(
    backend: str, status: int, content: bytes, headers: Mapping[str, str], *, reveal: bool
) -> GatewayError:
    """The error for an upstream's status >= 400. ``reveal``: the message may
    carry the upstream's own text (admin calls to the gateway's own engines,
    whose callers read it); never for an answer a client asked for."""
    detail = upstream_error_detail(content)
    text = detail.message if detail and detail.message else content[:200].decode(errors="replace")
    _log_status(backend, status, text)
    if reveal:
        message = f"backend {backend}: {text or f'status {status}'}"
    else:
        message = f"backend {backend} {_SUMMARIES.get(status, _summary(status))} (status {status})"
    if status in (401, 403):
        return UpstreamError(message)
    if status == 429:
        return UpstreamRateLimitedError(message, retry_after_seconds=retry_after_seconds(headers))
    if status == 503:
        return EngineOverloadedError(message, retry_after_seconds=retry_after_seconds(headers))
    if status >= 500:
        return UpstreamError(message)
    if status == 404:
        return NotFoundError(message, param="model")
    if status == 413:
        return PayloadTooLargeError(message)
    param = detail.param if detail and detail.param and _PARAM.match(detail.param) else None
    if detail is not None and detail.code == "context_length_exceeded":
        return ContextLengthExceededError(message, param=param or "messages")
    return InvalidRequestError(message, param=param)


_SUMMARIES = {
    401: "could not authenticate with its upstream",
    403: "is not allowed to use its upstream",
    404: "does not serve the requested model",
    413: "refused the request as too large",
    429: "is rate-limited by its upstream",
    503: "is overloaded",
}


def _summary(status: int) -> str:
    return "failed" if status >= 500 else "rejected the request"


def _log_status(backend: str, status: int, text: str) -> None:
    logged = text[:_LOGGED_CHARS]
    if status in (401, 403):
        _log.error(
            "backend %s: its upstream refused the gateway's credentials (status %d; check "
            "the key in its api_key_env): %r",
            backend,
            status,
            logged,
        )
    elif status == 429 or status >= 500:
        _log.warning("backend %s: upstream status %d: %r", backend, status, logged)
    else:
        _log.info("backend %s: upstream status %d: %r", backend, status, logged)


def unreadable_answer(backend: str, payload: bytes, problem: Exception) -> UpstreamError:
    """An answer (or a stream's chunk) that does not decode: an error body in
    its place, or something not in OpenAI's format."""
    detail = upstream_error_detail(payload)
    if detail is not None:
        _log.error(
            "backend %s: an error instead of an answer: %r",
            backend,
            (detail.message or "")[:_LOGGED_CHARS],
        )
        return UpstreamError(f"backend {backend} reported an error instead of an answer")
    _log.warning(
        "backend %s: an answer not in OpenAI's format (%s; %d bytes)",
        backend,
        problem,
        len(payload),
    )
    return UpstreamError(f"backend {backend} sent an answer not in OpenAI's format")
