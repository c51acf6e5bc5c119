"""The one seam to llama.cpp: a model and its context, on the low-level API.

Generation samples with llama.cpp's native sampler chain (``llama_sampler_*``)
instead of copying logits into Python for every token, which is what makes
llama-cpp-python's high-level ``Llama`` API about 13 % slower than llama.cpp.

A :class:`NativeModel` is not thread-safe: exactly one worker thread uses it
(see :mod:`gateway.engine.scheduler`). ctypes releases the GIL inside each call,
so the event loop keeps serving while a token is decoded.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lc
import numpy as np
import numpy.typing as npt

_RANDOM_SEED = lc.LLAMA_DEFAULT_SEED
_MAX_PIECE_BYTES = 256


# (token, position, sequence, wants logits): one entry of a decode batch.
BatchEntry = tuple[int, int, int, bool]


@dataclass(frozen=True, slots=True)
class AdapterHandle:
    """A loaded LoRA adapter (llama.cpp's ``llama_adapter_lora *``)."""

    pointer: ctypes._Pointer[ctypes.c_void_p]


class NativeError(RuntimeError):
    """llama.cpp refused an operation (load, decode, grammar)."""


class GrammarError(NativeError):
    """A grammar that llama.cpp refuses, or that cannot be followed: it allows
    no token this model has, or costs too much CPU per token. The request's
    schema is at fault, not the engine; only that generation ends."""


@dataclass(frozen=True, slots=True)
class GrammarBudget:
    """CPU llama.cpp may spend matching a grammar against the candidates, as
    a token bucket: ``burst`` seconds at the start, ``per_token`` more with
    each token. Measured here (SmolLM2, 49k tokens): a JSON object grammar
    about 0.01 s a token, an enum of 1000 values sharing a prefix 0.15 s for
    its few tokens; a pattern whose repetitions can split a string in ever
    more ways 0.3 s a token on average over 170 tokens (56 s in all), during
    which every generation batched with it waited."""

    per_token: float = 0.1
    burst: float = 2.0


DEFAULT_GRAMMAR_BUDGET = GrammarBudget()


@dataclass(frozen=True, slots=True)
class SamplerSpec:
    """How to pick each next token. ``temperature == 0`` is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None
    grammar_budget: GrammarBudget = DEFAULT_GRAMMAR_BUDGET


_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level
_log = logging.getLogger("gateway.engine.llama_cpp")


# Set in a thread while it checks a client's input with llama.cpp: what
# llama.cpp then complains about is the client's mistake, not the operator's.
_checking_input = threading.local()
# llama.cpp quotes a whole grammar it cannot parse: a log line is cut here.
_MAX_LOG_CHARS = 2000


@lc.llama_log_callback  # type: ignore[untyped-decorator]
def _forward_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp prints every load detail; keep its warnings and errors only.
    if level in _LOG_LEVELS:
        quiet = getattr(_checking_input, "active", False)
        line = text.decode(errors="replace").rstrip()[:_MAX_LOG_CHARS]
        _log.log(logging.DEBUG if quiet else _LOG_LEVELS[level], "%s", line)


def _seed_for_llama(seed: int | None) -> int:
    # llama.cpp's seed is a uint32 whose maximum means "random".
    return _RANDOM_SEED if seed is None else seed % _RANDOM_SEED


class NativeModel:
    """A loaded GGUF model with one context of ``n_ctx`` tokens."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int,
        n_threads: int,
        n_batch: int = 512,
        n_seq: int = 1,
    ) -> None:
        """``n_ctx`` tokens of context for each of ``n_seq`` parallel
        sequences (0: the context the model was trained with)."""
        lc.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model = lc.llama_model_load_from_file(str(path).encode(), model_params)
        if not model:
            raise NativeError(f"llama.cpp could not load {path}")
        self._model = model
        per_sequence = n_ctx or int(lc.llama_model_n_ctx_train(model))
        threads = n_threads or min(os.cpu_count() or 1, 8)
        ctx_params = lc.llama_context_default_params()
        # Each sequence gets its own n_ctx slice of the KV cache (not unified),
        # so one long conversation can never starve the others of cells.
        ctx_params.n_ctx = per_sequence * n_seq
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = n_seq
        ctx_params.kv_unified = False
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx = lc.llama_init_from_model(model, ctx_params)
        if not ctx:
            lc.llama_model_free(model)
            raise NativeError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self._ctx = ctx
        self._memory = lc.llama_get_memory(ctx)
        self._vocab = lc.llama_model_get_vocab(model)
        self.n_ctx = int(lc.llama_n_ctx_seq(ctx))
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.n_threads = threads
        self._batch = lc.llama_batch_init(max(n_batch, n_seq), 0, 1)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.pieces = [self._piece(token) for token in range(self.n_vocab)]
        self.end_tokens = frozenset(
            token for token in range(self.n_vocab) if lc.llama_vocab_is_eog(self._vocab, token)
        )
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self.bos_token = int(lc.llama_vocab_bos(self._vocab))
        self.eos_token = int(lc.llama_vocab_eos(self._vocab))

    # ------------------------------------------------------------------ metadata

    def metadata(self, key: str) -> str | None:
        size = 1 << 16
        buffer = ctypes.create_string_buffer(size)
        length = lc.llama_model_meta_val_str(self._model, key.encode(), buffer, size)
        if length < 0:
            return None
        return buffer.raw[: min(length, size - 1)].decode("utf-8", errors="replace")

    def weights(self) -> ctypes.c_void_p:
        """The loaded model (``llama_model *``), for another context on the
        same weights (:mod:`gateway.engine.embedding`); freed with this one."""
        return self._model  # type: ignore[no-any-return]

    def chat_template(self) -> str | None:
        return self.metadata("tokenizer.chat_template")

    def piece_text(self, token: int) -> str:
        return self.pieces[token].decode("utf-8", errors="replace")

    # ---------------------------------------------------------------- tokenizer

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        tokens = (lc.llama_token * capacity)()
        count = lc.llama_tokenize(
            self._vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if count < 0:
            capacity = -count
            tokens = (lc.llama_token * capacity)()
            count = lc.llama_tokenize(
                self._vocab, data, len(data), tokens, capacity, add_special, parse_special
            )
        return list(tokens[:count])

    def _piece(self, token: int, *, special: bool = False) -> bytes:
        buffer = ctypes.create_string_buffer(_MAX_PIECE_BYTES)
        length = lc.llama_token_to_piece(self._vocab, token, buffer, _MAX_PIECE_BYTES, 0, special)
        return buffer.raw[: max(length, 0)]

    def control_texts(self) -> list[str]:
        """How the control tokens are written (``<|im_start|>``): the texts
        that tokenizing with ``parse_special`` turns into them."""
        parsed = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_UNKNOWN
        return [
            self._piece(token, special=True).decode("utf-8", errors="replace")
            for token in range(self.n_vocab)
            if lc.llama_vocab_get_attr(self._vocab, token) & parsed
        ]

    # ----------------------------------------------------------------- decoding

    def forget(self, sequence: int) -> None:
        """Drop every cached token of ``sequence``."""
        lc.llama_memory_seq_rm(self._memory, sequence, -1, -1)

    def keep_prefix(self, sequence: int, count: int) -> int:
        """Keep the first ``count`` cached tokens of ``sequence`` and drop the
        rest; return how many were kept (0 if llama.cpp cannot cut this
        model's cache in the middle, and then it is wiped)."""
        if count > 0 and lc.llama_memory_seq_rm(self._memory, sequence, count, -1):
            return count
        self.forget(sequence)
        return 0

    def decode(self, entries: list[BatchEntry]) -> None:
        """Evaluate one batch: at most ``n_batch`` (token, position, sequence,
        wants logits) entries, from any sequences."""
        batch = self._batch
        for index, (token, position, sequence, logits) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = logits
        batch.n_tokens = len(entries)
        status = lc.llama_decode(self._ctx, batch)
        if status != 0:
            raise NativeError(f"llama_decode failed with status {status}")

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        """The logits of entry ``index`` of the last batch."""
        pointer = lc.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def decoded_token_count(self) -> int:
        """llama.cpp's own count of tokens it has evaluated (prompt + generated)
        since load: the engine's evidence of how much work it did."""
        perf = lc.llama_perf_context(self._ctx)
        return int(perf.n_p_eval) + int(perf.n_eval)

    # ----------------------------------------------------------------- adapters

    def load_adapter(self, path: Path) -> AdapterHandle:
        """Load a GGUF LoRA adapter for this model (kept until freed)."""
        handle = lc.llama_adapter_lora_init(self._model, str(path).encode())
        if not handle:
            raise NativeError(f"llama.cpp could not load the LoRA adapter {path}")
        return AdapterHandle(handle)

    def use_adapters(self, adapters: list[tuple[AdapterHandle, float]]) -> None:
        """Make exactly these adapters, with their scales, active on the
        context (an empty list: the base model). Applies to every sequence."""
        count = len(adapters)
        if count == 0:
            status = lc.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handles = (lc.llama_adapter_lora_p_ctypes * count)(*(a.pointer for a, _ in adapters))
            scales = (ctypes.c_float * count)(*(scale for _, scale in adapters))
            status = lc.llama_set_adapters_lora(self._ctx, handles, count, scales)
        if status != 0:
            raise NativeError(f"llama.cpp could not set the LoRA adapters (status {status})")

    def free_adapter(self, handle: AdapterHandle) -> None:
        """Free an adapter that is not active (see :meth:`use_adapters`)."""
        lc.llama_adapter_lora_free(handle.pointer)

    # ----------------------------------------------------------------- sampling

    def sampler(self, spec: SamplerSpec) -> Sampler:
        return Sampler(self, spec)

    def close(self) -> None:
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None


def grammar_compiles(model: NativeModel, grammar: str) -> bool:
    """Whether llama.cpp accepts ``grammar`` for this model's vocabulary.

    Only reads the vocabulary, so any thread may call it. The grammar must
    have passed :func:`gateway.engine.grammar.gbnf_problem` first: llama.cpp's
    parser recurses once per nested group and has no limit of its own.
    """
    _checking_input.active = True  # a refusal is the client's: logged at debug level
    try:
        sampler = lc.llama_sampler_init_grammar(model._vocab, grammar.encode(), b"root")
    finally:
        _checking_input.active = False
    if not sampler:
        return False
    lc.llama_sampler_free(sampler)
    return True


class _Candidates:
    """A reusable ``llama_token_data_array`` over every token of the vocabulary."""

    _DTYPE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

    def __init__(self, n_vocab: int) -> None:
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.data = np.zeros(n_vocab, dtype=self._DTYPE)
        self.array = lc.llama_token_data_array(
            data=self.data.ctypes.data_as(lc.llama_token_data_p),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )

    def load(self, logits: npt.NDArray[np.float32]) -> lc.llama_token_data_array:
        # Samplers sort and truncate in place: restore every field each time.
        self.data["id"] = self.ids
        self.data["logit"] = logits
        self.array.size = len(self.ids)
        self.array.selected = -1
        self.array.sorted = False
        return self.array


class Sampler:
    """A native sampler chain for one generation. Call :meth:`close` after use."""

    def __init__(self, model: NativeModel, spec: SamplerSpec) -> None:
        self._model = model
        params = lc.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain = lc.llama_sampler_chain_init(params)
        # Grammar chains are applied and accepted step by step, checked in
        # between; plain chains take llama.cpp's one call.
        self._candidates = None if spec.grammar is None else _Candidates(model.n_vocab)
        self._budget = spec.grammar_budget
        self._grammar_balance = spec.grammar_budget.burst
        self._grammar_spent = 0.0
        self._grammar_tokens = 0
        try:
            for stage in self._stages(spec):
                lc.llama_sampler_chain_add(self._chain, stage)
        except BaseException:
            self.close()
            raise

    def _stages(self, spec: SamplerSpec) -> Iterator[int]:
        # A generator: each stage joins the chain before the next is made, so
        # a failure (a bad grammar) leaks nothing; the chain frees its stages.
        model = self._model
        if spec.logit_bias:
            biases = (lc.llama_logit_bias * len(spec.logit_bias))(
                *(lc.llama_logit_bias(token, bias) for token, bias in spec.logit_bias)
            )
            yield lc.llama_sampler_init_logit_bias(model.n_vocab, len(spec.logit_bias), biases)
        if spec.presence_penalty or spec.frequency_penalty:
            yield lc.llama_sampler_init_penalties(
                model.n_vocab, model.n_ctx, 1.0, spec.frequency_penalty, spec.presence_penalty
            )
        if spec.grammar is not None:
            grammar = lc.llama_sampler_init_grammar(model._vocab, spec.grammar.encode(), b"root")
            if not grammar:
                raise GrammarError("llama.cpp could not compile the grammar")
            yield grammar
        if spec.temperature == 0:
            yield lc.llama_sampler_init_greedy()
            return
        if spec.top_p < 1.0:
            yield lc.llama_sampler_init_top_p(spec.top_p, 1)
        yield lc.llama_sampler_init_temp(spec.temperature)
        yield lc.llama_sampler_init_dist(_seed_for_llama(spec.seed))

    def sample(self, index: int) -> int:
        """Pick the next token from the logits of batch entry ``index``, and accept it."""
        if self._candidates is None:
            return int(lc.llama_sampler_sample(self._chain, self._model._ctx, index))
        return self._sample_with_grammar(index)

    def _sample_with_grammar(self, index: int) -> int:
        """What ``llama_sampler_sample`` does, with the grammar's verdict checked
        before the token is accepted.

        When a grammar allows no token (it needs a character no token can
        produce, such as NUL), every candidate is at -inf and the sampler
        still picks one; accepting it aborts the process (GGML_ABORT for an
        end-of-generation token, an uncaught C++ exception for any other).
        """
        started = time.thread_time()
        candidates = self._candidates
        assert candidates is not None
        array = candidates.load(self._model.logits(index))
        lc.llama_sampler_apply(self._chain, ctypes.byref(array))
        chosen = array.selected
        if not 0 <= chosen < array.size or not math.isfinite(array.data[chosen].logit):
            raise GrammarError(
                "the grammar allows no token of this model at this point of the output"
            )
        token = int(array.data[chosen].id)
        lc.llama_sampler_accept(self._chain, token)
        self._charge(time.thread_time() - started)
        return token

    def _charge(self, spent: float) -> None:
        """Take one token's grammar CPU from the budget; past it, end."""
        budget = self._budget
        self._grammar_spent += spent
        self._grammar_tokens += 1
        # A bucket holds at most the burst: cheap tokens early on do not pay
        # for a long costly stretch later.
        self._grammar_balance = min(budget.burst, self._grammar_balance + budget.per_token) - spent
        if self._grammar_balance < 0:
            raise GrammarError(
                f"the grammar took {self._grammar_spent:.1f} s of CPU to choose "
                f"{self._grammar_tokens} tokens (at most {budget.burst:g} s plus "
                f"{budget.per_token:g} s a token): it is too costly to follow"
            )

    def close(self) -> None:
        if self._chain:
            lc.llama_sampler_free(self._chain)
            self._chain = None
