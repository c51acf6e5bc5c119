"""End to end: the classifier picks the model before the gateway resolves it.

Two models are configured on the one embedded engine; clients ask for
``auto``, which is not a model at all: only the hook makes it resolvable.
The response's ``model`` names the one chosen.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from gateway.testing import MODEL, TEST_KEY, LiveGateway, gateway_config, running_gateway

CONFIG = f"""
[backends.embedded]
type = "llamacpp"

[models.{MODEL}]
deployments = [{{ backend = "embedded" }}]

[models.coder]
deployments = [{{ backend = "embedded", model = "{MODEL}" }}]

[[hooks]]
type = "classifier"
[hooks.options]
default = "{MODEL}"
rules = [{{ when = "code", model = "coder" }}]
"""
CODE = "Fix this:\n```python\ndef f(x):\n    return x +\n```"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    with running_gateway(tmp_path_factory.mktemp("classifier"), gateway_config(CONFIG)) as live:
        yield client(live)


def client(live: LiveGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=TEST_KEY, max_retries=0, timeout=120)


def answer_model(sdk: openai.OpenAI, content: str, model: str = "auto") -> str:
    reply = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=1
    )
    return reply.model


def test_code_goes_to_the_code_model(sdk: openai.OpenAI) -> None:
    assert answer_model(sdk, CODE) == "coder"


def test_other_prompts_go_to_the_default(sdk: openai.OpenAI) -> None:
    assert answer_model(sdk, "What is the capital of France?") == MODEL


def test_a_named_model_is_not_reclassified(sdk: openai.OpenAI) -> None:
    assert answer_model(sdk, CODE, model=MODEL) == MODEL
