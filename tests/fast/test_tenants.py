"""Tenants of one gateway stay apart on its edge nodes: the gateway names the
client's key in x-nomoat-tenant, and a node that trusts it (``nomoat edge``)
keeps a prompt cache and fair-queue turns per tenant. (On the real engines:
tests/test_prompt_cache.py.)"""

from __future__ import annotations

import pytest

from gateway import wire
from gateway.auth import TENANT_HEADER, tenant_of
from gateway.backends.openai_compat import OpenAICompatibleBackend, OpenAICompatibleConfig
from gateway.contract import Target
from gateway.testing import context as request_context
from tests.scripted_transport import ScriptedTransport, json_reply, sse_reply

pytestmark = pytest.mark.anyio

ANSWER = {
    "id": "x",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
CHUNK = {
    "id": "x",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}],
}


def test_the_owner_is_the_key_and_the_tenant_its_gateway_named() -> None:
    assert tenant_of("edgekey", {TENANT_HEADER: "0a1b2c3d4e5f"}) == "edgekey/0a1b2c3d4e5f"
    assert tenant_of(None, {TENANT_HEADER: "0a1b2c3d4e5f"}) == "/0a1b2c3d4e5f"
    assert tenant_of("edgekey", {}) == "edgekey"
    # Anything but a short id is ignored, not trusted half-way.
    for odd in ("", "a" * 65, "a/b", "a b", "é"):
        assert tenant_of("edgekey", {TENANT_HEADER: odd}) == "edgekey"


@pytest.mark.parametrize(("kind", "named"), [("edge", True), ("vllm", False), ("openai", False)])
async def test_requests_to_an_edge_node_name_the_clients_key(kind: str, named: bool) -> None:
    config = OpenAICompatibleConfig(base_url="http://up.test/v1", models=("m",))
    transport = ScriptedTransport(json_reply(ANSWER), sse_reply([CHUNK]), json_reply(ANSWER))
    backend = OpenAICompatibleBackend("up", kind, config, transport=transport)  # type: ignore[arg-type]
    request = wire.ChatCompletionRequest(model="m", messages=[wire.UserMessage(content="Hi")])
    target = Target(model="m", engine_model="m", deployment="m/0")
    # The client's own x-nomoat-tenant is never what is sent.
    ctx = request_context(api_key_id="0a1b2c3d4e5f", headers={TENANT_HEADER: "forged"})
    await backend.chat(request, target, ctx)
    chunks = [chunk async for chunk in backend.chat_stream(request, target, ctx)]
    assert len(chunks) == 1
    await backend.chat(request, target, request_context(api_key_id=None))
    expected = {TENANT_HEADER: "0a1b2c3d4e5f"} if named else None
    assert [sent.headers for sent in transport.sent] == [expected, expected, None]
