"""The exact usage of a stream cut short on an HTTP engine (docs/accounting.md).

A stream that ends before its usage chunk (the client left, the upstream
failed mid-stream) carries no usage, yet the engine spent tokens on it. After
the cut, off the request path, the backend asks the engine and reports what
it learns through the request's ``RequestContext.usage_report``; the observer
waits for that report (briefly, without blocking) before it prices and
records the request.

- An edge node (``nomoat edge``) knows exactly: its engine counts what each
  generation spent even when it is cancelled, and the node keeps each
  request's usage under the key the gateway sent (gateway/edge_usage.py).
- vLLM is asked for the prompt's tokens (``POST /tokenize`` with the request's
  messages or prompt, as vLLM renders them for generation); the completion is
  the chunks received since the first with content (vLLM sends one chunk a
  token).

If the engine cannot tell, the report is withdrawn and the gateway's own
estimate stands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec

from gateway import wire
from gateway.backends.upstream import Upstream
from gateway.contract import AnyRequest, UsageReport
from gateway.edge_usage import USAGE_PATH, KeptUsage

_log = logging.getLogger(__name__)
# The longest a fetch may take: past it, the gateway has recorded its
# estimate anyway (gateway/observer.py REPORT_WAIT_SECONDS).
FETCH_SECONDS = 5.0


class _Tokenized(msgspec.Struct):
    count: int


class _ChatTokenize(msgspec.Struct, omit_defaults=True):
    model: str
    messages: list[wire.Message]
    tools: list[wire.Tool] | None = None
    add_generation_prompt: bool = True


class _PromptTokenize(msgspec.Struct):
    model: str
    prompt: str


class CutUsageAsker:
    """Fetches cut streams' usage from one engine, in background tasks."""

    def __init__(self, upstream: Upstream, root_url: str) -> None:
        self._upstream = upstream
        self._root = root_url.rstrip("/")
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(
        self, report: UsageReport, fetch: Callable[[], Awaitable[wire.Usage | None]]
    ) -> None:
        """Expect a report now (before the request is closed), deliver it
        when ``fetch`` answers, withdraw it if it cannot."""
        report.expect()

        async def run() -> None:
            usage = None
            try:
                async with asyncio.timeout(FETCH_SECONDS):
                    usage = await fetch()
            except Exception as error:  # the engine is gone, or answered nonsense
                _log.info("the usage of a cut stream could not be fetched: %s", error)
            finally:
                if usage is None:
                    report.withdraw()
                else:
                    report.deliver(usage)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def from_edge(self, report: UsageReport, key: str) -> None:
        """The usage an edge node kept under ``key`` (its engine's counts)."""

        async def fetch() -> wire.Usage | None:
            status, _, content = await self._upstream.probe(f"{self._root}{USAGE_PATH}/{key}")
            if status != 200:
                return None
            return msgspec.json.decode(content, type=KeptUsage).usage

        self._spawn(report, fetch)

    def from_vllm(
        self, report: UsageReport, request: AnyRequest, model: str, generated: int
    ) -> None:
        """The prompt's tokens as vLLM counts them, with ``generated``
        tokens (the chunks received with content)."""
        if getattr(request, "n", None) not in (None, 1):
            return  # several choices: vLLM counts each one's prompt
        if isinstance(request, wire.CompletionRequest):
            prompt = request.prompt
            if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
                # Token ids: counted here (vLLM's /tokenize takes text only).
                report.expect()
                report.deliver(_usage(len(prompt), generated))
                return
            if not isinstance(prompt, str):
                return  # several prompts
            body = wire.encoder.encode(_PromptTokenize(model, prompt))
        else:
            body = wire.encoder.encode(_ChatTokenize(model, request.messages, request.tools))

        async def fetch() -> wire.Usage | None:
            answer = await self._upstream.post(f"{self._root}/tokenize", body)
            return _usage(msgspec.json.decode(answer, type=_Tokenized).count, generated)

        self._spawn(report, fetch)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _usage(prompt: int, generated: int) -> wire.Usage:
    return wire.Usage(
        prompt_tokens=prompt,
        completion_tokens=generated,
        total_tokens=prompt + generated,
        prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=0),
    )
