"""An embeddings request's ``input``, decoded and checked once.

OpenAI takes a string, a list of strings, a list of token ids, or a list of
lists of token ids; never a mixture. Each item becomes one vector, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway import wire
from gateway.errors import InvalidRequestError
from gateway.settings import LimitSettings
from gateway.validation import decode

# OpenAI's own limit on the items of one request.
MAX_INPUTS = 2048


@dataclass(frozen=True, slots=True)
class Inputs:
    """The items to embed: texts, or token id lists (exactly one is non-empty)."""

    texts: tuple[str, ...] = ()
    tokens: tuple[tuple[int, ...], ...] = ()

    def __len__(self) -> int:
        return len(self.texts) or len(self.tokens)


def _refused(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="input")


def inputs_of(request: wire.EmbeddingRequest) -> Inputs:
    """The request's items, or a 400 naming ``input``."""
    given = request.input
    if isinstance(given, str):
        return Inputs(texts=(given,))
    if not given:
        raise _refused("input must not be empty")
    if len(given) > MAX_INPUTS:
        raise _refused(f"input: at most {MAX_INPUTS} items allowed, got {len(given)}")
    if all(isinstance(item, str) for item in given):
        return Inputs(texts=tuple(item for item in given if isinstance(item, str)))
    if all(isinstance(item, int) for item in given):
        return Inputs(tokens=(tuple(item for item in given if isinstance(item, int)),))
    if all(isinstance(item, list) for item in given):
        lists = tuple(tuple(item) for item in given if isinstance(item, list))
        if not all(lists):
            raise _refused("input: a list of token ids must not be empty")
        return Inputs(tokens=lists)
    raise _refused("input mixes strings, token ids and lists of token ids; send one kind")


def decode_embeddings(body: bytes, limits: LimitSettings) -> wire.EmbeddingRequest:
    """A body as an embeddings request (400s as chat's), its input checked."""
    request = decode(body, wire.embedding_request_decoder, max_depth=limits.max_json_depth)
    inputs_of(request)
    return request


def routing_view(request: wire.EmbeddingRequest) -> wire.CompletionRequest:
    """The request as request hooks, rules and routing policies see it: a
    completion of the same model and input that generates nothing. (Their
    contract names chat and completion requests; an embeddings input has a
    completion prompt's exact shape.)"""
    return wire.CompletionRequest(
        model=request.model, prompt=request.input, max_tokens=0, user=request.user
    )


def from_view(
    request: wire.EmbeddingRequest, view: wire.CompletionRequest
) -> wire.EmbeddingRequest:
    """``request`` with what a request hook changed in its view (the model,
    the input: a classifier's choice, a redaction) carried back."""
    if view.model == request.model and view.prompt is request.input:
        return request
    return wire.EmbeddingRequest(
        model=view.model,
        input=view.prompt,
        encoding_format=request.encoding_format,
        dimensions=request.dimensions,
        user=request.user,
    )
