"""Vectors as the client asked for them: Matryoshka-truncated to
``dimensions`` and renormalised (where the model allows it), then as floats
or as base64 of little-endian float32 (what OpenAI's SDK asks for by default
and decodes with numpy's ``frombuffer(..., dtype="float32")``)."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gateway import wire
from gateway.errors import InvalidRequestError

Vector = npt.NDArray[np.float32]
_LITTLE_F32 = np.dtype("<f4")


def truncated(vector: Vector, dimensions: int) -> Vector:
    """The first ``dimensions`` values, scaled back to unit length (what a
    Matryoshka-trained model's shorter embedding is)."""
    head = np.asarray(vector[:dimensions], dtype=np.float32)
    norm = float(np.linalg.norm(head))
    return head / norm if norm > 0 else head


def check_dimensions(
    model: str, dimensions: int | None, matryoshka: bool, size: int | None = None
) -> None:
    """``dimensions`` only where the model was trained for it, and at most
    its ``size`` (None: not known before the engine answered)."""
    if dimensions is None:
        return
    if not matryoshka:
        raise InvalidRequestError(
            f"model `{model}` does not support `dimensions` (its embeddings are not "
            "Matryoshka-trained)",
            param="dimensions",
        )
    if size is not None and dimensions > size:
        # A client's number of 4,000 digits is not echoed back.
        got = str(dimensions) if dimensions < 10**12 else "more"
        raise InvalidRequestError(
            f"dimensions: model `{model}` makes {size}-dimensional embeddings; got {got}",
            param="dimensions",
        )


def encoded(vector: Vector, encoding: str | None) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype=_LITTLE_F32).tobytes()).decode("ascii")
    return [float(value) for value in vector]


def decoded(embedding: list[float] | str) -> Vector:
    """An upstream's (or a client's) embedding back as a vector."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype=_LITTLE_F32).astype(np.float32)
    return np.asarray(embedding, dtype=np.float32)


def embedding_list(
    vectors: Sequence[Vector],
    request: wire.EmbeddingRequest,
    model: str,
    prompt_tokens: int,
) -> wire.EmbeddingList:
    """The answer: each vector in the request's order and encoding."""
    data = [
        wire.Embedding(
            object="embedding", index=index, embedding=encoded(vector, request.encoding_format)
        )
        for index, vector in enumerate(vectors)
    ]
    usage = wire.EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    return wire.EmbeddingList(object="list", data=data, model=model, usage=usage)


def shaped(
    answer: wire.EmbeddingList, request: wire.EmbeddingRequest, matryoshka: bool
) -> wire.EmbeddingList:
    """An engine's float answer as the client asked: ``dimensions`` (checked
    against the model's size), then the encoding."""
    vectors = [decoded(item.embedding) for item in sorted(answer.data, key=lambda e: e.index)]
    size = len(vectors[0]) if vectors else 0
    check_dimensions(answer.model, request.dimensions, matryoshka, size)
    if request.dimensions is not None:
        vectors = [truncated(vector, request.dimensions) for vector in vectors]
    return embedding_list(vectors, request, answer.model, answer.usage.prompt_tokens)
