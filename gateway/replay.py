"""Replays recorded routing decisions against a policy, offline.

Each record carries every policy call's exact inputs (the request facts the
built-in policies and rules read, the candidates in the order the policy got
them, every field of their stats), so a policy can be asked what it would
have ranked in exactly that situation, before it is rolled out. Replaying
against the policy that made the log, with the same options, reproduces
every ranking. Nothing is sent to any backend.

Stateful policies: each (gateway start, model) gets a fresh policy instance,
fed its calls in the order the gateway made them (``seq``), as the live
instance was.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from gateway import wire
from gateway.contract import (
    AnyRequest,
    Candidate,
    CandidateStats,
    RankedCandidate,
    RequestContext,
    RoutingPolicy,
)
from gateway.decision_log import RankingRecord, RequestView, RouteDecision
from gateway.rules import CHARACTERS_PER_TOKEN


def _filler(view: RequestView) -> str:
    """Without recorded prompts, the prompt is rebuilt as blanks of the
    recorded estimated size: no built-in policy reads the text, and the one
    that reads its size (lowest-cost, estimating as rules do) sees the same."""
    return " " * (view.prompt_tokens * CHARACTERS_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class Call:
    """The exact inputs of one recorded policy call."""

    request: AnyRequest
    ctx: RequestContext
    candidates: list[Candidate]
    stats: dict[str, CandidateStats]


@dataclass(frozen=True, slots=True)
class Change:
    request_id: str
    seq: int
    recorded: tuple[str, ...]
    replayed: tuple[str, ...]


@dataclass
class ReplayReport:
    # Records (requests) and their first policy call's first choice.
    records: int = 0
    agreed: int = 0
    # Every policy call (retry rounds and fallbacks included), whole order.
    rankings: int = 0
    same_order: int = 0
    recorded: Counter[str] = field(default_factory=Counter)
    replayed: Counter[str] = field(default_factory=Counter)
    changed: list[Change] = field(default_factory=list)

    def summary(self, show_changes: int = 10) -> str:
        lines = [
            f"records: {self.records}",
            f"same first choice: {self.agreed} ({_share(self.agreed, self.records)})",
            f"policy calls: {self.rankings}",
            f"same ranking order: {self.same_order} ({_share(self.same_order, self.rankings)})",
            "deployment          recorded   replayed",
        ]
        for deployment in sorted(set(self.recorded) | set(self.replayed)):
            lines.append(
                f"{deployment:<18} {self.recorded[deployment]:>9} {self.replayed[deployment]:>10}"
            )
        if self.changed and show_changes:
            lines.append("changed rankings (request, call: recorded -> replayed):")
            for change in self.changed[:show_changes]:
                lines.append(
                    f"  {change.request_id} #{change.seq}: "
                    f"{' > '.join(change.recorded)} -> {' > '.join(change.replayed)}"
                )
            if len(self.changed) > show_changes:
                lines.append(f"  ... and {len(self.changed) - show_changes} more")
        return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{part / max(whole, 1):.1%}"


def rebuild_request(view: RequestView) -> AnyRequest:
    """The request as the policy saw it, decoded exactly as the gateway
    decodes a body (so every default is the live one)."""
    body: dict[str, object] = {"model": view.model, "stream": view.stream}
    if view.user is not None:
        body["user"] = view.user
    if view.max_tokens is not None:
        body["max_tokens"] = view.max_tokens
    if view.endpoint == "completions":
        body["prompt"] = view.prompt if view.has_prompt else _filler(view)
        return wire.completion_request_decoder.decode(msgspec.json.encode(body))
    if view.max_completion_tokens is not None:
        body["max_completion_tokens"] = view.max_completion_tokens
    body["messages"] = (
        view.prompt if view.has_prompt else [{"role": "user", "content": _filler(view)}]
    )
    return wire.chat_request_decoder.decode(msgspec.json.encode(body))


def call_of(decision: RouteDecision, ranking: RankingRecord) -> Call:
    """Rebuild the exact inputs of one recorded policy call."""
    view = decision.request
    ctx = RequestContext(
        request_id=decision.request_id,
        created=view.created,
        api_key_id=view.api_key_id,
        headers=dict(view.headers),
    )
    return Call(
        rebuild_request(view),
        ctx,
        [c.candidate(ranking.entry) for c in ranking.candidates],
        {c.deployment: c.stats.stats() for c in ranking.candidates},
    )


def rerank(
    decision: RouteDecision, ranking: RankingRecord, policy: RoutingPolicy
) -> list[RankedCandidate]:
    """What ``policy`` ranks, given exactly what the recorded call was given."""
    call = call_of(decision, ranking)
    return policy.rank(call.request, call.ctx, call.candidates, call.stats)


def in_call_order(
    decisions: Iterable[RouteDecision],
) -> list[tuple[RouteDecision, RankingRecord]]:
    """Every recorded policy call, runs in the order they start in the log,
    each run's calls in the order the gateway made them."""
    runs: dict[str, list[tuple[RouteDecision, RankingRecord]]] = {}
    for decision in decisions:
        if decision.dry_run:
            continue
        calls = runs.setdefault(decision.run, [])
        calls.extend((decision, ranking) for ranking in decision.rankings)
    return [call for calls in runs.values() for call in sorted(calls, key=lambda item: item[1].seq)]


def replay(
    decisions: Sequence[RouteDecision],
    new_policy: Callable[[], RoutingPolicy],
    model: str | None = None,
) -> ReplayReport:
    """Replay every policy call (of ``model`` only, if given) with a policy
    from ``new_policy``: one fresh instance per gateway start and model."""
    report = ReplayReport()
    policies: dict[tuple[str, str], RoutingPolicy] = {}
    for decision, ranking in in_call_order(decisions):
        if model is not None and ranking.entry != model:
            continue
        key = (decision.run, ranking.entry)
        policy = policies.get(key)
        if policy is None:
            policy = policies[key] = new_policy()
        before = tuple(choice.deployment for choice in ranking.ranked)
        after = tuple(r.candidate.target.deployment for r in rerank(decision, ranking, policy))
        report.rankings += 1
        if before == after:
            report.same_order += 1
        else:
            report.changed.append(Change(decision.request_id, ranking.seq, before, after))
        if ranking is decision.rankings[0]:
            report.records += 1
            first_before = before[0] if before else "(none)"
            first_after = after[0] if after else "(none)"
            report.recorded[first_before] += 1
            report.replayed[first_after] += 1
            report.agreed += first_before == first_after
    return report
