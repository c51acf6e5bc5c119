"""Typed gateway errors, each knowing its HTTP status and OpenAI error shape.

Everything that can go wrong for a client is a :class:`GatewayError`: one of
the classes below, or a subclass with a more specific ``code`` and the same
status. A single handler in :mod:`gateway.app` turns them into
``{"error": {...}}`` bodies, so the official ``openai`` SDK raises the matching
exception class:

========================  ======  ======================="""

from __future__ import annotations

from types import EllipsisType

import msgspec

__all__ = [
    "AuthenticationError",
    "ContextLengthExceededError",
    "EngineOverloadedError",
    "ErrorBody",
    "ErrorDetail",
    "GatewayError",
    "HookFailedError",
    "InternalError",
    "InvalidRequestError",
    "KeyOverloadedError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "RouteNotFoundError",
    "StreamTimeoutError",
    "UnsupportedFeatureError",
    "UpstreamError",
    "UpstreamRateLimitedError",
    "UpstreamTimeoutError",
]


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | EllipsisType | None = ...,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # ``...``: the class's default code; an explicit None sends ``"code": null``.
        self.code = self.default_code if isinstance(code, EllipsisType) else code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> ErrorBody:
        detail = ErrorDetail(self.message, self.error_type, self.param, self.code)
        return ErrorBody(detail)


class InvalidRequestError(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class UnsupportedFeatureError(InvalidRequestError):
    default_code = "unsupported_parameter"


class AuthenticationError(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class NotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class RouteNotFoundError(NotFoundError):
    default_code = "not_found"


class MethodNotAllowedError(GatewayError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLargeError(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class EngineOverloadedError(GatewayError):
    """The engine's queue is full. 503, not 429: 429 is kept for rate limits."""

    status_code = 503
    error_type = "server_error"
    default_code = "engine_overloaded"

    def __init__(self, message: str, *, retry_after_seconds: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_seconds)})


class UpstreamRateLimitedError(EngineOverloadedError):
    """A hosted upstream answered 429: retryable (another deployment, or a
    later round after its Retry-After); 503 for the client, whose own limits
    are not the cause."""

    default_code = "upstream_rate_limited"


class KeyOverloadedError(EngineOverloadedError):
    """This API key already holds its share of an engine (``max_per_key``).

    429: the client's own load is the cause. An overload still, so the
    gateway tries other deployments first (where the key may have room)."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    status_code = 502
    error_type = "server_error"
    default_code = "upstream_error"


class InternalError(GatewayError):
    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


class UpstreamTimeoutError(UpstreamError):
    """No answer (or no first chunk) within the model's ``timeout_seconds``,
    retries included."""

    status_code = 504
    default_code = "timeout"


class StreamTimeoutError(UpstreamTimeoutError):
    """A stream ran past the model's ``stream_timeout_seconds``; sent as the
    stream's last event (its status was sent with the first byte)."""


class HookFailedError(GatewayError):
    """A plugin hook failed (not a rejection it meant); the message names it."""

    status_code = 500
    error_type = "server_error"
    default_code = "hook_failed"
