"""Per-adapter usage, kept by the pipeline, shown in /metrics (the engines
keep their own :class:`~gateway.contract.AdapterCounters`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class AdapterUsage:
    """What clients asked of one adapter, across engines."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
