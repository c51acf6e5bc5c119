"""Dry runs (``Pipeline.explain``, ``POST /admin/route/explain``): the live
state (rules, health, cooldowns, load) and each policy's ranking, with
nothing sent and no policy state moved. In process, with fake backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from pydantic import BaseModel

from gateway import explain, wire
from gateway.app import Runtime, create_app
from gateway.auth import hash_api_key
from gateway.catalog import BackendPlan, Catalog, ModelEntry, Plan, Retry
from gateway.contract import (
    AdapterCounters,
    BackendHealth,
    BackendType,
    Candidate,
    EngineLoad,
    ModelCapabilities,
    RequestContext,
    Target,
)
from gateway.decision_log import DecisionLog, RouteDecision, read_log
from gateway.decisions import RouteTrace
from gateway.endpoints import CHAT
from gateway.errors import UpstreamError
from gateway.lora.registry import AdapterRegistry
from gateway.lora.sources import locate, sha256_of
from gateway.pipeline import Pipeline
from gateway.policies import manifest
from gateway.replay import replay
from gateway.rules import Rule
from gateway.settings import LimitSettings, Settings
from gateway.testing import build_policy, chat_completion, chat_request, completion

API_KEY = "sk-nomoat-test-0123456789abcdef"
ADMIN_KEY = "sk-nomoat-admin-0123456789abcdef"


class FakeBackend:
    """Answers at once (or fails), reports a load and a health; counts calls."""

    def __init__(
        self,
        name: str,
        *,
        ready: bool = True,
        detail: str = "",
        fails: bool = False,
        load: EngineLoad | None = None,
    ) -> None:
        self.name = name
        self.calls = 0
        self._health = BackendHealth(ready, detail)
        self._fails = fails
        self._load = load or EngineLoad(running=0, waiting=0)

    def capabilities(self, engine_model: str) -> ModelCapabilities:
        return ModelCapabilities(context_length=4096)

    def _called(self) -> None:
        self.calls += 1
        if self._fails:
            raise UpstreamError(f"{self.name} is unreachable")

    async def chat(
        self, request: wire.ChatCompletionRequest, target: Target, ctx: RequestContext
    ) -> wire.ChatCompletion:
        self._called()
        return chat_completion(model=target.model)

    async def completion(
        self, request: wire.CompletionRequest, target: Target, ctx: RequestContext
    ) -> wire.Completion:
        self._called()
        return completion(model=target.model)

    def chat_stream(
        self, request: wire.ChatCompletionRequest, target: Target, ctx: RequestContext
    ) -> AsyncIterator[wire.ChatCompletionChunk]:
        raise NotImplementedError

    def completion_stream(
        self, request: wire.CompletionRequest, target: Target, ctx: RequestContext
    ) -> AsyncIterator[wire.Completion]:
        raise NotImplementedError

    async def models(self) -> Sequence[str]:
        return []

    async def health(self) -> BackendHealth:
        return self._health

    def load(self) -> EngineLoad:
        return self._load

    async def aclose(self) -> None:
        pass


def deployments(model: str, *backends: str, weights: Sequence[float] = ()) -> tuple[Candidate, ...]:
    return tuple(
        Candidate(Target(model, model, f"{model}/{i}"), backend, (list(weights) or [1.0] * 9)[i])
        for i, backend in enumerate(backends)
    )


def entry(name: str, candidates: tuple[Candidate, ...], policy: str, **fields: Any) -> ModelEntry:
    options = fields.pop("options", {})
    return ModelEntry(
        name, candidates, build_policy(manifest, options, policy), "test", policy, **fields
    )


def pipeline(entries: Sequence[ModelEntry], backends: Sequence[FakeBackend]) -> Pipeline:
    catalog = Catalog({e.name: e for e in entries})
    return Pipeline(LimitSettings(), catalog, {b.name: b for b in backends})


def ctx(**headers: str) -> RequestContext:
    return RequestContext("req", 0, None, None, headers)


def explained(serving: Pipeline, **headers: str) -> RouteDecision:
    return asyncio.run(serving.explain(chat_request(model="m"), ctx(**headers)))


def order(decision: RouteDecision) -> list[str]:
    return [choice.deployment for choice in decision.rankings[0].ranked]


@pytest.mark.parametrize("policy", ["weighted-round-robin", "lora-affinity"])
def test_a_dry_run_moves_no_policy_state_and_sends_nothing(policy: str) -> None:
    backends = [FakeBackend("a"), FakeBackend("b"), FakeBackend("c")]
    candidates = deployments("m", "a", "b", "c", weights=(1, 2, 3))
    explaining = pipeline([entry("m", candidates, policy)], backends)
    quiet = pipeline([entry("m", candidates, policy)], [FakeBackend(b.name) for b in backends])

    async def chosen(serving: Pipeline, explain_first: bool) -> list[str]:
        picks = []
        for _ in range(12):
            if explain_first:
                before = await serving.explain(chat_request(model="m"), ctx())
                again = await serving.explain(chat_request(model="m"), ctx())
                assert order(before) == order(again)
            trace = RouteTrace("chat", 0)
            await serving.answer(CHAT, chat_request(model="m"), ctx(), trace)
            assert trace.decision is not None
            picks.append(str(trace.decision.chosen))
            assert trace.decision.header().startswith(f"deployment={picks[-1]}; backend=")
            if explain_first:  # the explanation foretold the choice
                assert picks[-1] == order(before)[0]
        return picks

    assert asyncio.run(chosen(explaining, True)) == asyncio.run(chosen(quiet, False))
    assert len(set(asyncio.run(chosen(quiet, False)))) > 1  # the state does move
    assert sum(b.calls for b in backends) == 12


def test_a_dry_run_shows_rule_health_cooldown_load_and_fallbacks() -> None:
    backends = [
        FakeBackend("a", load=EngineLoad(running=2, waiting=1, kv_cache_usage=0.5)),
        FakeBackend("b", ready=False, detail="probe failed: connection refused"),
        FakeBackend("c"),
        FakeBackend("d"),
        FakeBackend("e"),
    ]
    pool = frozenset({"m/0", "m/1", "m/2", "m/4"})
    model = entry(
        "m",
        deployments("m", "a", "b", "c", "d", "e"),
        "least-outstanding",
        fallbacks=("f",),
        rules=(Rule(pool, header=("x-tier", "gold")),),
    )
    serving = pipeline([model, entry("f", deployments("f", "e"), "ordered")], backends)
    serving.stats.started("m/0")  # one request in flight
    serving.stats.failed("m/2")  # cooling down

    decision = explained(serving, **{"x-tier": "gold"})
    first, fallback = decision.rankings
    assert decision.dry_run and decision.outcome == "dry_run" and first.seq == -1
    assert first.rule == "rules[0] (header x-tier: gold): pool m/0, m/1, m/2, m/4"
    assert [c.deployment for c in first.candidates] == ["m/0", "m/4"]
    assert order(decision) == ["m/4", "m/0"]
    assert [c.reason for c in first.ranked] == ["0 in flight", "1 in flight"]
    busy = first.candidates[0]
    assert (busy.stats.in_flight, busy.stats.running, busy.stats.queue_depth) == (1, 2, 1)
    assert busy.stats.kv_cache_usage == 0.5
    assert busy.health is not None and busy.health.ready
    down, cooling = first.excluded
    assert (down.deployment, down.backend) == ("m/1", "b")
    assert down.health is not None and not down.health.ready
    assert down.health.detail == "probe failed: connection refused"
    assert cooling.deployment == "m/2" and cooling.health is not None
    assert cooling.health.ready and 9 < cooling.health.cooldown_seconds <= 10
    assert (fallback.entry, fallback.policy, fallback.rule) == ("f", "ordered", None)
    assert [c.deployment for c in fallback.ranked] == ["f/0"]
    assert sum(b.calls for b in backends) == 0

    text = explain.table(decision)
    assert "model m, policy least-outstanding" in text and "fallback f, policy ordered" in text
    assert "rule: rules[0] (header x-tier: gold)" in text
    rows = {line.split()[1]: line.split() for line in text.splitlines() if "/" in line}
    assert rows["m/4"][:4] == ["1", "m/4", "e", "ready"]
    assert rows["m/0"][:10] == ["2", "m/0", "a", "ready", "-", "1", "2", "1", "50%", "-"]
    assert rows["m/1"][:4] == ["out", "m/1", "b", "down:"]
    assert rows["m/2"][:4] == ["out", "m/2", "c", "ready"]
    assert rows["m/2"][4] in ("9.9s", "10.0s")  # its cooldown
    assert text.count("not ranked: unhealthy") == 1 and text.count("not ranked: cooling down") == 1

    no_rule = explained(serving)
    assert no_rule.rankings[0].rule == "no rule matched (prompt ~1 tokens): every deployment"
    names = [c.deployment for c in (*no_rule.rankings[0].candidates, *no_rule.rankings[0].excluded)]
    assert sorted(names) == [f"m/{i}" for i in range(5)]


def test_every_policy_call_of_a_request_is_in_its_decision() -> None:
    """A fallback model's ranking is recorded beside the first one, so
    replaying a stateful fallback policy stays in step."""
    backends = [FakeBackend("a", fails=True), FakeBackend("b")]
    model = entry("m", deployments("m", "a"), "ordered", fallbacks=("f",), retry=Retry(rounds=0))
    serving = pipeline([model, entry("f", deployments("f", "b"), "weighted-round-robin")], backends)
    trace = RouteTrace("chat", 10)
    asyncio.run(serving.answer(CHAT, chat_request(model="m"), ctx(), trace))
    decision = trace.decision
    assert decision is not None
    assert [(r.entry, r.policy) for r in decision.rankings] == [
        ("m", "ordered"),
        ("f", "weighted-round-robin"),
    ]
    assert decision.rankings[0].seq < decision.rankings[1].seq
    assert decision.attempts == [("m/0", "upstream_error"), ("f/0", "ok")]
    assert decision.header() == "deployment=f/0; fallback=true; tried=2"


# ------------------------------------------------------------- the endpoint


class _NoOptions(BaseModel):
    pass


@pytest.fixture
def admin() -> Iterator[tuple[TestClient[Any], dict[str, FakeBackend]]]:
    backends = {name: FakeBackend(name) for name in ("a", "b")}

    async def start(name: str, config: BaseModel) -> FakeBackend:
        return backends[name]

    fake: BackendType[Any] = BackendType(_NoOptions, start)
    model = entry("m", deployments("m", "a", "b"), "session-affinity", options={"key": "header"})
    plan = Plan(
        tuple(BackendPlan(name, fake, _NoOptions()) for name in backends),
        Catalog({"m": model}),
    )
    settings = Settings(
        server={
            "api_key_hashes": [hash_api_key(API_KEY)],
            "admin_key_hashes": [hash_api_key(ADMIN_KEY)],
        },  # type: ignore[arg-type]
        backends={},
        models={},
    )
    with TestClient(create_app(Runtime(settings, plan))) as client:
        yield client, backends


def post(client: TestClient[Any], body: object, key: str | None = ADMIN_KEY) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/admin/route/explain", json=body, headers=headers)


def test_the_endpoint_needs_an_admin_key(
    admin: tuple[TestClient[Any], dict[str, FakeBackend]],
) -> None:
    client, _ = admin
    assert post(client, {"model": "m"}, key=None).status_code == 401
    answer = post(client, {"model": "m"}, key=API_KEY)
    assert answer.status_code == 403
    assert "may not use the admin API" in answer.json()["error"]["message"]


def test_the_endpoint_explains_a_body_with_simulated_headers(
    admin: tuple[TestClient[Any], dict[str, FakeBackend]],
) -> None:
    client, backends = admin
    by_session: dict[str, set[str]] = {}
    for session in ("s1", "s2", "s3", "s4", "s1"):
        answer = post(client, {"model": "m", "headers": {"X-Session-Id": session}})
        assert answer.status_code == 200, answer.text
        decision = answer.json()
        assert decision["request"]["headers"] == {"x-session-id": session}
        assert decision["rankings"][0]["ranked"][0]["reason"] == "session hash"
        by_session.setdefault(session, set()).add(
            decision["rankings"][0]["ranked"][0]["deployment"]
        )
    assert by_session["s1"] and len(by_session["s1"]) == 1
    body = {"model": "m", "prompt": "x" * 400, "max_tokens": 3}
    answer = post(client, {"request": body, "api_key_id": "abc123"})
    decision = answer.json()
    assert decision["request"]["endpoint"] == "completions"
    assert decision["request"]["prompt_tokens"] == 100
    assert decision["request"]["api_key_id"] == "abc123"
    assert decision["request"]["max_tokens"] == 3
    assert decision["rankings"][0]["candidates"][0]["health"]["ready"] is True
    assert all(b.calls == 0 for b in backends.values())


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, 'give either "model" or "request"'),
        ({"model": "m", "request": {"model": "m", "messages": []}}, 400, "give either"),
        ({"model": "m", "nope": 1}, 400, "Invalid explain request"),
        ({"request": {"model": "m", "messages": []}}, 400, "at least one message"),
        ({"request": {"model": "m", "prompt": "x", "n": 999}}, 400, "n: at most"),
        ({"model": "unknown"}, 404, "The model `unknown` does not exist"),
    ],
)
def test_the_endpoint_refuses_what_the_api_refuses(
    admin: tuple[TestClient[Any], dict[str, FakeBackend]],
    body: object,
    status: int,
    message: str,
) -> None:
    client, _ = admin
    answer = post(client, body)
    assert answer.status_code == status
    assert message in answer.json()["error"]["message"]


class FakeLoRABackend(FakeBackend):
    """Takes adapter requests; holds ``held`` adapters out of ``slots``."""

    def __init__(self, name: str, held: frozenset[str], slots: int) -> None:
        super().__init__(name)
        self._held = held
        self._slots = slots

    def serves_adapters(self) -> bool:
        return True

    def can_stack(self) -> bool:
        return True

    def adapters_loaded(self) -> frozenset[str]:
        return self._held

    def adapter_slots(self) -> int | None:
        return self._slots

    async def unload_adapter(self, name: str) -> None:
        pass

    def adapter_counters(self) -> Mapping[str, AdapterCounters]:
        return {}


def test_adapter_requests_are_explained_and_their_log_replays(tmp_path: Path) -> None:
    """Through the real pipeline: the adapters of the target, those each
    engine holds and its slots are shown, recorded, and replayed exactly."""
    (tmp_path / "fr.gguf").write_bytes(b"not really a GGUF")
    (tmp_path / "de.gguf").write_bytes(b"nor this one")
    backends = [
        FakeLoRABackend("a", frozenset({"de"}), slots=1),
        FakeLoRABackend("b", frozenset({"fr", "it"}), slots=2),
        FakeLoRABackend("c", frozenset(), slots=4),
    ]
    model = entry("m", deployments("m", "a", "b", "c"), "lora-affinity")
    catalog = Catalog({"m": model})
    registry = AdapterRegistry(tmp_path, catalog.knows, catalog.canonical)
    for name in ("fr", "de"):
        registry.add_verified(
            name, "m", f"{name}.gguf", sha256_of(locate(tmp_path, f"{name}.gguf"))
        )
    log = DecisionLog(tmp_path / "decisions.jsonl")
    serving = Pipeline(
        LimitSettings(), catalog, {b.name: b for b in backends}, decision_log=log, adapters=registry
    )

    decision = asyncio.run(serving.explain(chat_request(model="fr"), ctx()))
    (ranking,) = decision.rankings
    assert ranking.ranked[0].deployment == "m/1"
    assert ranking.ranked[0].reason.startswith("holds the adapter")
    held = {
        c.deployment: (c.stats.adapters_loaded, c.stats.adapter_slots) for c in ranking.candidates
    }
    assert held == {"m/0": (["de"], 1), "m/1": (["fr", "it"], 2), "m/2": ([], 4)}
    assert all(c.model == "fr" and [(a.name, a.scale) for a in c.adapters] == [("fr", 1.0)]
               for c in ranking.candidates)  # fmt: skip
    assert "adapters: fr@1" in explain.table(decision)

    async def serve() -> None:
        for name in ("fr", "de", "m:fr@0.5+de", "m", "fr", "de"):
            await serving.answer(CHAT, chat_request(model=name), ctx())
        await log.flush()

    asyncio.run(serve())
    records = read_log(log.path)
    assert [r.rankings[0].candidates[0].model for r in records][2] == "m:fr@0.5+de"
    stack = records[2].rankings[0].candidates[0].adapters
    assert [(a.name, a.scale) for a in stack] == [("fr", 0.5), ("de", 1.0)]
    report = replay(records, lambda: build_policy(manifest, {}, "lora-affinity"))
    assert (report.rankings, report.same_order, report.agreed) == (6, 6, 6)
