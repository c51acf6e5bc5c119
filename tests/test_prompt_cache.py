"""The llama.cpp engine's prompt cache and batch order.

A finished request leaves its KV cache in its sequence; the next request whose
prompt starts the same way runs there and evaluates only the rest, and says so
in ``usage.prompt_tokens_details.cached_tokens``. Answers are the same with and
without the cache. Each decode batch lists its sequences in ascending order,
which llama.cpp needs to decode them in one pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.auth import hash_api_key
from gateway.backends.llamacpp import embedded_model_path
from gateway.engine.adapters import LoraRef
from gateway.engine.generation import Generation, GenerationRequest, step
from gateway.engine.native import BatchEntry, NativeModel, SamplerSpec
from gateway.engine.sequences import Held, Lease, SequencePool, common_prefix
from tests.conftest import API_KEY, MODEL, Server, config_with_key, running_server
from tests.test_edge_routing import edge_node

# ------------------------------------------------------------ sequence pool

ALPHA = (LoraRef("alpha", Path("/adapters/0f3a.gguf")),)


def test_common_prefix() -> None:
    assert common_prefix((1, 2, 3, 4), [1, 2, 3, 4]) == 4
    assert common_prefix((1, 2, 3, 4), [1, 2, 9, 4]) == 2
    assert common_prefix((1, 2), [1, 2, 3]) == 2
    assert common_prefix((7,), [1]) == 0
    assert common_prefix((), [1, 2]) == 0
    assert common_prefix(tuple(range(1000)), [*range(777), 0]) == 777


def test_a_lease_takes_the_longest_prefix_under_the_same_adapters() -> None:
    pool = SequencePool(3, reuse_prompts=True)
    leases = [pool.lease([9], ()) for _ in range(3)]
    assert [lease.sequence for lease in leases] == [0, 1, 2]
    assert pool.free == 0
    pool.release(0, Held((1, 2), ()))
    pool.release(1, Held((1, 2, 3, 4), ()))
    pool.release(2, Held((1, 2, 3, 4, 5), ALPHA))
    # Sequence 2 holds more of the prompt, but under other adapters.
    lease = pool.lease([1, 2, 3, 4, 5, 6], ())
    assert (lease.sequence, lease.reusable) == (1, 4)
    # Under alpha, only sequence 2 counts.
    lease = pool.lease([1, 2, 3, 4, 5, 6], ALPHA)
    assert (lease.sequence, lease.reusable) == (2, 5)
    assert pool.free == 1


def test_a_prefix_is_reused_only_by_the_key_that_left_it() -> None:
    pool = SequencePool(2, reuse_prompts=True)
    pool.lease([9], (), "key-a")
    pool.lease([9], (), "key-b")
    pool.release(0, Held((1, 2, 3, 4), (), "key-a"))
    pool.release(1, Held((1, 2), (), "key-b"))
    # Key b holds less of the prompt than key a, but only its own counts.
    lease = pool.lease([1, 2, 3, 4, 5], (), "key-b")
    assert (lease.sequence, lease.reusable) == (1, 2)
    pool.release(1, Held((1, 2), (), "key-b"))
    # A third key reuses nothing, and takes the lowest free sequence.
    assert pool.lease([1, 2, 3, 4, 5], (), "key-c") == Lease(0, 0)


def test_the_last_prompt_token_is_always_evaluated() -> None:
    pool = SequencePool(1, reuse_prompts=True)
    pool.lease([1], ())
    pool.release(0, Held((1, 2, 3, 4, 5), ()))
    # The first token is sampled from the logits of the prompt's last one.
    assert pool.lease([1, 2, 3], ()).reusable == 2


def test_without_reuse_or_a_match_the_lowest_free_sequence_is_taken() -> None:
    for reuse in (True, False):
        pool = SequencePool(3, reuse_prompts=reuse)
        for _ in range(3):
            pool.lease([5], ())
        pool.release(2, Held((1, 2, 3), ()))
        pool.release(1, Held((8, 8), ()))
        lease = pool.lease([1, 2, 3, 4], ())
        assert (lease.sequence, lease.reusable) == ((2, 3) if reuse else (1, 0))
        assert pool.lease([6, 6], ()).reusable == 0


# ------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def model() -> Iterator[NativeModel]:
    native = NativeModel(embedded_model_path(), n_ctx=512, n_threads=0, n_seq=3)
    yield native
    native.close()


def _prompt(model: NativeModel, text: str) -> list[int]:
    return model.tokenize(text, add_special=True, parse_special=False)


@pytest.mark.e2e
def test_a_batch_lists_its_sequences_in_ascending_order(
    model: NativeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[list[int]] = []
    decode = model.decode

    def recording(entries: list[BatchEntry]) -> None:
        batches.append([sequence for _, _, sequence, _ in entries])
        decode(entries)

    monkeypatch.setattr(model, "decode", recording)
    request = GenerationRequest(_prompt(model, "One, two,"), 3, SamplerSpec(temperature=0.0))
    generations = [Generation(model, request, sequence) for sequence in (2, 0, 1)]
    while any(g.finish is None for g in generations):
        step(model, generations)
    for generation in generations:
        generation.result()
    assert all(batch == sorted(batch) for batch in batches)
    assert batches[1] == [0, 1, 2]  # after the prompts: one token of each


def _run(model: NativeModel, request: GenerationRequest, reusable: int) -> tuple[str, int]:
    generation = Generation(model, request, 0, reusable=reusable)
    while generation.finish is None:
        step(model, [generation])
    result = generation.result()
    return result.text, result.cached_tokens


@pytest.mark.e2e
def test_an_answer_is_the_same_from_a_reused_prefix(model: NativeModel) -> None:
    first = _prompt(model, "The history of the lighthouse begins")
    longer = first + _prompt(model, " in the year")[1:]
    request = GenerationRequest(longer, 24, SamplerSpec(temperature=0.0))
    fresh, cached = _run(model, request, 0)
    assert cached == 0
    # The sequence now holds `longer` and the answer; keep only `first`.
    reused, cached = _run(model, request, len(first))
    assert cached == len(first)
    assert reused == fresh
    # Keeping the whole prompt but its last token, as a repeated request does.
    again, cached = _run(model, request, len(longer) - 1)
    assert cached == len(longer) - 1
    assert again == fresh


# ---------------------------------------------------------- through the SDK


def _chat(
    client: openai.OpenAI, messages: list[dict[str, str]], *, stream: bool = False
) -> tuple[str, int, int]:
    """(answer, prompt tokens, cached prompt tokens)."""
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                temperature=0,
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        answer = client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=16,
        )
        text, usage = answer.choices[0].message.content or "", answer.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    return text, usage.prompt_tokens, cached


@pytest.mark.e2e
def test_a_repeated_prompt_is_served_from_the_cache(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three rivers of Europe (cache test)."}]
    first, prompt_tokens, cached = _chat(client, messages)
    # Earlier requests share at most the chat template's opening with it.
    assert cached < prompt_tokens - 1
    again, _, cached = _chat(client, messages)
    assert cached == prompt_tokens - 1
    assert again == first
    streamed, _, cached = _chat(client, messages, stream=True)
    assert cached == prompt_tokens - 1
    assert streamed == first


@pytest.mark.e2e
def test_a_chats_next_turn_reuses_the_previous_turn(client: openai.OpenAI) -> None:
    turn = [{"role": "user", "content": "Say something about the sea (cache test)."}]
    answer, first_prompt, _ = _chat(client, turn)
    follow_up = [
        *turn,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And about the sky?"},
    ]
    _, prompt_tokens, cached = _chat(client, follow_up)
    assert first_prompt <= cached < prompt_tokens


@pytest.mark.e2e
def test_the_prompt_cache_can_be_switched_off(tmp_path: Path) -> None:
    extra = f"""
        [backends.local]
        type = "llamacpp"
        smoke_test = false
        prompt_cache = false

        [models.{MODEL}]
        deployments = [{{ backend = "local" }}]
        """
    with running_server(tmp_path, config_with_key(extra)) as live:
        client = openai.OpenAI(base_url=live.base_url, api_key=live.api_key, max_retries=0)
        messages = [{"role": "user", "content": "Name three rivers of Europe (cache test)."}]
        first, _, cached = _chat(client, messages)
        again, _, cached_again = _chat(client, messages)
    assert (cached, cached_again) == (0, 0)
    assert again == first


OTHER_KEY = "sk-nomoat-test-other-tenant-0123"


TWO_KEYS = f"""
    [server]
    api_key_hashes = ["{hash_api_key(API_KEY)}", "{hash_api_key(OTHER_KEY)}"]
    """


@pytest.mark.e2e
def test_cached_tokens_never_reveal_another_keys_prompt(tmp_path: Path) -> None:
    """Two tenants of one gateway: what one key's prompts left in the cache
    is not reused for the other (cached_tokens and the time to the first
    token would tell it which prefixes the other sent)."""
    with running_server(tmp_path, TWO_KEYS) as live:
        _two_tenants(live)


@pytest.mark.e2e
def test_tenants_stay_apart_on_an_edge_node(tmp_path: Path) -> None:
    """The same through an edge node, which sees every request with the
    gateway's one key: the gateway names the tenant (x-nomoat-tenant)."""
    with edge_node(tmp_path, "tenants") as (port, _):
        config = (
            TWO_KEYS
            + f"""
            [backends.edge]
            type = "edge"
            base_url = "http://127.0.0.1:{port}/v1"

            [models.{MODEL}]
            deployments = [{{ backend = "edge" }}]
            """
        )
        with running_server(tmp_path, config) as live:
            _two_tenants(live)


def _two_tenants(live: Server) -> None:
    tenant_a = openai.OpenAI(base_url=live.base_url, api_key=API_KEY, max_retries=0)
    tenant_b = openai.OpenAI(base_url=live.base_url, api_key=OTHER_KEY, max_retries=0)
    secret = [{"role": "user", "content": "Our merger with Initech closes on 3 May (secret)."}]
    answer_a, prompt_tokens, _ = _chat(tenant_a, secret)
    _, _, cached = _chat(tenant_a, secret)
    assert cached == prompt_tokens - 1  # the cache works for its owner
    answer_b, _, cached = _chat(tenant_b, secret, stream=True)
    assert cached == 0
    assert answer_b == answer_a  # nothing else differs
    # Each key still reuses its own prefixes.
    _, _, cached = _chat(tenant_b, secret)
    assert cached == prompt_tokens - 1
