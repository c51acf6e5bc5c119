"""Rules choose a model's pool for a request; the policy then ranks the pool.

A rule matches on the prompt's size, a request header, or the API key; the
first rule that matches wins, and with none the pool is every deployment.
Prompt size is estimated from characters (4 per token): the rule decides
before any engine has seen, let alone tokenized, the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.contract import AnyRequest, Candidate, RequestContext
from gateway.wire import ChatCompletionRequest, TextPart

CHARACTERS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Rule:
    pool: frozenset[str]  # deployment ids
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    header: tuple[str, str] | None = None  # (lowercased name, value)
    api_key_ids: frozenset[str] = frozenset()

    def matches(self, prompt_tokens: int, ctx: RequestContext) -> bool:
        if self.min_prompt_tokens is not None and prompt_tokens < self.min_prompt_tokens:
            return False
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            return False
        if self.header is not None and ctx.headers.get(self.header[0]) != self.header[1]:
            return False
        return not self.api_key_ids or ctx.api_key_id in self.api_key_ids


def parse_header(condition: str | None) -> tuple[str, str] | None:
    if condition is None:
        return None
    name, _, value = condition.partition(":")
    return name.strip().lower(), value.strip()


def estimate_prompt_tokens(request: AnyRequest) -> int:
    if isinstance(request, ChatCompletionRequest):
        characters = 0
        for message in request.messages:
            content = message.content
            if isinstance(content, str):
                characters += len(content)
            elif content is not None:
                characters += sum(len(p.text) for p in content if isinstance(p, TextPart))
        return characters // CHARACTERS_PER_TOKEN
    prompt = request.prompt
    if isinstance(prompt, str):
        return len(prompt) // CHARACTERS_PER_TOKEN
    return sum(
        len(item) // CHARACTERS_PER_TOKEN
        if isinstance(item, str)
        else len(item)
        if isinstance(item, list)
        else 1
        for item in prompt
    )


def select_pool(
    candidates: Sequence[Candidate],
    rules: Sequence[Rule],
    prompt_tokens: int,
    ctx: RequestContext,
) -> Sequence[Candidate]:
    """The deployments the first matching rule names; all of them if none
    matches. ``prompt_tokens`` is :func:`estimate_prompt_tokens` of the request."""
    if not rules:
        return candidates
    for rule in rules:
        if rule.matches(prompt_tokens, ctx):
            return [c for c in candidates if c.target.deployment in rule.pool]
    return candidates
