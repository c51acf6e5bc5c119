"""Tests of the template plugin: how to test a hook and a policy with the
fixtures nomoat installs for pytest (``nomoat_hooks``, ``nomoat_gateway``) and
the helpers of :mod:`gateway.testing`. All but the last run in milliseconds,
without a server or a model."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import openai
import pytest
from nomoat_template import BlocklistHook, ReverseOrderPolicy, manifest
from pydantic import ValidationError

from gateway.contract import PermissionDeniedError
from gateway.testing import (
    MODEL,
    HookRunner,
    LiveGateway,
    build_hook,
    build_policy,
    candidates,
    chat_request,
    gateway_config,
    rank,
)

Hooks = Callable[..., HookRunner]
NomoatGateway = Callable[..., AbstractContextManager[LiveGateway]]


@pytest.fixture
def blocklist() -> object:
    # Built through the manifest, from options as a [[hooks]] entry gives them.
    return build_hook(manifest, {"blocked_users": ["mallory"]}, name="blocklist")


def test_a_blocked_user_is_refused_with_403(nomoat_hooks: Hooks, blocklist: object) -> None:
    with pytest.raises(PermissionDeniedError) as refused:
        nomoat_hooks(blocklist).on_request(chat_request(user="mallory"))
    assert refused.value.status_code == 403
    assert refused.value.param == "user"
    assert isinstance(blocklist, BlocklistHook) and blocklist.rejected == 1


def test_other_users_pass_unchanged(nomoat_hooks: Hooks, blocklist: object) -> None:
    run = nomoat_hooks(blocklist)
    for request in (chat_request(user="alice"), chat_request()):
        assert run.on_request(request) is request


def test_unknown_options_are_config_errors() -> None:
    with pytest.raises(ValidationError, match="extra"):
        build_hook(manifest, {"blocked": ["mallory"]}, name="blocklist")


def test_the_policy_ranks_in_reverse_with_scores_and_reasons() -> None:
    policy = build_policy(manifest, {}, name="reverse-order")
    assert isinstance(policy, ReverseOrderPolicy)
    pool = candidates(3)
    ranked = rank(policy, pool)
    assert [r.candidate for r in ranked] == pool[::-1]
    assert [r.score for r in ranked] == [3.0, 2.0, 1.0]
    assert ranked[0].reason == "position 2 of 3, reversed"


def test_the_policy_takes_no_options() -> None:
    with pytest.raises(ValidationError):
        build_policy(manifest, {"seed": 1}, name="reverse-order")


@pytest.mark.e2e
@pytest.mark.slow
def test_end_to_end_with_the_real_model(nomoat_gateway: NomoatGateway) -> None:
    """The template enabled by config in a live gateway (a few seconds)."""
    config = gateway_config(
        """
        [[hooks]]
        type = "blocklist"
        options = { blocked_users = ["mallory"] }
        """
    )
    with nomoat_gateway(config) as gw:
        sdk = openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, max_retries=0, timeout=60)
        hello: Any = [{"role": "user", "content": "Hi"}]
        with pytest.raises(openai.PermissionDeniedError):
            sdk.chat.completions.create(model=MODEL, messages=hello, user="mallory")
        reply = sdk.chat.completions.create(model=MODEL, messages=hello, max_tokens=2, user="bob")
        assert reply.choices[0].finish_reason in ("stop", "length")
