"""Runs the configured hooks in order, with defined failure behaviour.

A hook that raises a :class:`GatewayError` rejects the request with that error,
as the hook meant. Any other exception is a failure of the hook: it is logged
with its traceback and counted; then the request is rejected with a
:class:`HookFailedError` that names the hook and nothing else (internals never
reach the client), or, if the hook's config says ``fail_open``, the hook is
skipped for this request.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gateway.contract import (
    AnyChunk,
    AnyRequest,
    AnyResponse,
    ErrorHook,
    RequestContext,
    RequestHook,
    ResponseHook,
    StreamHook,
)
from gateway.errors import GatewayError, HookFailedError
from gateway.streams import closing
from gateway.wire import ChatCompletion, Completion

__all__ = ["SKIPPED", "BoundHook", "HookChain", "HookFailedError"]

_log = logging.getLogger(__name__)
T = TypeVar("T")
# Told how long each hook call took: (hook label, stage, seconds).
HookTimer = Callable[[str, str, float], None]


@dataclass(frozen=True, slots=True)
class BoundHook:
    """A hook instance as configured: its label, failure mode, and object."""

    label: str
    fail_open: bool
    hook: object


class _Skipped:
    """The hook failed open: carry on as if it were not there."""


SKIPPED = _Skipped()


class HookChain:
    def __init__(self, hooks: Sequence[BoundHook], timer: HookTimer | None = None) -> None:
        self.hooks = tuple(hooks)
        self._timer = timer
        self.failures: Counter[str] = Counter()
        # Which hooks take part in each stage, resolved once: isinstance()
        # against a runtime-checkable Protocol is slow on every request.
        self._request = [(b, b.hook) for b in self.hooks if isinstance(b.hook, RequestHook)]
        self._response = [
            (b, b.hook) for b in reversed(self.hooks) if isinstance(b.hook, ResponseHook)
        ]
        self._stream = [(b, b.hook) for b in reversed(self.hooks) if isinstance(b.hook, StreamHook)]
        self._error = [(b, b.hook) for b in self.hooks if isinstance(b.hook, ErrorHook)]
        # Whether any hook may rewrite a stream (then its chunks are checked).
        self.rewrites_streams = bool(self._stream)
        # Whether any hook hears of errors (else streams need no error watch).
        self.hears_errors = bool(self._error)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    async def on_request(
        self, request: AnyRequest, ctx: RequestContext
    ) -> AnyRequest | AnyResponse:
        for bound, hook in self._request:
            result = await self._guard(bound, hook.on_request(request, ctx), "request")
            if isinstance(result, _Skipped):
                continue
            if isinstance(result, ChatCompletion | Completion):
                return result
            request = result
        return request

    async def on_response(
        self, request: AnyRequest, response: AnyResponse, ctx: RequestContext
    ) -> AnyResponse:
        for bound, hook in self._response:
            result = await self._guard(bound, hook.on_response(request, response, ctx), "response")
            if not isinstance(result, _Skipped):
                response = result
        return response

    def on_stream(
        self, request: AnyRequest, chunks: AsyncIterator[AnyChunk], ctx: RequestContext
    ) -> AsyncIterator[AnyChunk]:
        for bound, hook in self._stream:
            chunks = self._guard_stream(bound, hook.on_stream(request, chunks, ctx), chunks)
        return chunks

    async def on_error(
        self, request: AnyRequest | None, error: GatewayError, ctx: RequestContext
    ) -> None:
        for bound, hook in self._error:
            started = time.perf_counter()
            try:
                await hook.on_error(request, error, ctx)
            except Exception:
                self._failed(bound)
            finally:
                self._timed(bound, "error", started)

    async def _guard(self, bound: BoundHook, call: Awaitable[T], stage: str) -> T | _Skipped:
        started = time.perf_counter()
        try:
            return await call
        except GatewayError:
            raise
        except Exception as error:
            self._failed(bound)
            if bound.fail_open:
                return SKIPPED
            raise self._rejection(bound) from error
        finally:
            self._timed(bound, stage, started)

    def _timed(self, bound: BoundHook, stage: str, started: float) -> None:
        if self._timer is not None:
            self._timer(bound.label, stage, time.perf_counter() - started)

    async def _guard_stream(
        self, bound: BoundHook, chunks: AsyncIterator[AnyChunk], source: AsyncIterator[AnyChunk]
    ) -> AsyncIterator[AnyChunk]:
        # Once bytes are streamed there is nothing to fall back to, so a
        # failing stream hook ends the stream with an error even if fail-open.
        # The hook's own input is closed too: a hook that fails (or stops
        # early) does not close it, and the generation would run on.
        try:
            async with closing(source), closing(chunks):
                async for chunk in chunks:
                    yield chunk
        except GatewayError:
            raise
        except Exception as error:
            self._failed(bound)
            raise self._rejection(bound) from error

    def _failed(self, bound: BoundHook) -> None:
        self.failures[bound.label] += 1
        _log.exception("hook %s failed", bound.label)

    @staticmethod
    def _rejection(bound: BoundHook) -> HookFailedError:
        return HookFailedError(f"The request was rejected: plugin hook '{bound.label}' failed.")
