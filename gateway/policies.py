"""The built-in routing policy of the core: try deployments in config order.

Registered through the entry-point group ``nomoat.plugins`` like any policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from gateway.contract import (
    Candidate,
    CandidateStats,
    ChatCompletionRequest,
    CompletionRequest,
    PluginManifest,
    PolicyType,
    RankedCandidate,
    RequestContext,
)


class OrderedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrderedPolicy:
    """The first healthy deployment first; the others are fallbacks, in order."""

    def rank(
        self,
        request: ChatCompletionRequest | CompletionRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        count = len(candidates)
        return [
            RankedCandidate(candidate, float(count - position), f"position {position} in config")
            for position, candidate in enumerate(candidates)
        ]


def _ordered(config: OrderedConfig) -> OrderedPolicy:
    return OrderedPolicy()


manifest = PluginManifest(
    name="ordered",
    policies={"ordered": PolicyType(OrderedConfig, _ordered)},
)
