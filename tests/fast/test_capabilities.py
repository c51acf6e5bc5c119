"""A deployment whose backend lacks a feature the request uses is no
candidate for it; when none can serve it, the client gets a 400 naming the
feature and the model."""

from __future__ import annotations

import re
from typing import Any

import openai
import pytest

from gateway.testing.inprocess import InProcessGateway

from .conftest import Start
from .plugins import Spy
from .support import MODEL, all_calls, chat_body, completion_body, deployments, error_of, pool

pytestmark = pytest.mark.anyio

TOOL = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
SCHEMA = {"name": "answer", "schema": {"type": "object"}}

# (case, request fields, the capability it needs, the param the 400 names)
FEATURES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("tools", {"tools": [TOOL]}, {"tools": True}, "tools"),
    (
        "json_schema",
        {"response_format": {"type": "json_schema", "json_schema": SCHEMA}},
        {"json_schema": True},
        "response_format",
    ),
    (
        "json_object",
        {"response_format": {"type": "json_object"}},
        {"json_schema": True},
        "response_format",
    ),
    ("logprobs", {"logprobs": True}, {"logprobs": True}, "logprobs"),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 2}, {"logprobs": True}, "logprobs"),
    ("n", {"n": 2}, {"max_n": 2}, "n"),
]
COMPLETION_FEATURES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("logprobs", {"logprobs": 2}, {"logprobs": True}, "logprobs"),
    ("n", {"n": 3}, {"max_n": 3}, "n"),
]
IDS = [case[0] for case in FEATURES]


def spy(gw: InProcessGateway) -> Spy:
    policy = gw.runtime.plan.catalog.models[MODEL].policy
    assert isinstance(policy, Spy)
    return policy


@pytest.mark.parametrize(("case", "fields", "able", "param"), FEATURES, ids=IDS)
async def test_a_request_goes_to_a_deployment_that_can_serve_it(
    start: Start, case: str, fields: dict[str, Any], able: dict[str, Any], param: str
) -> None:
    async with start(pool("a", "b", fakes={"b": able}, policy="spy")) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(**fields))
        assert response.status_code == 200, response.text
        assert deployments(all_calls(gw)) == ["m/1"]
        # The policy never saw the deployment that cannot serve it.
        assert spy(gw).seen == [["m/1"]]


@pytest.mark.parametrize(("case", "fields", "able", "param"), FEATURES, ids=IDS)
async def test_when_no_deployment_can_serve_a_feature_it_is_a_400(
    start: Start, case: str, fields: dict[str, Any], able: dict[str, Any], param: str
) -> None:
    async with start(pool("a", "b", name="ranker-7b")) as gw:
        with pytest.raises(openai.BadRequestError) as raised:
            await gw.sdk.chat.completions.create(**chat_body(model="ranker-7b", **fields))
        assert all_calls(gw) == []
    error = raised.value
    assert (error.param, error.code) == (param, "unsupported_parameter")
    assert re.search(rf"\b{param}\b", error.message) and "ranker-7b" in error.message


@pytest.mark.parametrize(
    ("case", "fields", "able", "param"),
    COMPLETION_FEATURES,
    ids=[c[0] for c in COMPLETION_FEATURES],
)
async def test_completions_are_checked_too(
    start: Start, case: str, fields: dict[str, Any], able: dict[str, Any], param: str
) -> None:
    async with start(pool("a", "b", fakes={"b": able})) as gw:
        served = await gw.http.post("/v1/completions", json=completion_body(**fields))
        assert served.status_code == 200 and deployments(all_calls(gw)) == ["m/1"]
    async with start(pool("a")) as gw:
        response = await gw.http.post("/v1/completions", json=completion_body(**fields))
        error = error_of(response, 400)
        assert (error["param"], error["code"]) == (param, "unsupported_parameter")


async def test_the_lowest_cost_policy_never_sees_an_unable_deployment(start: Start) -> None:
    config = pool("a", "b", fakes={"b": {"tools": True}}, policy="lowest-cost")
    # a is the cheaper one, but cannot call tools.
    config = config.replace('{ backend = "b" }', '{ backend = "b", input_usd_per_million = 9.0 }')
    async with start(config) as gw:
        await gw.http.post("/v1/chat/completions", json=chat_body(tools=[TOOL]))
        assert deployments(all_calls(gw)) == ["m/1"]


@pytest.mark.parametrize(("case", "fields", "able", "param"), FEATURES, ids=IDS)
async def test_an_able_first_deployment_is_served_as_ranked(
    start: Start, case: str, fields: dict[str, Any], able: dict[str, Any], param: str
) -> None:
    fakes = {"a": able, "b": able}
    async with start(pool("a", "b", fakes=fakes, policy="spy")) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(**fields))
        assert response.status_code == 200, response.text
        assert deployments(all_calls(gw)) == ["m/0"]
        assert spy(gw).seen == [["m/0", "m/1"]]


@pytest.mark.parametrize(
    "fields",
    [{}, {"response_format": {"type": "text"}}, {"n": 1}, {"logprobs": False}],
    ids=["plain", "text-format", "n=1", "no-logprobs"],
)
async def test_a_request_using_no_feature_goes_anywhere(
    start: Start, fields: dict[str, Any]
) -> None:
    async with start(pool("a", "b", policy="spy")) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(**fields))
        assert response.status_code == 200, response.text
        assert spy(gw).seen == [["m/0", "m/1"]]
