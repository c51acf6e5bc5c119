"""End to end: a live gateway with the real model and the redact hook enabled.

What leaves the gateway is observed twice: in the decision log, which records
the prompt as it was sent to the engine; and in the engine's own prompt token
count, which equals that of the same message with the masks typed in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.testing import MODEL, TEST_KEY, LiveGateway, gateway_config, running_gateway

SECRET = (
    "Contact jonathan.smithers-longname@example-university.edu or +1 (415) 555-2671; "
    "card 4111 1111 1111 1111, order 1234567890123. Say OK."
)
MASKED = "Contact [EMAIL] or [PHONE]; card [CARD], order 1234567890123. Say OK."

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveGateway, Path]]:
    directory = tmp_path_factory.mktemp("redact")
    log = directory / "decisions.jsonl"
    config = gateway_config(
        f"""
        decision_log = "{log}"
        decision_log_prompts = true

        [[hooks]]
        type = "redact"
        """
    )
    with running_gateway(directory, config) as live:
        yield live, log


def prompt_tokens(live: LiveGateway, content: str) -> int:
    sdk = openai.OpenAI(base_url=live.base_url, api_key=TEST_KEY, max_retries=0, timeout=120)
    reply = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=1
    )
    assert reply.usage is not None
    return reply.usage.prompt_tokens


def logged_prompts(log: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if log.exists():
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            if len(lines) >= count:
                return [str(line["prompt"]) for line in lines]
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} decisions logged in {log}")


def test_the_engine_sees_masks_not_personal_data(gateway: tuple[LiveGateway, Path]) -> None:
    live, log = gateway
    assert prompt_tokens(live, SECRET) == prompt_tokens(live, MASKED)
    sent, typed = logged_prompts(log, 2)
    assert sent == typed
    assert "[EMAIL]" in sent and "[PHONE]" in sent and "[CARD]" in sent
    assert "1234567890123" in sent  # not a card number: it survives
    assert "example-university" not in sent and "4111" not in sent and "555" not in sent
