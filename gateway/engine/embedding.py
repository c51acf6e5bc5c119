"""Embeddings on llama.cpp: a context of their own, on a thread of their own.

An :class:`EmbeddingModel` is a llama.cpp context made with ``embeddings``
on and a pooling type: over an embedding model's own GGUF (what its file
says, e.g. mean pooling for all-MiniLM-L6-v2), or over the chat model's
weights, shared, with mean pooling. Chat generation keeps its own context
and worker thread (:mod:`gateway.engine.scheduler`): embeddings never wait
for a decode step there, nor hold one up beyond the CPU they use (one
thread by default).

An :class:`EmbeddingEngine` runs one model's work on one worker thread, with
at most ``max_waiting`` requests queued behind it (more are refused at once:
the gateway answers 503 with Retry-After). The queue is chat's fair one:
API keys take turns, and one key holds at most ``max_per_key`` requests (429
past it), so one key flooding it neither fills it nor makes another key's
request wait behind the whole flood. ctypes releases the GIL inside
llama.cpp, so the event loop keeps serving while a vector is computed.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as lc
import numpy as np
import numpy.typing as npt

from gateway.engine.fair_queue import FairQueue
from gateway.engine.native import NativeError

Vector = npt.NDArray[np.float32]
# A causal chat model's context for embeddings: its KV cache costs memory
# per token (SmolLM2-135M: 23 KB), so not its whole training context.
DEFAULT_CONTEXT = 2048


class EngineFullError(Exception):
    """``max_waiting`` embedding requests are already queued."""


class KeyFullError(EngineFullError):
    """The owner already holds its share of the queue (``max_per_key``)."""


class EmbeddingCancelledError(Exception):
    """Its caller went away; the rest of its inputs were not embedded."""


class InputError(ValueError):
    """An input is empty, or has more tokens than the embedding context holds."""


@dataclass(frozen=True, slots=True)
class Embedded:
    """One request's vectors (unit length), and the tokens they took."""

    vectors: list[Vector]
    prompt_tokens: int
    # The worker thread's time on them (a node's compute cost).
    seconds: float


class EmbeddingModel:
    """A llama.cpp context that computes pooled, normalised embeddings.
    Not thread-safe: one :class:`EmbeddingEngine` thread uses it."""

    def __init__(
        self,
        weights: ctypes.c_void_p,
        *,
        owns_weights: bool,
        n_ctx: int,
        threads: int,
        mean_pooling: bool,
    ) -> None:
        self._weights = weights
        self._owns_weights = owns_weights
        trained = int(lc.llama_model_n_ctx_train(weights))
        self.n_ctx = min(n_ctx or DEFAULT_CONTEXT, trained) if trained else n_ctx or DEFAULT_CONTEXT
        params = lc.llama_context_default_params()
        params.n_ctx = self.n_ctx
        # An encoder (BERT) needs each input whole in one micro-batch.
        params.n_batch = params.n_ubatch = self.n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = True
        if mean_pooling:
            params.pooling_type = lc.LLAMA_POOLING_TYPE_MEAN
        ctx = lc.llama_init_from_model(weights, params)
        if not ctx:
            self._free_weights()
            raise NativeError("llama.cpp could not create an embedding context")
        self._ctx = ctx
        if lc.llama_pooling_type(ctx) == lc.LLAMA_POOLING_TYPE_NONE:
            self.close()
            raise NativeError("the embedding model's GGUF sets no pooling type")
        self._memory = lc.llama_get_memory(ctx)
        self._vocab = lc.llama_model_get_vocab(weights)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.dimensions = int(lc.llama_model_n_embd_out(weights) or lc.llama_model_n_embd(weights))
        self._batch = lc.llama_batch_init(self.n_ctx, 0, 1)

    @classmethod
    def load(cls, path: Path, *, n_ctx: int, threads: int) -> EmbeddingModel:
        """An embedding model's own GGUF, pooled as its file says."""
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        weights = lc.llama_model_load_from_file(str(path).encode(), params)
        if not weights:
            raise NativeError(f"llama.cpp could not load {path}")
        return cls(weights, owns_weights=True, n_ctx=n_ctx, threads=threads, mean_pooling=False)

    def tokenize(self, text: str) -> list[int]:
        """With the model's special tokens (BERT's [CLS] ... [SEP])."""
        data = text.encode()
        capacity = len(data) + 8
        tokens = (lc.llama_token * capacity)()
        count = lc.llama_tokenize(self._vocab, data, len(data), tokens, capacity, True, False)
        if count < 0:
            capacity = -count
            tokens = (lc.llama_token * capacity)()
            count = lc.llama_tokenize(self._vocab, data, len(data), tokens, capacity, True, False)
        return list(tokens[:count])

    def embed(self, tokens: Sequence[int]) -> Vector:
        """The unit-length pooled embedding of one input."""
        if not tokens:
            raise InputError("an input is empty: nothing to embed")
        if len(tokens) > self.n_ctx:
            raise InputError(
                f"an input has {len(tokens)} tokens; this model embeds at most {self.n_ctx}"
            )
        batch = self._batch
        for index, token in enumerate(tokens):
            batch.token[index] = token
            batch.pos[index] = index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = 0
            batch.logits[index] = True
        batch.n_tokens = len(tokens)
        lc.llama_memory_clear(self._memory, True)
        status = lc.llama_decode(self._ctx, batch)
        if status != 0:
            raise NativeError(f"llama_decode failed with status {status}")
        pointer = lc.llama_get_embeddings_seq(self._ctx, 0)
        if not pointer:
            raise NativeError("llama.cpp returned no pooled embedding")
        vector = np.ctypeslib.as_array(pointer, shape=(self.dimensions,)).astype(np.float32)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector

    def _free_weights(self) -> None:
        if self._owns_weights and self._weights:
            lc.llama_model_free(self._weights)
        self._weights = None  # type: ignore[assignment]

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        self._free_weights()


@dataclass(slots=True, eq=False)
class _Job:
    """One request's inputs, waiting for the worker thread or on it."""

    inputs: Sequence[str | Sequence[int]]
    owner: str
    done: asyncio.Future[Embedded]
    # Set when its caller went away: the worker thread stops before the next input.
    stop: threading.Event = field(default_factory=threading.Event)


class EmbeddingEngine:
    """One :class:`EmbeddingModel` behind one worker thread and a bounded,
    fair queue: owners (API keys) take turns, as chat's do
    (:mod:`gateway.engine.fair_queue`), and one owner holds at most
    ``max_per_key`` requests, waiting and running (0: no limit; owner ``""``,
    a gateway without keys, has no share to keep)."""

    def __init__(self, model: EmbeddingModel, *, max_waiting: int, max_per_key: int = 0) -> None:
        self.model = model
        self._max_waiting = max_waiting
        self._max_per_key = max_per_key
        self._queue: FairQueue[_Job] = FairQueue()
        self._running: _Job | None = None
        self._held: Counter[str] = Counter()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nomoat-embed")
        # Busy seconds of the worker thread since start (for compute costs).
        self.busy_seconds = 0.0

    @property
    def pending(self) -> int:
        """Requests queued or running now."""
        return self._queue.size + (self._running is not None)

    async def embed(self, inputs: Sequence[str | Sequence[int]], owner: str = "") -> Embedded:
        """Every input's vector (a text is tokenized first), computed on the
        worker thread in ``owner``'s turn; refused at once with
        :class:`EngineFullError` when the queue is full (:class:`KeyFullError`
        when ``owner`` holds its share). If the caller is cancelled while
        the request waits, it never runs."""
        if self._closed or self.pending > self._max_waiting:
            raise EngineFullError(f"{self.pending} embedding requests are in progress")
        if owner and self._max_per_key and self._held[owner] >= self._max_per_key:
            raise KeyFullError(
                f"this API key already has {self._held[owner]} embedding requests here "
                f"(at most {self._max_per_key} at once)"
            )
        job = _Job(inputs, owner, asyncio.get_running_loop().create_future())
        self._held[owner] += 1
        self._queue.push(job)
        self._next()
        try:
            return await job.done
        except asyncio.CancelledError:
            # The client left, or the deadline passed: a queued request
            # never runs; a running one stops before its next input (not
            # after thousands of them).
            if self._queue.discard(job):
                self._release(job)
            job.stop.set()
            raise

    def _next(self) -> None:
        """The next owner's oldest request onto the worker thread, if it is free."""
        if self._closed or self._running is not None or not self._queue.size:
            return
        job = self._running = self._queue.pop()
        loop = asyncio.get_running_loop()
        work = functools.partial(self._embed_all, job.inputs, job.stop)
        running = loop.run_in_executor(self._executor, work)
        running.add_done_callback(functools.partial(self._finished, job))

    def _finished(self, job: _Job, running: asyncio.Future[Embedded]) -> None:
        self._running = None
        self._release(job)
        if not job.done.done():
            if running.cancelled():
                job.done.cancel()
            elif (error := running.exception()) is not None:
                job.done.set_exception(error)
            else:
                job.done.set_result(running.result())
        elif not running.cancelled():
            running.exception()  # retrieved: its caller left, nobody else wants it
        self._next()

    def _release(self, job: _Job) -> None:
        self._held[job.owner] -= 1
        if self._held[job.owner] <= 0:
            del self._held[job.owner]

    def _embed_all(self, inputs: Sequence[str | Sequence[int]], stop: threading.Event) -> Embedded:
        started = time.perf_counter()
        try:
            tokenized = [
                self.model.tokenize(item) if isinstance(item, str) else item for item in inputs
            ]
            vectors = []
            for tokens in tokenized:
                if stop.is_set():
                    raise EmbeddingCancelledError("the request was cancelled")
                vectors.append(self.model.embed(tokens))
        finally:
            seconds = time.perf_counter() - started
            self.busy_seconds += seconds
        return Embedded(vectors, sum(len(tokens) for tokens in tokenized), seconds)

    def close(self) -> None:
        """Waits for the running request, then frees the context; the
        queued ones are cancelled (their callers' loop does it)."""
        self._closed = True
        while self._queue.size:
            done = self._queue.pop().done
            done.get_loop().call_soon_threadsafe(done.cancel)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.model.close()
