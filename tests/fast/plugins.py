"""Hooks and policies the fast tests enable by config, as a plugin would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
from pydantic import BaseModel, ConfigDict

from gateway import wire
from gateway.contract import (
    AnyChunk,
    AnyRequest,
    AnyResponse,
    Candidate,
    CandidateStats,
    GatewayError,
    HookType,
    PermissionDeniedError,
    PluginManifest,
    PolicyType,
    RankedCandidate,
    RequestContext,
)
from gateway.testing import chat_completion


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(_Strict):
    pass


# ------------------------------------------------------------------ policies


class Reverse:
    """Last deployment first."""

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        return [RankedCandidate(c, float(i + 1), "reversed") for i, c in enumerate(candidates)][
            ::-1
        ]


class FirstOnly:
    """Only the first candidate: the others must never be tried."""

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        return [RankedCandidate(c, 1.0, "first") for c in candidates[:1]]


class Nobody:
    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        return []


@dataclass
class Spy:
    """Config order, remembering the deployments it was shown each time."""

    seen: list[list[str]] = field(default_factory=list)

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        self.seen.append([c.target.deployment for c in candidates])
        return [
            RankedCandidate(c, float(len(candidates) - i), "spied")
            for i, c in enumerate(candidates)
        ]


# --------------------------------------------------------------------- hooks


@dataclass
class ErrorRecorder:
    """Every error the gateway reports, with the request it came with."""

    errors: list[tuple[AnyRequest | None, GatewayError]] = field(default_factory=list)

    async def on_error(
        self, request: AnyRequest | None, error: GatewayError, ctx: RequestContext
    ) -> None:
        self.errors.append((request, error))

    @property
    def statuses(self) -> list[int]:
        return [error.status_code for _, error in self.errors]


class AnswerOptions(_Strict):
    text: str = "from the cache"


@dataclass
class AnswerEarly:
    options: AnswerOptions

    async def on_request(
        self, request: AnyRequest, ctx: RequestContext
    ) -> AnyRequest | AnyResponse:
        if isinstance(request, wire.ChatCompletionRequest):
            return chat_completion(self.options.text, id=ctx.request_id, model=request.model)
        choice = wire.CompletionChoice(
            index=0, text=self.options.text, logprobs=None, finish_reason="stop"
        )
        return wire.Completion(
            id=ctx.request_id,
            object="text_completion",
            created=ctx.created,
            model=request.model,
            choices=[choice],
            usage=wire.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
        )


class RenameOptions(_Strict):
    model: str


@dataclass
class Rename:
    options: RenameOptions

    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        return msgspec.structs.replace(request, model=self.options.model)


class Shout:
    """Upper-cases answers (response hook) and streamed text (stream hook)."""

    async def on_response(
        self, request: AnyRequest, response: AnyResponse, ctx: RequestContext
    ) -> AnyResponse:
        if isinstance(response, wire.ChatCompletion):
            for choice in response.choices:
                choice.message.content = (choice.message.content or "").upper()
        else:
            for text_choice in response.choices:
                text_choice.text = text_choice.text.upper()
        return response

    async def on_stream(
        self, request: AnyRequest, chunks: AsyncIterator[AnyChunk], ctx: RequestContext
    ) -> AsyncIterator[AnyChunk]:
        async for chunk in chunks:
            if isinstance(chunk, wire.ChatCompletionChunk):
                for choice in chunk.choices:
                    if isinstance(choice.delta.content, str):
                        choice.delta.content = choice.delta.content.upper()
            else:
                for text_choice in chunk.choices:
                    text_choice.text = text_choice.text.upper()
            yield chunk


class Explode:
    """A hook with a bug, at every stage it takes part in."""

    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        raise RuntimeError("a bug in the hook")


class ExplodeStream:
    async def on_stream(
        self, request: AnyRequest, chunks: AsyncIterator[AnyChunk], ctx: RequestContext
    ) -> AsyncIterator[AnyChunk]:
        async for chunk in chunks:
            yield chunk
            raise RuntimeError("a bug in the stream hook")


class Refuse:
    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        raise PermissionDeniedError("You may not.")


manifest = PluginManifest(
    name="fast-test-plugins",
    policies={
        "reverse": PolicyType(NoOptions, lambda _: Reverse()),
        "first-only": PolicyType(NoOptions, lambda _: FirstOnly()),
        "nobody": PolicyType(NoOptions, lambda _: Nobody()),
        "spy": PolicyType(NoOptions, lambda _: Spy()),
    },
    hooks={
        "errors": HookType(NoOptions, lambda _: ErrorRecorder()),
        "answer-early": HookType(AnswerOptions, AnswerEarly),
        "rename": HookType(RenameOptions, Rename),
        "shout": HookType(NoOptions, lambda _: Shout()),
        "explode": HookType(NoOptions, lambda _: Explode()),
        "explode-stream": HookType(NoOptions, lambda _: ExplodeStream()),
        "refuse": HookType(NoOptions, lambda _: Refuse()),
    },
)
