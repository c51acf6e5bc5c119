"""End to end: a live gateway with the real model and the cache hook enabled.

A hit is proven by the engine itself: its own count of evaluated tokens
(``nomoat_engine_decoded_tokens_total`` on /metrics) does not move.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.testing import MODEL, TEST_KEY, LiveGateway, gateway_config, running_gateway

OTHER_KEY = "sk-nomoat-plugin-test-other-key-42"
POEM: Any = [{"role": "user", "content": "Write a long poem about the sea."}]
CONFIG = """
[[hooks]]
type = "cache"
options = { ttl_seconds = 600, max_entries = 16 }
"""

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    config = gateway_config(CONFIG, api_keys=(TEST_KEY, OTHER_KEY))
    with running_gateway(tmp_path_factory.mktemp("cache"), config) as live:
        yield live


def client(gateway: LiveGateway, key: str = TEST_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120)


def decoded_tokens(gateway: LiveGateway) -> int:
    text = httpx.get(f"{gateway.root_url}/metrics", timeout=10).text
    # prometheus-client writes floats ("1234.0", "1.234567e+06").
    match = re.search(r"^nomoat_engine_decoded_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    assert match, text
    return int(float(match.group(1)))


def ask(sdk: openai.OpenAI, **options: Any) -> tuple[str, str, int, float]:
    started = time.monotonic()
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=POEM,
        max_tokens=24,
        **options,
    )
    elapsed = time.monotonic() - started
    assert reply.usage is not None
    return reply.id, reply.choices[0].message.content or "", reply.usage.total_tokens, elapsed


def test_a_repeated_deterministic_request_is_a_hit(gateway: LiveGateway) -> None:
    sdk = client(gateway)
    before = decoded_tokens(gateway)
    first_id, content, total, slow = ask(sdk, temperature=0)
    after_miss = decoded_tokens(gateway)
    assert after_miss > before  # the engine worked
    second_id, again, total_again, fast = ask(sdk, temperature=0)
    assert decoded_tokens(gateway) == after_miss  # ...and not this time
    assert (again, total_again) == (content, total)
    assert second_id != first_id  # every response has its own id
    assert fast < slow


def test_a_streamed_request_is_answered_from_the_cache(gateway: LiveGateway) -> None:
    sdk = client(gateway)
    _, content, total, _ = ask(sdk, temperature=0, seed=11)
    before = decoded_tokens(gateway)
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=POEM,
        max_tokens=24,
        temperature=0,
        seed=11,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == total
    assert decoded_tokens(gateway) == before


def test_another_api_key_does_not_see_the_answer(gateway: LiveGateway) -> None:
    ask(client(gateway), temperature=0, seed=5)
    before = decoded_tokens(gateway)
    ask(client(gateway, OTHER_KEY), temperature=0, seed=5)
    assert decoded_tokens(gateway) > before


def test_sampled_requests_are_not_cached(gateway: LiveGateway) -> None:
    sdk = client(gateway)
    ask(sdk, temperature=0.8)
    before = decoded_tokens(gateway)
    ask(sdk, temperature=0.8)
    assert decoded_tokens(gateway) > before
