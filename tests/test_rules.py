"""Rules pick a model's pool: by prompt size, header, or API key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import hash_api_key, key_fingerprint
from gateway.catalog import plan
from gateway.contract import RequestContext
from gateway.registry import discover
from gateway.rules import estimate_prompt_tokens, select_pool
from gateway.settings import ConfigError, load_settings
from gateway.wire import ChatCompletionRequest, UserMessage

GOLD = hash_api_key("sk-gold-customer-key-0001")

CONFIG = f"""
[backends.edge]
type = "edge"
base_url = "http://127.0.0.1:9/v1"
models = ["m"]

[backends.gpu]
type = "vllm"
base_url = "http://127.0.0.1:9/v1"
models = ["m"]

[models.chat]
deployments = [
  {{ backend = "edge", model = "m" }},
  {{ backend = "gpu", model = "m", name = "big" }},
]

[[models.chat.rules]]
pool = ["big"]
api_key_hashes = ["{GOLD}"]

[[models.chat.rules]]
pool = ["big"]
header = "X-Tier: batch"

[[models.chat.rules]]
pool = ["big"]
min_prompt_tokens = 1000

[[models.chat.rules]]
pool = ["edge"]
max_prompt_tokens = 999
"""


@pytest.fixture
def entry(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = tmp_path / "rules.toml"
    config.write_text(CONFIG)
    return plan(load_settings(config), discover()).catalog.resolve("chat")


def chat(characters: int) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="chat", messages=[UserMessage(content="x" * characters)])


def pool(entry, request: ChatCompletionRequest, ctx: RequestContext) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        c.backend
        for c in select_pool(entry.candidates, entry.rules, estimate_prompt_tokens(request), ctx)
    ]


def test_prompt_size_sends_long_prompts_to_the_big_pool(entry) -> None:  # type: ignore[no-untyped-def]
    ctx = RequestContext("r", 0)
    assert estimate_prompt_tokens(chat(4000)) == 1000
    assert pool(entry, chat(4000), ctx) == ["gpu"]
    assert pool(entry, chat(3996), ctx) == ["edge"]


def test_a_header_or_an_api_key_picks_the_pool(entry) -> None:  # type: ignore[no-untyped-def]
    batch = RequestContext("r", 0, headers={"x-tier": "batch"})
    assert pool(entry, chat(10), batch) == ["gpu"]
    gold = RequestContext("r", 0, api_key_id=key_fingerprint(GOLD))
    assert pool(entry, chat(10), gold) == ["gpu"]
    other = RequestContext("r", 0, api_key_id="0123456789ab", headers={"x-tier": "online"})
    assert pool(entry, chat(10), other) == ["edge"]


def test_rules_naming_unknown_deployments_are_reported(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(CONFIG.replace('pool = ["edge"]', 'pool = ["edgy"]'))
    with pytest.raises(ConfigError) as caught:
        plan(load_settings(config), discover())
    assert caught.value.problems == ['models.chat.rules[3].pool: unknown deployment "edgy"']


def test_an_alias_resolves_to_its_model(tmp_path: Path) -> None:
    config = tmp_path / "aliases.toml"
    config.write_text(
        CONFIG.replace("[models.chat]\n", '[models.chat]\naliases = ["gpt-4o-mini"]\n')
    )
    catalog = plan(load_settings(config), discover()).catalog
    assert catalog.resolve("gpt-4o-mini") is catalog.resolve("chat")


def test_an_alias_may_not_shadow_a_model(tmp_path: Path) -> None:
    config = tmp_path / "aliases.toml"
    config.write_text(CONFIG.replace("[models.chat]\n", '[models.chat]\naliases = ["chat"]\n'))
    with pytest.raises(ConfigError) as caught:
        plan(load_settings(config), discover())
    assert caught.value.problems == ['models.chat.aliases[0]: "chat" already names a model']
