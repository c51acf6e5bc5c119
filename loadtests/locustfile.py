"""Locust users for nomoat's OpenAI-compatible API: chat and streaming chat.

Each user sends ``POST /v1/chat/completions`` with ``Authorization: Bearer
$NOMOAT_API_KEY``, half the time as a stream. Streams are read to the end
(``data: [DONE]``) and report two metrics of their own, besides Locust's own
row for the request (which, for a stream, is timed to the response headers):

  SSE "time to first token"   request sent -> first chunk with content
  SSE "stream complete"       request sent -> ``[DONE]``

A stream that ends without ``[DONE]``, or with an error event, is a failure.

    .venv/bin/pip install -e '.[load]'
    NOMOAT_API_KEY=... NOMOAT_MODEL=smollm2-135m-instruct \\
      .venv/bin/locust -f loadtests/locustfile.py --headless -u 4 -r 4 -t 10s \\
      --host http://127.0.0.1:8000

Environment: ``NOMOAT_API_KEY`` (none: no Authorization header),
``NOMOAT_MODEL`` (default ``smollm2-135m-instruct``), ``NOMOAT_MAX_TOKENS``
(default 32), ``NOMOAT_PROMPT``, ``NOMOAT_TIMEOUT`` (seconds to connect and
between reads, default 120: a request that hangs fails instead of stalling
its user). ``docs/benchmarks.md`` has a run against the
fake upstream (``loadtests/fake_upstream.py``) behind nomoat.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from locust import HttpUser, constant, events, task

MODEL = os.environ.get("NOMOAT_MODEL", "smollm2-135m-instruct")
MAX_TOKENS = int(os.environ.get("NOMOAT_MAX_TOKENS", "32"))
PROMPT = os.environ.get("NOMOAT_PROMPT", "Say hello in one short sentence.")
API_KEY = os.environ.get("NOMOAT_API_KEY")
TIMEOUT = float(os.environ.get("NOMOAT_TIMEOUT", "120"))
PATH = "/v1/chat/completions"


def _body(stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _has_content(chunk: dict[str, Any]) -> bool:
    return any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or ())


class ChatUser(HttpUser):  # type: ignore[misc]
    """One client of the gateway, sending request after request."""

    wait_time = constant(0)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    @task
    def chat(self) -> None:
        with self.client.post(
            PATH, json=_body(False), name="chat", catch_response=True, timeout=TIMEOUT
        ) as reply:
            if reply.status_code != 200:
                reply.failure(f"status {reply.status_code}: {reply.text[:200]}")
                return
            answer = reply.json()
            if not answer.get("choices") or "usage" not in answer:
                reply.failure(f"unexpected answer: {reply.text[:200]}")

    @task
    def chat_stream(self) -> None:
        sent = time.perf_counter()
        with self.client.post(
            PATH,
            json=_body(True),
            name="chat (stream)",
            stream=True,
            catch_response=True,
            timeout=TIMEOUT,
        ) as reply:
            if reply.status_code != 200:
                reply.failure(f"status {reply.status_code}: {reply.text[:200]}")
                return
            first_token: float | None = None
            done = False
            size = 0
            for line in reply.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                size += len(payload)
                if payload == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    reply.failure(f"error event: {payload[:200]!r}")
                    return
                if first_token is None and _has_content(chunk):
                    first_token = time.perf_counter() - sent
                    self._fire("time to first token", first_token, 0)
            if not done:
                reply.failure("the stream ended without [DONE]")
                return
            self._fire("stream complete", time.perf_counter() - sent, size)

    def _fire(self, name: str, seconds: float, length: int) -> None:
        events.request.fire(
            request_type="SSE",
            name=name,
            response_time=seconds * 1000,
            response_length=length,
            exception=None,
            context={},
        )
