"""The one seam to HTTP upstreams that speak OpenAI's API (vLLM, edge nodes,
hosted APIs): pooled client, timeouts, and the translation of every transport
failure and upstream status into a typed gateway error, in exactly one place.

The client is httpx's API on an aiohttp transport: httpcore's own pool polls
every pooled connection on each request and costs about 1.3 CPU-ms per request
on these machines, aiohttp's about 0.2 (see docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import msgspec
from httpx_aiohttp import AiohttpTransport

from gateway.errors import (
    EngineOverloadedError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    UpstreamError,
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    # Until the first byte of the answer (the whole answer, unstreamed);
    # between chunks once a stream has started.
    first_token: float


class _UpstreamError(msgspec.Struct):
    message: str = ""


class _UpstreamErrorBody(msgspec.Struct):
    error: _UpstreamError | str | None = None


_error_decoder = msgspec.json.Decoder(_UpstreamErrorBody)


def api_key_from_env(variable: str | None) -> str | None:
    """The upstream's key, read from the environment variable the config names
    (secrets are never written in the config file)."""
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"environment variable {variable} (the upstream's API key) is not set")
    return value


class Upstream:
    """One pooled HTTP client for one upstream, created at start-up."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        timeouts: Timeouts,
        api_key: str | None = None,
        max_connections: int = 100,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeouts.first_token, connect=timeouts.connect),
            transport=AiohttpTransport(limits=limits, trust_env=False),
            trust_env=False,
        )

    async def post(self, path: str, body: bytes) -> bytes:
        try:
            response = await self._client.post(path, content=body)
        except httpx.HTTPError as error:
            raise self._transport_error(error) from error
        if response.status_code >= 400:
            raise self._status_error(response.status_code, response.content, response.headers)
        return response.content

    async def get(self, path: str) -> tuple[int, bytes]:
        """For probes and metrics: the status and body, errors as UpstreamError."""
        try:
            response = await self._client.get(path)
        except httpx.HTTPError as error:
            raise self._transport_error(error) from error
        return response.status_code, response.content

    async def stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """The ``data:`` payloads of an SSE response, without ``[DONE]``.

        Failures before the first payload raise retryable errors; closing the
        iterator closes the connection, which makes vLLM abort the request.
        """
        request = self._client.build_request("POST", path, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as error:
            raise self._transport_error(error) from error
        try:
            if response.status_code >= 400:
                content = await response.aread()
                raise self._status_error(response.status_code, content, response.headers)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                yield payload.encode()
            raise UpstreamError(f"backend {self.name} ended the stream without [DONE]")
        except httpx.HTTPError as error:
            raise self._transport_error(error) from error
        finally:
            with contextlib.suppress(httpx.HTTPError):
                await response.aclose()

    def _transport_error(self, error: httpx.HTTPError) -> GatewayError:
        kind = type(error).__name__
        return UpstreamError(f"backend {self.name} is unreachable or timed out ({kind})")

    def _status_error(self, status: int, content: bytes, headers: httpx.Headers) -> GatewayError:
        message = _upstream_message(content) or f"status {status}"
        text = f"backend {self.name}: {message}"
        if status == 429 or status == 503:
            retry_after = headers.get("retry-after", "1")
            seconds = int(retry_after) if retry_after.isdigit() else 1
            return EngineOverloadedError(text, retry_after_seconds=seconds)
        if status >= 500:
            return UpstreamError(text)
        if status == 404:
            return NotFoundError(text, param="model")
        return InvalidRequestError(text)

    async def aclose(self) -> None:
        await self._client.aclose()


def _upstream_message(content: bytes) -> str:
    try:
        body = _error_decoder.decode(content)
    except msgspec.DecodeError:
        return content[:200].decode(errors="replace")
    if isinstance(body.error, _UpstreamError):
        return body.error.message
    return body.error or ""
