"""The cache hook's logic, run through a HookChain as the gateway runs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from nomoat_cache import CacheConfig, ResponseCache, cache_key, manifest
from pydantic import ValidationError

from gateway.contract import (
    AnyRequest,
    AnyResponse,
    ChatCompletion,
    Completion,
    InvalidRequestError,
)
from gateway.testing import (
    HookRunner,
    build_hook,
    chat_completion,
    chat_request,
    completion,
    completion_request,
    context,
)

Hooks = Callable[..., HookRunner]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache(clock: Clock | None = None, **options: Any) -> ResponseCache:
    return ResponseCache(CacheConfig(**options), clock or Clock())


def fill(
    run: HookRunner, request: AnyRequest, answer: AnyResponse, request_id: str = "r-1"
) -> None:
    """A miss, then the backend's answer passing back through the hooks."""
    ctx = context(request_id)
    assert run.on_request(request, ctx) is request
    run.on_response(request, answer, ctx)


def test_a_repeated_request_is_answered_from_the_cache(nomoat_hooks: Hooks) -> None:
    hook = cache()
    run = nomoat_hooks(hook)
    request = chat_request("Hi", temperature=0)
    fill(run, request, chat_completion("Hello there", id="r-1", created=1))
    hit = run.on_request(chat_request("Hi", temperature=0), context("r-2", created=7))
    assert isinstance(hit, ChatCompletion)
    assert hit.choices[0].message.content == "Hello there"
    assert (hit.id, hit.created) == ("r-2", 7)  # a fresh id: the request it answers
    assert hit.usage.total_tokens == 7  # the original usage
    assert (hook.hits, hook.misses) == (1, 1)


def test_hits_are_copies_that_later_hooks_cannot_spoil(nomoat_hooks: Hooks) -> None:
    run = nomoat_hooks(cache())
    request = chat_request("Hi", seed=3)
    fill(run, request, chat_completion("original"))
    first = run.on_request(request, context("r-2"))
    assert isinstance(first, ChatCompletion)
    first.choices[0].message.content = "changed downstream"
    second = run.on_request(request, context("r-3"))
    assert isinstance(second, ChatCompletion)
    assert second.choices[0].message.content == "original"


def test_answers_are_never_shared_across_api_keys(nomoat_hooks: Hooks) -> None:
    run = nomoat_hooks(cache())
    request = chat_request("Hi", temperature=0)
    ctx = context("r-1", api_key_id="alice")
    run.on_request(request, ctx)
    run.on_response(request, chat_completion(), ctx)
    assert run.on_request(request, context("r-2", api_key_id="bob")) is request
    assert run.on_request(request, context("r-3", api_key_id=None)) is request
    assert isinstance(run.on_request(request, context("r-4", api_key_id="alice")), ChatCompletion)


def test_only_deterministic_requests_are_cached_by_default(nomoat_hooks: Hooks) -> None:
    hook = cache()
    run = nomoat_hooks(hook)
    for sampled in (chat_request("Hi"), chat_request("Hi", temperature=0.7)):
        fill(run, sampled, chat_completion())
        assert run.on_request(sampled, context("again")) is sampled
    assert len(hook) == 0
    assert (hook.hits, hook.misses) == (0, 0)


def test_sampled_requests_are_cached_when_configured(nomoat_hooks: Hooks) -> None:
    run = nomoat_hooks(cache(deterministic_only=False))
    request = chat_request("Hi", temperature=0.7)
    fill(run, request, chat_completion())
    assert isinstance(run.on_request(request, context("r-2")), ChatCompletion)


def test_stream_and_user_do_not_change_the_key() -> None:
    plain = chat_request("Hi", temperature=0)
    streamed = chat_request(
        "Hi", temperature=0, stream=True, stream_options={"include_usage": True}, user="u"
    )
    assert cache_key(plain, "k") == cache_key(streamed, "k")
    assert cache_key(plain, "k") != cache_key(chat_request("Hi", temperature=0, n=2), "k")
    assert cache_key(plain, "k") != cache_key(chat_request("Hi!", temperature=0), "k")


def test_key_is_canonical_over_object_key_order() -> None:
    one = chat_request("Hi", temperature=0, logit_bias={"1": 1, "2": -1})
    two = chat_request("Hi", temperature=0, logit_bias={"2": -1, "1": 1})
    assert cache_key(one, None) == cache_key(two, None)


def test_a_streamed_request_is_answered_but_not_stored(nomoat_hooks: Hooks) -> None:
    hook = cache()
    run = nomoat_hooks(hook)
    streamed = chat_request("Hi", temperature=0, stream=True)
    assert run.on_request(streamed, context("r-1")) is streamed
    assert len(hook) == 0
    fill(run, chat_request("Hi", temperature=0), chat_completion("cached"), "r-2")
    hit = run.on_request(streamed, context("r-3"))
    assert isinstance(hit, ChatCompletion)
    assert hit.choices[0].message.content == "cached"


def test_entries_expire_after_the_ttl(nomoat_hooks: Hooks) -> None:
    clock = Clock()
    run = nomoat_hooks(cache(clock, ttl_seconds=10))
    request = chat_request("Hi", temperature=0)
    fill(run, request, chat_completion())
    clock.now += 9.9
    assert isinstance(run.on_request(request, context("r-2")), ChatCompletion)
    clock.now += 0.2
    assert run.on_request(request, context("r-3")) is request


def test_least_recently_used_entries_go_first(nomoat_hooks: Hooks) -> None:
    hook = cache(max_entries=2)
    run = nomoat_hooks(hook)
    a, b, c = (chat_request(text, temperature=0) for text in "abc")
    fill(run, a, chat_completion("a"), "1")
    fill(run, b, chat_completion("b"), "2")
    assert isinstance(run.on_request(a, context("3")), ChatCompletion)  # a is now recent
    fill(run, c, chat_completion("c"), "4")  # evicts b
    assert len(hook) == 2
    assert run.on_request(b, context("5")) is b
    assert isinstance(run.on_request(a, context("6")), ChatCompletion)


def test_the_key_is_the_request_as_the_cache_saw_it(nomoat_hooks: Hooks) -> None:
    """A later hook (a classifier) that changes the model does not split the key."""
    run = nomoat_hooks(cache())
    asked = chat_request("Hi", model="auto", temperature=0)
    ctx = context("r-1")
    run.on_request(asked, ctx)
    routed = chat_request("Hi", model="small", temperature=0)
    run.on_response(routed, chat_completion(model="small"), ctx)
    hit = run.on_request(asked, context("r-2"))
    assert isinstance(hit, ChatCompletion)
    assert hit.model == "small"


def test_a_failed_request_is_forgotten(nomoat_hooks: Hooks) -> None:
    hook = cache()
    run = nomoat_hooks(hook)
    request = chat_request("Hi", temperature=0)
    ctx = context("r-1")
    run.on_request(request, ctx)
    run.on_error(request, InvalidRequestError("too long"), ctx)
    run.on_response(request, chat_completion(), ctx)  # (cannot happen; proves the forget)
    assert len(hook) == 0


def test_completions_are_cached_separately_from_chat(nomoat_hooks: Hooks) -> None:
    run = nomoat_hooks(cache())
    request = completion_request("Once upon a time", temperature=0)
    fill(run, request, completion(" there was"))
    hit = run.on_request(request, context("cmpl-2"))
    assert isinstance(hit, Completion)
    assert (hit.id, hit.choices[0].text) == ("cmpl-2", " there was")
    assert cache_key(request, None) != cache_key(chat_request("Once upon a time"), None)


def test_the_manifest_offers_the_hook_with_a_strict_config() -> None:
    hook = build_hook(manifest, {"ttl_seconds": 5, "max_entries": 3}, name="cache")
    assert isinstance(hook, ResponseCache)
    assert hook.config.max_entries == 3
    with pytest.raises(ValidationError, match="extra"):
        build_hook(manifest, {"ttl": 5}, name="cache")
    with pytest.raises(ValidationError):
        build_hook(manifest, {"max_entries": 0}, name="cache")
