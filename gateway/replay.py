"""Replays recorded routing decisions against another policy, offline.

Each record carries the candidates and the stats snapshot its policy saw, so a
new policy can be asked what it would have chosen in exactly that situation,
before it is rolled out. Nothing is sent to any backend.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gateway import wire
from gateway.contract import (
    AnyRequest,
    Candidate,
    CandidateStats,
    RankedCandidate,
    RequestContext,
    RoutingPolicy,
    Target,
)
from gateway.decisions import RouteDecision


@dataclass
class ReplayReport:
    records: int = 0
    agreed: int = 0
    recorded: Counter[str] = field(default_factory=Counter)
    replayed: Counter[str] = field(default_factory=Counter)
    changed: list[tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"records: {self.records}",
            f"same first choice: {self.agreed} ({self.agreed / max(self.records, 1):.1%})",
            "deployment          recorded   replayed",
        ]
        for deployment in sorted(set(self.recorded) | set(self.replayed)):
            lines.append(
                f"{deployment:<18} {self.recorded[deployment]:>9} {self.replayed[deployment]:>10}"
            )
        return "\n".join(lines)


def _request(decision: RouteDecision) -> AnyRequest:
    prompt = decision.prompt or ""
    if decision.endpoint == "completions":
        return wire.CompletionRequest(model=decision.model, prompt=prompt, stream=decision.stream)
    message = wire.UserMessage(content=prompt)
    return wire.ChatCompletionRequest(
        model=decision.model, messages=[message], stream=decision.stream
    )


def rerank(decision: RouteDecision, policy: RoutingPolicy) -> list[RankedCandidate]:
    """What ``policy`` would have ranked, given what the recorded one saw."""
    candidates = [
        Candidate(Target(decision.model, c.engine_model, c.deployment), c.backend, c.weight)
        for c in decision.candidates
    ]
    stats = {
        c.deployment: CandidateStats(
            in_flight=c.stats.in_flight,
            queue_depth=c.stats.queue_depth,
            ewma_ttft=c.stats.ewma_ttft,
            ewma_token_time=c.stats.ewma_token_time,
        )
        for c in decision.candidates
    }
    ctx = RequestContext(decision.request_id, int(decision.started_at))
    return policy.rank(_request(decision), ctx, candidates, stats)


def replay(decisions: list[RouteDecision], policy: RoutingPolicy) -> ReplayReport:
    report = ReplayReport()
    for decision in decisions:
        if not decision.candidates:
            continue
        report.records += 1
        before = decision.candidates[0].deployment
        ranked = rerank(decision, policy)
        after = ranked[0].candidate.target.deployment if ranked else "(none)"
        report.recorded[before] += 1
        report.replayed[after] += 1
        if before == after:
            report.agreed += 1
        else:
            report.changed.append((decision.request_id, before, after))
    return report
