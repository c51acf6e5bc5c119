"""The built-in routing policies: the splits they produce, as proportions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from gateway.contract import (
    Adapter,
    AdapterUse,
    Candidate,
    CandidateStats,
    RequestContext,
    Target,
)
from gateway.policies import (
    AffinityOptions,
    CostOptions,
    LatencyOptions,
    LeastOutstandingPolicy,
    LoRAAffinityOptions,
    LoRAAffinityPolicy,
    LowestCostPolicy,
    LowestLatencyPolicy,
    OrderedPolicy,
    SessionAffinityPolicy,
    ShortestQueuePolicy,
    WeightedRoundRobinPolicy,
)
from gateway.wire import ChatCompletionRequest, UserMessage


def candidate(
    index: int, weight: float = 1.0, cost: float = 0.0, output: float | None = None
) -> Candidate:
    """``cost``: the input price per million tokens; the output price is the
    same unless given."""
    out = cost if output is None else output
    return Candidate(Target("m", "e", f"m/{index}"), f"b{index}", weight, cost, out)


def request(user: str | None = None, max_tokens: int | None = None) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="m", messages=[UserMessage(content="hi")], user=user, max_tokens=max_tokens
    )


CTX = RequestContext("r", 0)


def first(ranked: list) -> str:  # type: ignore[type-arg]
    return str(ranked[0].candidate.target.deployment)


def test_every_policy_returns_every_candidate_with_a_reason() -> None:
    pool = [candidate(0), candidate(1), candidate(2)]
    policies = [
        OrderedPolicy(),
        WeightedRoundRobinPolicy(),
        LeastOutstandingPolicy(),
        LowestLatencyPolicy(LatencyOptions()),
        ShortestQueuePolicy(),
        LowestCostPolicy(CostOptions()),
        SessionAffinityPolicy(AffinityOptions()),
        LoRAAffinityPolicy(LoRAAffinityOptions()),
    ]
    for policy in policies:
        ranked = policy.rank(request(user="u"), CTX, pool, {})
        assert sorted(r.candidate.target.deployment for r in ranked) == ["m/0", "m/1", "m/2"]
        assert all(r.reason for r in ranked)
        assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)


def test_weighted_round_robin_splits_by_weight_and_interleaves() -> None:
    policy = WeightedRoundRobinPolicy()
    pool = [candidate(0, 1), candidate(1, 3)]
    picks = [first(policy.rank(request(), CTX, pool, {})) for _ in range(400)]
    assert Counter(picks) == {"m/0": 100, "m/1": 300}
    # Smooth: never more than 3 in a row for the heavy one, as nginx does it.
    assert "1111" not in "".join(p[-1] for p in picks)


def test_least_outstanding_prefers_the_least_busy_per_weight() -> None:
    pool = [candidate(0), candidate(1, weight=4)]
    stats = {"m/0": CandidateStats(in_flight=1), "m/1": CandidateStats(in_flight=3)}
    assert first(LeastOutstandingPolicy().rank(request(), CTX, pool, stats)) == "m/1"
    stats = {"m/0": CandidateStats(in_flight=0), "m/1": CandidateStats(in_flight=3)}
    assert first(LeastOutstandingPolicy().rank(request(), CTX, pool, stats)) == "m/0"


def test_lowest_latency_uses_ttft_and_token_time_for_the_request_size() -> None:
    pool = [candidate(0), candidate(1)]
    stats = {
        # Fast first token, slow per token (an edge CPU) vs the reverse (a GPU queue).
        "m/0": CandidateStats(ewma_ttft=0.05, ewma_token_time=0.012),
        "m/1": CandidateStats(ewma_ttft=0.4, ewma_token_time=0.002),
    }
    policy = LowestLatencyPolicy(LatencyOptions())
    assert first(policy.rank(request(max_tokens=10), CTX, pool, stats)) == "m/0"
    assert first(policy.rank(request(max_tokens=500), CTX, pool, stats)) == "m/1"
    unmeasured = {"m/0": stats["m/0"]}
    ranked = policy.rank(request(max_tokens=10), CTX, pool, unmeasured)
    assert first(ranked) == "m/1" and ranked[0].reason == "not measured yet"


def test_shortest_queue_reads_engine_queues() -> None:
    pool = [candidate(0), candidate(1)]
    stats = {
        "m/0": CandidateStats(queue_depth=3, running=4),
        "m/1": CandidateStats(queue_depth=0, running=4),
    }
    assert first(ShortestQueuePolicy().rank(request(), CTX, pool, stats)) == "m/1"


def test_lowest_cost_takes_the_cheapest_then_the_least_busy() -> None:
    pool = [candidate(0, cost=2.0), candidate(1, cost=0.5), candidate(2, cost=0.5)]
    stats = {"m/1": CandidateStats(in_flight=2), "m/2": CandidateStats(in_flight=1)}
    ranked = LowestCostPolicy(CostOptions()).rank(request(), CTX, pool, stats)
    assert [r.candidate.target.deployment for r in ranked] == ["m/2", "m/1", "m/0"]


def test_lowest_cost_prices_the_requests_own_prompt_and_output() -> None:
    """Cheap input beats cheap output for a long prompt asking for little,
    and the other way round; a request without max_tokens is priced at
    expected_tokens."""
    cheap_in, cheap_out = candidate(0, cost=0.1, output=10.0), candidate(1, cost=5.0, output=0.5)
    pool = [cheap_in, cheap_out]
    long_prompt = ChatCompletionRequest(
        model="m", messages=[UserMessage(content="word " * 2000)], max_tokens=10
    )
    policy = LowestCostPolicy(CostOptions())
    ranked = policy.rank(long_prompt, CTX, pool, {})
    assert first(ranked) == "m/0"
    # 2500 prompt tokens (4 characters each) at 0.1, 10 at 10.0, per million.
    assert ranked[0].score == pytest.approx(-(2500 * 0.1 + 10 * 10.0) / 1e6)
    assert first(policy.rank(request(max_tokens=2000), CTX, pool, {})) == "m/1"
    # 250 prompt tokens, max_tokens unsaid: 256 expected make the output
    # decide; told to expect 1, the input does.
    unsaid = ChatCompletionRequest(model="m", messages=[UserMessage(content="word " * 200)])
    assert first(policy.rank(unsaid, CTX, pool, {})) == "m/1"
    few = LowestCostPolicy(CostOptions(expected_tokens=1))
    assert first(few.rank(unsaid, CTX, pool, {})) == "m/0"


def test_session_affinity_is_stable_spreads_and_moves_only_lost_sessions() -> None:
    policy = SessionAffinityPolicy(AffinityOptions())
    pool = [candidate(i) for i in range(4)]
    sessions = [f"user-{n}" for n in range(400)]
    placed = {s: first(policy.rank(request(user=s), CTX, pool, {})) for s in sessions}
    again = {s: first(policy.rank(request(user=s), CTX, pool, {})) for s in sessions}
    assert placed == again
    share = Counter(placed.values())
    assert all(60 <= share[f"m/{i}"] <= 140 for i in range(4)), share
    smaller = pool[:3]
    moved = {
        s for s in sessions if first(policy.rank(request(user=s), CTX, smaller, {})) != placed[s]
    }
    assert moved == {s for s in sessions if placed[s] == "m/3"}


def test_session_affinity_by_header() -> None:
    policy = SessionAffinityPolicy(AffinityOptions(key="header", header="X-Session-Id"))
    pool = [candidate(i) for i in range(4)]
    picks = {
        first(
            policy.rank(
                request(), RequestContext("r", 0, headers={"x-session-id": "abc"}), pool, {}
            )
        )
        for _ in range(20)
    }
    assert len(picks) == 1
    no_session = policy.rank(request(), CTX, pool, {})
    assert first(no_session) == "m/0"


@pytest.mark.parametrize("weights", [(1, 1), (2, 1, 1), (5, 3, 2)])
def test_weighted_round_robin_proportions(weights: tuple[int, ...]) -> None:
    policy = WeightedRoundRobinPolicy()
    pool = [candidate(i, w) for i, w in enumerate(weights)]
    rounds = 100 * sum(weights)
    picks = Counter(first(policy.rank(request(), CTX, pool, {})) for _ in range(rounds))
    assert picks == {f"m/{i}": 100 * w for i, w in enumerate(weights)}


def adapter_pool(*names: str, replicas: int = 2) -> list[Candidate]:
    """The deployments of model "m" for a request naming these adapters."""
    uses = tuple(
        AdapterUse(Adapter(name, "m", "0" * 64, "peft", Path(name), name)) for name in names
    )
    return [
        Candidate(Target(",".join(names) or "m", "e", f"m/{i}", uses), f"b{i}")
        for i in range(replicas)
    ]


def holding(
    *names: str, in_flight: int = 0, running: int | None = None, slots: int | None = None
) -> CandidateStats:
    return CandidateStats(
        in_flight=in_flight,
        running=running,
        adapters_loaded=frozenset(names),
        adapter_slots=slots,
    )


def placement_only(load_tolerance: float = 2) -> LoRAAffinityPolicy:
    """lora-affinity without its balance term, which moves with every choice."""
    return LoRAAffinityPolicy(LoRAAffinityOptions(load_tolerance=load_tolerance, balance=0))


def test_lora_affinity_prefers_a_replica_holding_the_adapter() -> None:
    policy = LoRAAffinityPolicy(LoRAAffinityOptions(load_tolerance=2))
    pool = adapter_pool("a")
    for holder, other in (("m/0", "m/1"), ("m/1", "m/0")):
        # Idle, or busier by less than the tolerance: the holder still wins.
        for extra in (0, 1):
            stats = {holder: holding("a", "b", in_flight=extra), other: holding("b")}
            ranked = policy.rank(request(), CTX, pool, stats)
            assert first(ranked) == holder
            assert ranked[0].reason.startswith("holds the adapter")


def test_lora_affinity_leaves_the_holders_only_past_twice_the_tolerance() -> None:
    """A second copy or an eviction takes a slot for good: both cost as much."""
    policy = placement_only(load_tolerance=2)
    pool = adapter_pool("a")
    for other in (holding(slots=2), holding("x", "y", slots=2), holding()):
        for busy, expected in ((3, "m/0"), (4, "m/0"), (5, "m/1")):
            stats = {"m/0": holding("a", in_flight=busy, slots=2), "m/1": other}
            ranked = policy.rank(request(), CTX, pool, stats)
            assert first(ranked) == expected, (other, busy)
            if expected == "m/0":
                assert ranked[1].reason.split(",")[0] in {
                    "would load a second copy",
                    "full: loading evicts one",
                }
    # The engine's own running + waiting counts too, when above our in-flight.
    stats = {"m/0": holding("a", in_flight=0, running=5), "m/1": holding()}
    assert first(policy.rank(request(), CTX, pool, stats)) == "m/1"
    # With no tolerance at all, any extra load sends it elsewhere.
    stats = {"m/0": holding("a", in_flight=1), "m/1": holding()}
    assert first(placement_only(load_tolerance=0).rank(request(), CTX, pool, stats)) == "m/1"


def test_lora_affinity_sends_a_cold_adapter_where_there_is_room() -> None:
    policy = placement_only(load_tolerance=2)
    names = [f"adapter-{n:02d}" for n in range(20)]
    # m/0 is full, m/1 has room: every cold adapter goes to m/1, even a bit busier.
    stats = {"m/0": holding("x", "y", slots=2), "m/1": holding("z", in_flight=1, slots=2)}
    assert {first(policy.rank(request(), CTX, adapter_pool(n), stats)) for n in names} == {"m/1"}
    # Both full: load decides again.
    stats = {"m/0": holding("x", "y", slots=2), "m/1": holding("z", "w", in_flight=1, slots=2)}
    assert {first(policy.rank(request(), CTX, adapter_pool(n), stats)) for n in names} == {"m/0"}
    # Unknown slots (None) are never full.
    stats = {"m/0": holding("x", "y"), "m/1": holding("z", in_flight=1)}
    assert {first(policy.rank(request(), CTX, adapter_pool(n), stats)) for n in names} == {"m/0"}
    # A base-model request is never held back by a full replica.
    stats = {"m/0": holding("x", "y", slots=2), "m/1": holding("z", in_flight=1, slots=2)}
    assert first(policy.rank(request(), CTX, adapter_pool(), stats)) == "m/0"


def test_lora_affinity_balances_a_replica_that_takes_most_of_the_traffic() -> None:
    """Where adapters settle decides the split; a replica that took more than
    its share lately counts as busier, until a hot adapter gets a second copy."""
    policy = LoRAAffinityPolicy(LoRAAffinityOptions(load_tolerance=2, balance=8))
    pool = adapter_pool("hot")
    # m/0 holds the hot adapter and always has a request running: well within
    # the tolerance for one request, but not for hundreds in a row.
    stats = {"m/0": holding("hot", in_flight=1), "m/1": holding()}
    picks = [first(policy.rank(request(), CTX, pool, stats)) for _ in range(300)]
    assert picks[:10] == ["m/0"] * 10
    assert 0.3 <= picks.count("m/1") / len(picks) <= 0.5
    ranked = policy.rank(request(), CTX, pool, stats)
    assert "load" in ranked[0].reason
    # Without the balance term, m/0 keeps it all.
    steady = placement_only()
    assert {first(steady.rank(request(), CTX, pool, stats)) for _ in range(300)} == {"m/0"}


def test_lora_affinity_spreads_cold_adapters_by_rendezvous_hashing() -> None:
    policy = placement_only()
    names = [f"adapter-{n:02d}" for n in range(40)]
    idle = {"m/0": holding(), "m/1": holding()}
    placed = {n: first(policy.rank(request(), CTX, adapter_pool(n), idle)) for n in names}
    again = {n: first(policy.rank(request(), CTX, adapter_pool(n), idle)) for n in names}
    assert placed == again  # stable: the same adapter settles on the same replica
    assert 10 <= Counter(placed.values())["m/0"] <= 30  # and they do not all pile on one
    # A replica that left takes only its own adapters with it (rendezvous).
    three = {**idle, "m/2": holding()}
    moved = {
        n
        for n in names
        if first(policy.rank(request(), CTX, adapter_pool(n, replicas=3), three)) != placed[n]
    }
    assert all(
        first(policy.rank(request(), CTX, adapter_pool(n, replicas=3), three)) == "m/2"
        for n in moved
    )
    # Load outweighs the hash: a cold adapter goes to the least busy replica.
    busy = {"m/0": holding(in_flight=1), "m/1": holding(in_flight=0)}
    assert {first(policy.rank(request(), CTX, adapter_pool(n), busy)) for n in names} == {"m/1"}


def test_lora_affinity_needs_every_adapter_of_a_stack_and_balances_base_requests() -> None:
    policy = placement_only()
    stack = adapter_pool("a", "b")
    stats = {"m/0": holding("a", in_flight=0), "m/1": holding("a", "b", in_flight=1)}
    assert first(policy.rank(request(), CTX, stack, stats)) == "m/1"
    base = adapter_pool()
    stats = {"m/0": holding("a", in_flight=2), "m/1": holding(in_flight=1)}
    assert first(policy.rank(request(), CTX, base, stats)) == "m/1"
