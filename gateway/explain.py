"""``nomoat route --explain``: ask a running gateway how it would route a
request (``POST /admin/route/explain``) and print the answer as a table.

The gateway ranks on its live state (health, cooldowns, requests in flight,
engine queues, loaded adapters) with a copy of each policy, so the answer is
what the next request would meet, and nothing is sent to any engine.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping

import msgspec

from gateway.decision_log import CandidateView, RankingRecord, RouteDecision

_decoder = msgspec.json.Decoder(RouteDecision)


class ExplainError(Exception):
    """The gateway could not be asked, or refused; the message says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def ask(
    url: str,
    model: str,
    *,
    message: str | None = None,
    headers: Mapping[str, str] | None = None,
    api_key_id: str | None = None,
    admin_key: str | None = None,
    timeout: float = 30.0,
) -> RouteDecision:
    """The gateway's dry-run decision for a chat request to ``model``."""
    form: dict[str, object] = {"headers": dict(headers or {}), "api_key_id": api_key_id}
    if message is None:
        form["model"] = model
    else:
        form["request"] = {"model": model, "messages": [{"role": "user", "content": message}]}
    call = urllib.request.Request(
        url.rstrip("/") + "/admin/route/explain",
        data=json.dumps(form).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if admin_key:
        call.add_header("Authorization", f"Bearer {admin_key}")
    try:
        with urllib.request.urlopen(call, timeout=timeout) as answer:
            return _decoder.decode(answer.read())
    except urllib.error.HTTPError as error:
        message = f"the gateway answered {error.code}: {_message(error.read())}"
        raise ExplainError(message, error.code) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise ExplainError(f"cannot reach the gateway at {url}: {reason}") from None
    except msgspec.DecodeError as error:
        raise ExplainError(f"{url} did not answer with a routing decision: {error}") from None


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:300]


_COLUMNS = (
    "rank",
    "deployment",
    "backend",
    "health",
    "cooldown",
    "in flight",
    "running",
    "waiting",
    "kv",
    "ttft",
    "s/token",
    "adapters held",
    "score",
    "reason",
)


def table(decision: RouteDecision) -> str:
    """The decision as text: per model (then each fallback), the rule and
    one row per deployment of the pool, ranked ones first."""
    request = decision.request
    lines = [f"request: {request.endpoint} to {request.model}, ~{request.prompt_tokens} tokens"]
    for position, ranking in enumerate(decision.rankings):
        role = "model" if position == 0 else "fallback"
        lines.append("")
        lines.append(f"{role} {ranking.entry}, policy {ranking.policy}")
        if ranking.rule is not None:
            lines.append(f"rule: {ranking.rule}")
        adapters = _adapters(ranking)
        if adapters:
            lines.append(f"adapters: {adapters}")
        lines.extend(_grid([_COLUMNS, *_rows(ranking)]))
    return "\n".join(lines)


def _adapters(ranking: RankingRecord) -> str:
    views = ranking.candidates or ranking.excluded
    if not views:
        return ""
    return " + ".join(f"{a.name}@{a.scale:g}" for a in views[0].adapters)


def _rows(ranking: RankingRecord) -> list[tuple[str, ...]]:
    views = {v.deployment: v for v in ranking.candidates}
    rows = [
        _row(str(rank), views[choice.deployment], _score(choice.score), choice.reason)
        for rank, choice in enumerate(ranking.ranked, start=1)
    ]
    ranked = {choice.deployment for choice in ranking.ranked}
    rows += [
        _row("-", v, "-", "left out by the policy")
        for v in ranking.candidates
        if v.deployment not in ranked
    ]
    rows += [_row("out", v, "-", f"not ranked: {_why_out(v)}") for v in ranking.excluded]
    return rows


def _score(score: float | None) -> str:
    return "inf" if score is None else f"{score:.4g}"


def _why_out(view: CandidateView) -> str:
    return "cooling down" if view.health is not None and view.health.ready else "unhealthy"


def _row(rank: str, view: CandidateView, score: str, reason: str) -> tuple[str, ...]:
    health = view.health
    stats = view.stats
    return (
        rank,
        view.deployment,
        view.backend,
        _health(view),
        f"{health.cooldown_seconds:.1f}s" if health and health.cooldown_seconds else "-",
        str(stats.in_flight),
        _maybe(stats.running),
        _maybe(stats.queue_depth),
        _maybe(stats.kv_cache_usage, "{:.0%}"),
        _maybe(stats.ewma_ttft, "{:.3f}s"),
        _maybe(stats.ewma_token_time, "{:.4f}"),
        ",".join(stats.adapters_loaded) or "-",
        score,
        reason,
    )


def _health(view: CandidateView) -> str:
    health = view.health
    if health is None:
        return "?"
    return "ready" if health.ready else f"down: {health.detail}"[:40]


def _maybe(value: float | None, spec: str = "{}") -> str:
    return "-" if value is None else spec.format(value)


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
