"""The built-in routing policies, registered through the entry-point group
``nomoat.plugins`` exactly like a third-party policy (``policy = "<name>"``
on a model, options in ``policy_options``).

Every policy returns all the candidates it was given, best first, each with a
score (higher is better) and a reason, so decisions can be explained and
replayed; the gateway tries them in that order (the rest are fallbacks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.contract import (
    AnyRequest,
    Candidate,
    CandidateStats,
    PluginManifest,
    PolicyType,
    RankedCandidate,
    RequestContext,
    RoutingPolicy,
)
from gateway.rules import estimate_prompt_tokens


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ranked(
    candidates: Sequence[Candidate],
    score: Callable[[Candidate], float],
    reason: Callable[[Candidate], str],
) -> list[RankedCandidate]:
    # sorted() is stable: ties keep the configured order.
    scored = [RankedCandidate(c, score(c), reason(c)) for c in candidates]
    return sorted(scored, key=lambda ranked: -ranked.score)


def _stats(stats: Mapping[str, CandidateStats], candidate: Candidate) -> CandidateStats:
    return stats.get(candidate.target.deployment, CandidateStats())


class OrderedPolicy:
    """The first deployment first; the others are fallbacks, in order."""

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        count = len(candidates)
        return [
            RankedCandidate(candidate, float(count - position), f"position {position} in config")
            for position, candidate in enumerate(candidates)
        ]


class WeightedRoundRobinPolicy:
    """Smooth weighted round-robin (as nginx does it): over any window, each
    deployment gets requests in proportion to its ``weight``, interleaved."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        total = sum(c.weight for c in candidates)
        for candidate in candidates:
            key = candidate.target.deployment
            self._current[key] = self._current.get(key, 0.0) + candidate.weight
        chosen = max(candidates, key=lambda c: self._current[c.target.deployment])
        self._current[chosen.target.deployment] -= total
        return _ranked(
            candidates,
            lambda c: 1.0 if c is chosen else c.weight / total,
            lambda c: "its turn" if c is chosen else f"weight {c.weight:g} of {total:g}",
        )


class LeastOutstandingPolicy:
    """The deployment with the fewest requests in flight from this gateway
    (relative to its weight), so faster deployments take more."""

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        return _ranked(
            candidates,
            lambda c: -_stats(stats, c).in_flight / c.weight,
            lambda c: f"{_stats(stats, c).in_flight} in flight",
        )


class LowestLatencyPolicy:
    """The lowest expected time for this request: EWMA time to first token
    plus EWMA time per token times the tokens asked for. Deployments without
    measurements yet are tried first, so every one gets measured."""

    def __init__(self, options: LatencyOptions) -> None:
        self._expected_tokens = options.expected_tokens

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        tokens = _requested_tokens(request) or self._expected_tokens

        def expected(candidate: Candidate) -> float | None:
            seen = _stats(stats, candidate)
            if seen.ewma_token_time is None:
                return None
            # Only streams reveal the time to first token; until one has,
            # non-streamed answers measure it as part of the per-token time.
            return (seen.ewma_ttft or 0.0) + seen.ewma_token_time * tokens

        return _ranked(
            candidates,
            lambda c: float("inf") if (e := expected(c)) is None else -e,
            lambda c: (
                "not measured yet"
                if (e := expected(c)) is None
                else f"expected {e * 1000:.0f} ms for {tokens} tokens"
            ),
        )


class ShortestQueuePolicy:
    """The engine with the fewest requests waiting (counted twice) and running,
    as the engine itself reports them (vLLM's /metrics, an edge node's), its KV
    cache use breaking ties; where the engine reports neither, this gateway's
    own in-flight count instead."""

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        def load(candidate: Candidate) -> float:
            seen = _stats(stats, candidate)
            if seen.queue_depth is None and seen.running is None:
                return float(seen.in_flight)
            # A full KV cache means new requests will wait: it breaks ties.
            kv = seen.kv_cache_usage or 0.0
            return float((seen.queue_depth or 0) * 2 + (seen.running or 0)) + kv

        return _ranked(
            candidates,
            lambda c: -load(c) / c.weight,
            lambda c: (
                f"queue {_stats(stats, c).queue_depth}, running {_stats(stats, c).running}, "
                f"kv {_stats(stats, c).kv_cache_usage}"
            ),
        )


class LowestCostPolicy:
    """The cheapest deployment for this request at the deployments' token
    prices: its prompt (estimated from characters, as rules do) at the input
    price plus the tokens it asks for (``max_tokens``, else
    ``expected_tokens``) at the output price. Ties go to the least busy."""

    def __init__(self, options: CostOptions) -> None:
        self._expected_tokens = options.expected_tokens

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        prompt = estimate_prompt_tokens(request)
        output = _requested_tokens(request) or self._expected_tokens

        def usd(candidate: Candidate) -> float:
            per_million = (
                prompt * candidate.input_usd_per_million + output * candidate.output_usd_per_million
            )
            return per_million / 1e6

        # Busy-ness only breaks ties: a request in flight weighs less than
        # any price difference worth ranking by (1e-15 USD).
        return _ranked(
            candidates,
            lambda c: -usd(c) - _stats(stats, c).in_flight * 1e-15,
            lambda c: f"${usd(c):.3g} for ~{prompt} in + {output} out tokens",
        )


class SessionAffinityPolicy:
    """The same session always goes to the same deployment (rendezvous
    hashing: when a deployment leaves, only its sessions move). The session
    is a request header or the ``user`` field; without one, the candidates
    keep their configured order."""

    def __init__(self, options: AffinityOptions) -> None:
        self._header = options.header.lower() if options.header else None
        self._key = options.key

    def _session(self, request: AnyRequest, ctx: RequestContext) -> str | None:
        if self._key == "header" and self._header:
            return ctx.headers.get(self._header)
        return request.user

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        session = self._session(request, ctx)
        if session is None:
            return OrderedPolicy().rank(request, ctx, candidates, stats)

        return _ranked(candidates, lambda c: _rendezvous(session, c), lambda c: "session hash")


def _rendezvous(key: str, candidate: Candidate) -> float:
    """A stable pseudo-random number in [0, 1) for (key, deployment)."""
    digest = hashlib.blake2b(
        f"{key}\0{candidate.target.deployment}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") / 2**64


class _RecentShares:
    """Each deployment's share of a policy's recent choices: counts that
    decay by ``decay`` per choice (half-life about 350 choices at 0.998),
    starting from ``prior`` each so the first few choices do not swing it."""

    def __init__(self, decay: float = 0.998, prior: float = 10.0) -> None:
        self._decay = decay
        self._prior = prior
        self._counts: dict[str, float] = {}

    def excess(self, candidates: Sequence[Candidate]) -> dict[str, float]:
        """Share above the one its weight is due (negative: below), per deployment."""
        counts = [self._counts.setdefault(c.target.deployment, self._prior) for c in candidates]
        total, weights = sum(counts), sum(c.weight for c in candidates)
        return {
            c.target.deployment: count / total - c.weight / weights
            for c, count in zip(candidates, counts, strict=True)
        }

    def chose(self, candidates: Sequence[Candidate], chosen: Candidate) -> None:
        for candidate in candidates:
            self._counts[candidate.target.deployment] *= self._decay
        self._counts[chosen.target.deployment] += 1


class LoRAAffinityPolicy:
    """Adapter requests go to the replicas holding their adapters (or loading
    them), balanced against load, so that each adapter is loaded on as few
    replicas as possible and stays there.

    A replica holding the adapters gets ``load_tolerance`` requests of
    credit. A replica that would have to load them is charged as much again
    when that costs a slot for good: when it is full (it holds as many
    adapters as it can, see :attr:`CandidateStats.adapter_slots`; loading
    evicts one that others may want next), or when another replica holds them
    already (a second copy). So a request leaves its holders only for a
    replica less busy by more than twice the tolerance, and an adapter loaded
    nowhere goes to a replica with room first.

    Load is the larger of this gateway's requests in flight and the engine's
    own running + waiting, plus ``balance`` times the replica's share of this
    policy's recent choices beyond its due (by weight): where the adapters
    settled decides how the traffic splits, and this term keeps one replica
    from taking most of it for good. Ties are broken by rendezvous hashing of
    the adapters' names, so cold adapters settle on different replicas.
    Requests without adapters go to the least loaded replica.
    """

    def __init__(self, options: LoRAAffinityOptions) -> None:
        self._tolerance = options.load_tolerance
        self._balance = options.balance
        self._shares = _RecentShares()

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        excess = self._shares.excess(candidates)

        def load(candidate: Candidate) -> float:
            seen = _stats(stats, candidate)
            engine = (seen.running or 0) + (seen.queue_depth or 0)
            busy = max(seen.in_flight, engine) / candidate.weight
            return busy + self._balance * excess[candidate.target.deployment]

        def holds(candidate: Candidate) -> bool:
            names = {use.adapter.name for use in candidate.target.adapters}
            return bool(names) and names <= _stats(stats, candidate).adapters_loaded

        def full(candidate: Candidate) -> bool:
            seen = _stats(stats, candidate)
            slots = seen.adapter_slots
            return slots is not None and len(seen.adapters_loaded) >= slots

        holders = {c.target.deployment for c in candidates if holds(c)}

        def placement(candidate: Candidate) -> tuple[float, str]:
            if not candidate.target.adapters:
                return 0.0, "no adapter"
            if candidate.target.deployment in holders:
                return self._tolerance, "holds the adapter"
            if full(candidate):
                return -self._tolerance, "full: loading evicts one"
            if holders:
                return -self._tolerance, "would load a second copy"
            return 0.0, "adapter not loaded"

        # Each candidate is judged once; score and reason read the verdict.
        verdicts = {c.target.deployment: (*placement(c), load(c)) for c in candidates}

        def key(candidate: Candidate) -> str:
            return "+".join(use.adapter.name for use in candidate.target.adapters)

        def score(candidate: Candidate) -> float:
            credit, _, busy = verdicts[candidate.target.deployment]
            # The hash only breaks ties: it is worth less than one request.
            return credit - busy + 0.5 * _rendezvous(key(candidate), candidate)

        def reason(candidate: Candidate) -> str:
            _, where, busy = verdicts[candidate.target.deployment]
            return f"{where}, load {busy:.2f}"

        ranked = _ranked(candidates, score, reason)
        if ranked:
            self._shares.chose(candidates, ranked[0].candidate)
        return ranked


def _requested_tokens(request: AnyRequest) -> int | None:
    limit = getattr(request, "max_completion_tokens", None) or request.max_tokens
    return int(limit) if limit else None


class LatencyOptions(_Options):
    # Tokens assumed for a request that does not say how many it wants.
    expected_tokens: Annotated[int, Field(ge=1)] = 256


class CostOptions(_Options):
    # Output tokens assumed for a request that does not say how many it wants.
    expected_tokens: Annotated[int, Field(ge=1)] = 256


class AffinityOptions(_Options):
    # Where the session id comes from: the `user` field, or a header.
    key: Literal["user", "header"] = "user"
    header: str | None = "x-session-id"


class LoRAAffinityOptions(_Options):
    # Requests of credit for a replica holding the adapter; as much again is
    # charged to one that would fill a slot for good by loading it (it is
    # full, or another replica holds it already).
    load_tolerance: Annotated[float, Field(ge=0)] = 2.0
    # Requests of load per unit of a replica's share of recent choices above
    # its due: 8 makes a replica that took 60 % of two counts 0.8 busier.
    balance: Annotated[float, Field(ge=0)] = 8.0


def _no_options(policy: Callable[[], RoutingPolicy]) -> PolicyType[_Options]:
    return PolicyType(_Options, lambda _: policy())


manifest = PluginManifest(
    name="builtin-policies",
    policies={
        "ordered": _no_options(OrderedPolicy),
        "weighted-round-robin": _no_options(WeightedRoundRobinPolicy),
        "least-outstanding": _no_options(LeastOutstandingPolicy),
        "lowest-latency": PolicyType(LatencyOptions, LowestLatencyPolicy),
        "shortest-queue": _no_options(ShortestQueuePolicy),
        "lowest-cost": PolicyType(CostOptions, LowestCostPolicy),
        "session-affinity": PolicyType(AffinityOptions, SessionAffinityPolicy),
        "lora-affinity": PolicyType(LoRAAffinityOptions, LoRAAffinityPolicy),
    },
)
