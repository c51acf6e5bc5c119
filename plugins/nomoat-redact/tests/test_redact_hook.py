"""The redaction hook's logic, run through a HookChain as the gateway runs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from nomoat_redact import RedactConfig, Redactor, luhn_valid, manifest
from pydantic import ValidationError

from gateway.contract import ChatCompletionRequest, CompletionRequest
from gateway.testing import HookRunner, build_hook, chat_request, completion_request

Hooks = Callable[..., HookRunner]


def redact(text: str, **options: Any) -> str:
    return Redactor(RedactConfig(**options)).redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "jane.doe@example.com",
        "j.ohara+news@mail.example.co.uk",
        "ADMIN%ops@sub-domain.example.org",
    ],
)
def test_emails_are_masked(text: str) -> None:
    assert redact(f"Write to {text}, please.") == "Write to [EMAIL], please."


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1111",  # Visa test number
        "4111-1111-1111-1111",
        "5500005555555559",  # Mastercard
        "378282246310005",  # Amex, 15 digits
        "6011 1111 1111 1117",
    ],
)
def test_luhn_valid_card_numbers_are_masked(text: str) -> None:
    assert redact(f"card: {text}.") == "card: [CARD]."


@pytest.mark.parametrize(
    "text",
    [
        "order 1234567890123 shipped",  # fails Luhn
        "tracking 4111 1111 1111 1112",  # one digit off
        "id ORD-4111111111111111",  # part of an identifier
        "timestamp 1717171717171 ms",
        "42 apples and 7 pears",
        "on 2024-05-17 at 10:30",
        "version 1.2.3 on 192.168.100.200",
    ],
)
def test_ordinary_numbers_survive(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "+1 (415) 555-2671",
        "+14155552671",
        "+44 20 7946 0958",
        "+49 30 901820",
        "(415) 555-2671",
        "415-555-2671",
        "415.555.2671",
        "020 7946 0958",
    ],
)
def test_phone_numbers_are_masked(text: str) -> None:
    assert redact(f"Call {text} today") == "Call [PHONE] today"


def test_luhn() -> None:
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


def test_kinds_and_masks_are_configurable() -> None:
    text = "a@b.io, 4111111111111111, +14155552671"
    assert redact(text, kinds=["email"]) == "[EMAIL], 4111111111111111, +14155552671"
    assert redact(text, kinds=["card", "phone"]) == "a@b.io, [CARD], [PHONE]"
    assert redact(text, email_mask="<email>", card_mask="****") == "<email>, ****, [PHONE]"


def test_every_message_and_text_part_is_masked(nomoat_hooks: Hooks) -> None:
    request = chat_request(
        messages=[
            {"role": "system", "content": "Operator: ops@example.com"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "My card is 4111 1111 1111 1111"},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                    {"type": "text", "text": "order 1234567890123"},
                ],
            },
            {"role": "assistant", "content": "Noted, call +44 20 7946 0958?"},
            {"role": "tool", "tool_call_id": "c1", "content": "owner: bo@example.net"},
        ]
    )
    result = nomoat_hooks(Redactor(RedactConfig())).on_request(request)
    assert isinstance(result, ChatCompletionRequest)
    assert result is not request
    system, user, assistant, tool = result.messages
    assert system.content == "Operator: [EMAIL]"
    assert isinstance(user.content, list)
    texts = [getattr(part, "text", None) for part in user.content]
    assert texts == ["My card is [CARD]", None, "order 1234567890123"]
    assert assistant.content == "Noted, call [PHONE]?"
    assert tool.content == "owner: [EMAIL]"
    # The client's request object is not changed in place.
    assert request.messages[0].content == "Operator: ops@example.com"


def test_a_clean_request_is_passed_on_as_it_is(nomoat_hooks: Hooks) -> None:
    request = chat_request("What is the capital of France?")
    assert nomoat_hooks(Redactor(RedactConfig())).on_request(request) is request


def test_completion_prompts_are_masked(nomoat_hooks: Hooks) -> None:
    run = nomoat_hooks(Redactor(RedactConfig()))
    result = run.on_request(completion_request(["mail a@b.io", "plain"]))
    assert isinstance(result, CompletionRequest)
    assert result.prompt == ["mail [EMAIL]", "plain"]
    tokens = completion_request([[1, 2, 3]])
    assert run.on_request(tokens) is tokens


def test_the_manifest_offers_the_hook_with_a_strict_config() -> None:
    hook = build_hook(manifest, {"kinds": ["card"]}, name="redact")
    assert isinstance(hook, Redactor)
    with pytest.raises(ValidationError):
        build_hook(manifest, {"kinds": ["ssn"]}, name="redact")
    with pytest.raises(ValidationError):
        build_hook(manifest, {"kinds": []}, name="redact")
    with pytest.raises(ValidationError, match="extra"):
        build_hook(manifest, {"mask": "x"}, name="redact")
