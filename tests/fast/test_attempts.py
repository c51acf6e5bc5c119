"""The attempt loop, through HTTP: ranking, fallbacks, rounds, backoff,
Retry-After, the deadline, cooldown, and what is (not) retried."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import openai
import pytest

from gateway.errors import (
    ContextLengthExceededError,
    EngineOverloadedError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnsupportedFeatureError,
    UpstreamError,
)
from gateway.testing import Script

from .conftest import Start
from .support import (
    ENDPOINTS,
    MODEL,
    USER,
    all_calls,
    body_for,
    chat_body,
    config,
    deployments,
    error_of,
    gaps,
    pool,
    sse_json,
)

pytestmark = pytest.mark.anyio

# Scheduling noise allowed on a loaded machine (2 cores, many agents).
SLACK = 0.12


def down() -> UpstreamError:
    return UpstreamError("unreachable")


def full(retry_after: str | None = None) -> EngineOverloadedError:
    error = EngineOverloadedError("queue full")
    if retry_after is not None:
        error.headers["Retry-After"] = retry_after
    return error


def with_fallbacks(*fallbacks: str, **model: Any) -> str:
    """Model m on a and b; each fallback model on its own backend of its name."""
    backends: dict[str, dict[str, object]] = {"a": {}, "b": {}}
    models: dict[str, dict[str, object]] = {
        MODEL: {
            "deployments": [{"backend": "a"}, {"backend": "b"}],
            "fallbacks": list(fallbacks),
            "retry_backoff_seconds": 0.01,
            **model,
        }
    }
    for name in fallbacks:
        backends[name] = {}
        models[name] = {"deployments": [{"backend": name}]}
    return config(backends, models)


# ---------------------------------------------------------------------- ranking


@pytest.mark.parametrize(("policy", "first"), [("ordered", "m/0"), ("reverse", "m/2")])
async def test_the_best_ranked_deployment_answers(start: Start, policy: str, first: str) -> None:
    async with start(pool("a", "b", "c", policy=policy)) as gw:
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert deployments(all_calls(gw)) == [first]


@pytest.mark.parametrize("failing", [0, 1, 2])
@pytest.mark.parametrize(
    ("policy", "order"), [("ordered", ["m/0", "m/1", "m/2"]), ("reverse", ["m/2", "m/1", "m/0"])]
)
async def test_failures_walk_down_the_ranking(
    start: Start, policy: str, order: list[str], failing: int
) -> None:
    async with start(pool("a", "b", "c", policy=policy)) as gw:
        for deployment in order[:failing]:
            gw.backend("abc"[int(deployment[-1])]).script(Script(error=full()))
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert deployments(all_calls(gw)) == order[: failing + 1]


async def test_candidates_the_policy_leaves_out_are_never_tried(start: Start) -> None:
    async with start(pool("a", "b", policy="first-only", retries=0)) as gw:
        gw.backend("a").script(Script(error=down()))
        with pytest.raises(openai.InternalServerError):
            await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert gw.backend("b").calls == []


async def test_a_policy_that_ranks_nobody_is_a_503(start: Start) -> None:
    async with start(pool("a", policy="nobody", retries=0)) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body())
        assert error_of(response, 503)["code"] == "engine_overloaded"
        assert gw.backend("a").calls == []


# -------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_a_fallback_model_answers_once_the_pool_failed(start: Start, path: str) -> None:
    async with start(with_fallbacks("f", retries=0)) as gw:
        gw.backend("a").script(Script(error=down()))
        gw.backend("b").script(Script(error=full()))
        response = await gw.http.post(path, json=body_for(path))
        assert response.status_code == 200
        assert deployments(all_calls(gw)) == ["m/0", "m/1", "f/0"]


async def test_fallbacks_are_tried_in_order(start: Start) -> None:
    async with start(with_fallbacks("f", "g", retries=0)) as gw:
        for name in ("a", "b", "f"):
            gw.backend(name).script(Script(error=down()))
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert deployments(all_calls(gw)) == ["m/0", "m/1", "f/0", "g/0"]


async def test_each_round_tries_the_pool_then_the_fallbacks(start: Start) -> None:
    async with start(with_fallbacks("f", retries=1, retry_after_cap_seconds=0.01)) as gw:
        for name in ("a", "b", "f"):
            gw.backend(name).default = Script(error=full())
        response = await gw.http.post("/v1/chat/completions", json=chat_body())
        error_of(response, 503)
        assert deployments(all_calls(gw)) == ["m/0", "m/1", "f/0"] * 2


async def test_no_fallback_after_an_error_that_is_the_clients(start: Start) -> None:
    async with start(with_fallbacks("f")) as gw:
        gw.backend("a").script(Script(error=InvalidRequestError("bad value", param="seed")))
        error = error_of(await gw.http.post("/v1/chat/completions", json=chat_body()), 400)
        assert (error["message"], error["param"]) == ("bad value", "seed")
        assert deployments(all_calls(gw)) == ["m/0"]


# ----------------------------------------------------------------------- rounds


@pytest.mark.parametrize("retries", [0, 1, 2, 3])
async def test_retries_is_the_number_of_extra_rounds(start: Start, retries: int) -> None:
    async with start(pool("a", retries=retries, retry_backoff_seconds=0.001)) as gw:
        gw.backend("a").default = Script(error=down())
        response = await gw.http.post("/v1/chat/completions", json=chat_body())
        assert error_of(response, 502)["code"] == "upstream_error"
        assert len(gw.backend("a").calls) == retries + 1


async def test_every_round_goes_over_the_whole_pool(start: Start) -> None:
    async with start(pool("a", "b", retries=2, retry_after_cap_seconds=0.001)) as gw:
        for name in ("a", "b"):
            gw.backend(name).default = Script(error=full())
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body()), 503)
        assert deployments(all_calls(gw)) == ["m/0", "m/1"] * 3


async def test_a_later_round_that_succeeds_ends_the_loop(start: Start) -> None:
    async with start(pool("a", retries=5, retry_backoff_seconds=0.001)) as gw:
        gw.backend("a").script(Script(error=down()), Script(error=down()))
        answer = await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert answer.choices[0].message.content
        assert len(gw.backend("a").calls) == 3


@pytest.mark.parametrize(
    ("errors", "status"),
    [((full(), down()), 502), ((down(), full()), 503)],
    ids=["overloaded-then-down", "down-then-overloaded"],
)
async def test_the_client_gets_the_last_failure(
    start: Start, errors: tuple[GatewayError, GatewayError], status: int
) -> None:
    async with start(pool("a", "b", retries=0)) as gw:
        gw.backend("a").script(Script(error=errors[0]))
        gw.backend("b").script(Script(error=errors[1]))
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body()), status)


async def test_an_overloaded_answer_keeps_its_retry_after_header(start: Start) -> None:
    async with start(pool("a", retries=0)) as gw:
        gw.backend("a").script(Script(error=EngineOverloadedError("full", retry_after_seconds=7)))
        response = await gw.http.post("/v1/chat/completions", json=chat_body())
        error_of(response, 503)
        assert response.headers["retry-after"] == "7"


# --------------------------------------------------------- backoff, Retry-After


async def test_backoff_is_jittered_between_half_and_one_and_a_half_times(start: Start) -> None:
    backoff = 0.08
    async with start(pool("a", retries=6, retry_backoff_seconds=backoff)) as gw:
        gw.backend("a").default = Script(error=down())
        await gw.http.post("/v1/chat/completions", json=chat_body())
        pauses = gaps(gw.backend("a").calls)
    assert len(pauses) == 6
    assert all(0.5 * backoff - 0.002 <= pause <= 1.5 * backoff + SLACK for pause in pauses), pauses
    # Jittered: six uniform draws over an 80 ms range do not all fall within 8 ms.
    assert max(pauses) - min(pauses) > 0.008, pauses


async def test_moving_on_within_a_round_does_not_wait(start: Start) -> None:
    async with start(pool("a", "b", retry_backoff_seconds=0.5)) as gw:
        gw.backend("a").script(Script(error=down()))
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        [pause] = gaps(all_calls(gw))
    assert pause < 0.1


async def test_retry_after_is_honoured_over_a_shorter_backoff(start: Start) -> None:
    async with start(pool("a", retries=1, retry_backoff_seconds=0.01)) as gw:
        gw.backend("a").script(Script(error=UpstreamError("busy", headers={"Retry-After": "0.2"})))
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        [pause] = gaps(gw.backend("a").calls)
    assert 0.2 - 0.002 <= pause <= 0.2 + SLACK


@pytest.mark.parametrize("retry_after", ["30", "1"])
async def test_retry_after_is_capped(start: Start, retry_after: str) -> None:
    cap = 0.1
    model = {"retries": 1, "retry_backoff_seconds": 0.01, "retry_after_cap_seconds": cap}
    async with start(pool("a", **model)) as gw:
        gw.backend("a").script(Script(error=full(retry_after)))
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        [pause] = gaps(gw.backend("a").calls)
    assert cap - 0.002 <= pause <= cap + SLACK


# --------------------------------------------------------------------- deadline


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ENDPOINTS)
async def test_the_deadline_ends_a_stalled_attempt(start: Start, path: str, stream: bool) -> None:
    deadline = 0.15
    async with start(pool("a", timeout_seconds=deadline, retries=0)) as gw:
        gw.backend("a").script(Script(stall_after=0))
        started = time.monotonic()
        response = await gw.http.post(path, json=body_for(path, stream=stream))
        elapsed = time.monotonic() - started
        error = error_of(response, 504)
        [call] = gw.backend("a").calls
        assert await call.wait_ended() in ("cancelled", "closed")
    assert "timeout" in error["message"] and error["code"] == "timeout"
    assert deadline - 0.002 <= elapsed <= deadline + SLACK


async def test_the_deadline_covers_retries_and_backoffs(start: Start) -> None:
    deadline = 0.3
    model = {"timeout_seconds": deadline, "retries": 5, "retry_backoff_seconds": 0.2}
    async with start(pool("a", **model)) as gw:
        gw.backend("a").default = Script(error=down(), delay=0.02)
        started = time.monotonic()
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body()), 504)
        elapsed = time.monotonic() - started
    assert elapsed <= deadline + SLACK


async def test_no_attempt_starts_after_the_deadline(start: Start) -> None:
    deadline = 0.1
    model = {"timeout_seconds": deadline, "retries": 5, "retry_backoff_seconds": 0.01}
    async with start(pool("a", **model)) as gw:
        gw.backend("a").default = Script(stall_after=0)
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body()), 504)
        calls = gw.backend("a").calls
    assert all(call.started_at - calls[0].started_at < deadline for call in calls)


async def test_the_deadline_does_not_cut_a_stream_that_started(start: Start) -> None:
    async with start(pool("a", timeout_seconds=0.1)) as gw:
        gw.backend("a").script(Script(chunks=5, chunk_delay=0.04))
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        _, done = sse_json(response.content)
        assert done
        assert gw.backend("a").calls[0].outcome == "streamed"


async def test_an_answer_within_the_deadline_is_served(start: Start) -> None:
    async with start(pool("a", timeout_seconds=1.0)) as gw:
        gw.backend("a").script(Script(delay=0.05))
        answer = await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert answer.choices[0].message.content


# --------------------------------------------------------------------- cooldown


async def test_an_unreachable_deployment_cools_down(start: Start) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(error=down()))
        for _ in range(3):
            await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert deployments(all_calls(gw)) == ["m/0", "m/1", "m/1", "m/1"]


async def test_an_overloaded_deployment_does_not_cool_down(start: Start) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(error=full()))
        for _ in range(2):
            await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert deployments(all_calls(gw)) == ["m/0", "m/1", "m/0"]


@pytest.mark.parametrize(("size", "tried"), [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)])
async def test_never_more_than_half_a_pool_cools_down(start: Start, size: int, tried: int) -> None:
    names = "abcde"[:size]
    async with start(pool(*names, retries=0)) as gw:
        for name in names:
            gw.backend(name).default = Script(error=down())
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body()), 502)
        first = len(all_calls(gw))
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body()), 502)
        second = all_calls(gw)[first:]
    assert first == size
    # Those that failed first come back first.
    assert deployments(second) == [f"m/{i}" for i in range(tried)]


async def test_a_deployment_whose_probe_fails_is_skipped(start: Start) -> None:
    async with start(pool("a", "b", fakes={"a": {"ready": False}})) as gw:
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert deployments(all_calls(gw)) == ["m/1"]


async def test_a_pool_whose_probes_all_fail_still_tries_half(start: Start) -> None:
    fakes = {"a": {"ready": False}, "b": {"ready": False}}
    async with start(pool("a", "b", fakes=fakes)) as gw:
        await gw.sdk.chat.completions.create(model=MODEL, messages=USER)
        assert deployments(all_calls(gw)) == ["m/0"]


# ------------------------------------------------------ what is (not) retried

NOT_RETRIED = [
    (InvalidRequestError("bad", param="temperature"), 400, "invalid_request_error", None),
    (
        ContextLengthExceededError("too long", param="messages"),
        400,
        None,
        "context_length_exceeded",
    ),
    (UnsupportedFeatureError("no tools here", param="tools"), 400, None, "unsupported_parameter"),
    (PermissionDeniedError("no"), 403, None, "permission_denied"),
    (NotFoundError("no such engine model"), 404, None, "model_not_found"),
    (RateLimitError("slow down"), 429, "rate_limit_error", "rate_limit_exceeded"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("error", "status", "kind", "code"),
    NOT_RETRIED,
    ids=[type(e[0]).__name__ for e in NOT_RETRIED],
)
async def test_an_error_of_the_clients_is_not_retried(
    start: Start,
    error: GatewayError,
    status: int,
    kind: str | None,
    code: str | None,
    stream: bool,
) -> None:
    async with start(with_fallbacks("f")) as gw:
        gw.backend("a").script(Script(error=error))
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=stream))
        body = error_of(response, status)
        assert body["message"] == error.message
        assert (kind or body["type"], code or body["code"]) == (body["type"], body["code"])
        assert deployments(all_calls(gw)) == ["m/0"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_bug_in_a_backend_is_a_500_without_internals(start: Start, stream: bool) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(error=RuntimeError("secret internals")))
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=stream))
        body = error_of(response, 500)
        assert "secret" not in response.text and body["code"] == "internal_error"
        assert deployments(all_calls(gw)) == ["m/0"]


@pytest.mark.parametrize("error", [down(), full()], ids=["upstream", "overloaded"])
@pytest.mark.parametrize("stream", [False, True])
async def test_retryable_errors_move_on(start: Start, error: GatewayError, stream: bool) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(error=error))
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=stream))
        assert response.status_code == 200
        assert deployments(all_calls(gw)) == ["m/0", "m/1"]


# ------------------------------------------------------------ after the first byte


@pytest.mark.parametrize("after", [1, 3])
@pytest.mark.parametrize(
    "error",
    [down(), full(), InvalidRequestError("stopped", param="stop")],
    ids=["upstream", "overloaded", "invalid"],
)
@pytest.mark.parametrize("path", ENDPOINTS)
async def test_after_the_first_byte_nothing_is_retried(
    start: Start, path: str, error: GatewayError, after: int
) -> None:
    async with start(with_fallbacks("f", retries=2)) as gw:
        gw.backend("a").script(Script(error=error, error_after=after))
        response = await gw.http.post(path, json=body_for(path, stream=True))
        assert response.status_code == 200
        events, done = sse_json(response.content)
        assert not done
        assert len(events) == after + 1
        assert events[-1] == msgspec.to_builtins(error.body())
        assert deployments(all_calls(gw)) == ["m/0"]


async def test_a_bug_after_the_first_byte_ends_the_stream_with_an_internal_error(
    start: Start,
) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(error=RuntimeError("secret"), error_after=2))
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        events, done = sse_json(response.content)
        assert not done and "secret" not in response.text
        assert events[-1]["error"]["code"] == "internal_error"
        assert deployments(all_calls(gw)) == ["m/0"]


async def test_the_sdk_raises_on_a_stream_that_fails_half_way(start: Start) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(error=down(), error_after=2))
        stream = await gw.sdk.chat.completions.create(model=MODEL, messages=USER, stream=True)
        received = []
        with pytest.raises(openai.APIError, match="unreachable"):
            async for chunk in stream:
                received.append(chunk)
        assert len(received) == 2
