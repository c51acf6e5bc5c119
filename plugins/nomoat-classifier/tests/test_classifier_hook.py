"""The classifier's features and rules, run through a HookChain."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from nomoat_classifier import (
    Classifier,
    ClassifierConfig,
    detect_language,
    estimate_tokens,
    features,
    looks_like_code,
    manifest,
)
from pydantic import ValidationError

from gateway.contract import ChatCompletionRequest, CompletionRequest
from gateway.testing import HookRunner, build_hook, chat_request, completion_request

Hooks = Callable[..., HookRunner]

PYTHON = """Why does this fail?

def total(items):
    result = 0
    for item in items:
        result += item.price
    return result
"""
JAVASCRIPT = "const xs = [1, 2, 3];\nxs.forEach((x) => {\n  console.log(x);\n});"
FENCED = "Explain:\n```\nls -la | wc -l\n```"
PROSE = (
    "If you have time for a walk, go to the river. For the view, return at sunset;\n"
    "the light is best then. While you wait, have a coffee."
)

RULES: list[dict[str, Any]] = [
    {"when": "code", "model": "coder"},
    {"when": "long", "min_chars": 200, "model": "big"},
    {"when": "language", "languages": ["de", "fr"], "model": "euro"},
    {"when": "short", "max_tokens": 3, "model": "tiny"},
]


def classifier(**options: Any) -> Classifier:
    options.setdefault("rules", RULES)
    return Classifier(ClassifierConfig(**options))


def routed(run: HookRunner, request: Any) -> str:
    result = run.on_request(request)
    assert isinstance(result, ChatCompletionRequest | CompletionRequest)
    return result.model


@pytest.mark.parametrize("text", [PYTHON, JAVASCRIPT, FENCED, "SELECT id FROM t;\nDROP TABLE t;"])
def test_code_is_recognised(text: str) -> None:
    assert looks_like_code(text)


@pytest.mark.parametrize("text", [PROSE, "What is the capital of France?", "Hello", ""])
def test_prose_is_not_code(text: str) -> None:
    assert not looks_like_code(text)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("What is the capital of France? Please tell me.", "en"),
        ("Wie ist das Wetter in Berlin? Ich bitte um eine Antwort.", "de"),
        ("Quelle est la capitale de la France ? Je vous remercie.", "fr"),
        ("¿Cuál es la capital de España? Dímelo por favor, es para un examen.", "es"),
        ("Come stai? Non sono sicuro che il treno sia in orario.", "it"),
        ("Bonjour, le chat est sur la table et il dort.", "fr"),
        ("Hoe gaat het met je? Ik ben niet zeker van het antwoord.", "nl"),
        ("Какая столица Франции?", "ru"),
        ("Яка столиця Франції? Дякую.", "uk"),
        ("フランスの首都はどこですか\uff1f", "ja"),
        ("法国的首都是哪里\uff1f", "zh"),
        ("프랑스의 수도는 어디입니까?", "ko"),
        ("ما هي عاصمة فرنسا؟", "ar"),
        ("12345 67890", "und"),
        ("ok", "und"),
    ],
)
def test_language_by_script_or_stopwords(text: str, language: str) -> None:
    assert detect_language(text) == language


def test_token_estimate() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a" * 400) == 100
    assert estimate_tokens("法国的首都") == 5


def test_features_cover_every_message_but_read_the_user() -> None:
    request = chat_request(
        messages=[
            {"role": "system", "content": "You are a helpful assistant. " * 10},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Wie ist das Wetter? Ich bitte."}],
            },
        ]
    )
    found = features(request)
    assert found.chars == 290 + 1 + len("Wie ist das Wetter? Ich bitte.")
    assert found.language == "de" and not found.code


def test_first_matching_rule_wins(nomoat_hooks: Hooks) -> None:
    run = nomoat_hooks(classifier(default="general"))
    assert routed(run, chat_request(PYTHON * 3, model="auto")) == "coder"  # code before long
    assert routed(run, chat_request("Tell me a story. " * 20, model="auto")) == "big"
    assert routed(run, chat_request("Wie ist das Wetter? Ich bitte.", model="auto")) == "euro"
    assert routed(run, chat_request("Hi", model="auto")) == "tiny"
    assert routed(run, chat_request("What is the capital of France?", model="auto")) == "general"


def test_other_model_names_are_left_alone(nomoat_hooks: Hooks) -> None:
    request = chat_request(PYTHON, model="smollm2-135m-instruct")
    assert nomoat_hooks(classifier()).on_request(request) is request


def test_without_default_an_unmatched_request_goes_on_unchanged(nomoat_hooks: Hooks) -> None:
    request = chat_request("What is the capital of France?", model="auto")
    assert nomoat_hooks(classifier()).on_request(request) is request


def test_applies_to_and_completions(nomoat_hooks: Hooks) -> None:
    run = nomoat_hooks(classifier(applies_to="router"))
    assert routed(run, completion_request(JAVASCRIPT, model="router")) == "coder"
    assert routed(run, chat_request(JAVASCRIPT, model="auto")) == "auto"


def test_thresholds_narrow_any_rule(nomoat_hooks: Hooks) -> None:
    rules = [
        {"when": "code", "min_chars": 500, "model": "big-coder"},
        {"when": "code", "model": "coder"},
        {"when": "long", "min_tokens": 10, "max_tokens": 50, "model": "medium"},
        {"when": "always", "model": "fallback"},
    ]
    run = nomoat_hooks(classifier(rules=rules))
    assert routed(run, chat_request(PYTHON * 5, model="auto")) == "big-coder"
    assert routed(run, chat_request(PYTHON, model="auto")) == "coder"
    assert routed(run, chat_request("x" * 100, model="auto")) == "medium"
    assert routed(run, chat_request("x" * 1000, model="auto")) == "fallback"


@pytest.mark.parametrize(
    "rule",
    [
        {"when": "long", "model": "x"},
        {"when": "short", "min_chars": 3, "model": "x"},
        {"when": "language", "model": "x"},
        {"when": "code", "languages": ["en"], "model": "x"},
        {"when": "code", "model": ""},
        {"when": "sarcasm", "model": "x"},
        {"when": "code", "model": "x", "colour": "red"},
    ],
)
def test_incomplete_rules_are_config_errors(rule: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        build_hook(manifest, {"rules": [rule]}, name="classifier")


def test_the_manifest_offers_the_hook() -> None:
    hook = build_hook(manifest, {"rules": RULES, "default": "d"}, name="classifier")
    assert isinstance(hook, Classifier)
    with pytest.raises(ValidationError):
        build_hook(manifest, {}, name="classifier")  # rules are required
