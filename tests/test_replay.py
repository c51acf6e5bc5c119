"""Decision logs replay exactly: every built-in policy, driven with varied
snapshots through the gateway's own recorder and log (no server), then
replayed from the file, reproduces every ranking it made, order, scores and
reasons, also for stateful policies and requests that finish out of order."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway import wire
from gateway.catalog import ModelEntry
from gateway.cli import main
from gateway.contract import (
    Adapter,
    AdapterUse,
    AnyRequest,
    Candidate,
    CandidateStats,
    RequestContext,
    RoutingPolicy,
    Target,
)
from gateway.decision_log import (
    DECISION_LOG_VERSION,
    CandidateView,
    DecisionLog,
    LogFormatError,
    RouteDecision,
    StatsView,
    read_log,
)
from gateway.decisions import Decisions, RouteTrace
from gateway.policies import manifest
from gateway.replay import in_call_order, rebuild_request, replay, rerank
from gateway.testing import build_policy, chat_request, completion_request

# Every built-in policy, with its default options and with others.
POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("ordered", {}),
    ("weighted-round-robin", {}),
    ("least-outstanding", {}),
    ("lowest-latency", {}),
    ("lowest-latency", {"expected_tokens": 32}),
    ("shortest-queue", {}),
    ("lowest-cost", {}),
    ("session-affinity", {}),
    ("session-affinity", {"key": "header", "header": "X-Session-Id"}),
    ("lora-affinity", {}),
    ("lora-affinity", {"load_tolerance": 0.5, "balance": 3}),
]
MODELS = ("alpha", "beta")
ADAPTERS = ("fr", "de", "es", "it")
WEIGHTS = (0.5, 1.0, 2.0, 3.0)
COSTS = (0.0, 0.1, 0.5, 2.0)


def policy_id(item: tuple[str, dict[str, Any]]) -> str:
    name, options = item
    return name + "".join(f"-{key}={value}" for key, value in options.items())


def new_policy(name: str, options: Mapping[str, Any]) -> RoutingPolicy:
    return build_policy(manifest, options, name)


def adapter(name: str, base: str) -> Adapter:
    return Adapter(name, base, "0" * 64, "peft", Path("/adapters") / name, name)


def random_request(rng: random.Random, model: str) -> tuple[AnyRequest, RequestContext]:
    fields: dict[str, Any] = {"stream": rng.random() < 0.3}
    if rng.random() < 0.6:
        fields["user"] = rng.choice(("ann", "bob", "cy", "dee"))
    if rng.random() < 0.6:
        fields["max_tokens"] = rng.randint(1, 512)
    headers = {"user-agent": "test", "x-api-key": "sk-secret", "x-auth-token": "t0ken"}
    if rng.random() < 0.7:
        headers["x-session-id"] = rng.choice(("s1", "s2", "s3", "s4", "s5"))
    if rng.random() < 0.5:
        request: AnyRequest = completion_request(
            "Hello " * rng.randint(0, 40), model=model, **fields
        )
    else:
        if rng.random() < 0.3:
            fields["max_completion_tokens"] = rng.randint(1, 512)
        request = chat_request("Hi " * rng.randint(0, 40), model=model, **fields)
    key_id = rng.choice((None, "a1b2c3d4e5f6"))
    ctx = RequestContext(f"req-{rng.getrandbits(48):012x}", 1_700_000_000, key_id, None, headers)
    return request, ctx


def random_pool(rng: random.Random, model: str, uses: tuple[AdapterUse, ...]) -> list[Candidate]:
    """Some of the model's four deployments (the healthy ones), in config order."""
    pool = []
    for index in range(4):
        if rng.random() < 0.8:
            name = "+".join(use.adapter.name for use in uses) if uses else model
            target = Target(name, f"engine-{model}", f"{model}/{index}", uses)
            price = COSTS[index]
            pool.append(Candidate(target, f"b{index}", WEIGHTS[index], price, 2 * price))
    return pool or [Candidate(Target(model, model, f"{model}/0", uses), "b0")]


def random_stats(rng: random.Random, pool: list[Candidate]) -> dict[str, CandidateStats]:
    def maybe(value: Any) -> Any:
        return value if rng.random() < 0.7 else None

    return {
        c.target.deployment: CandidateStats(
            in_flight=rng.randint(0, 6),
            queue_depth=maybe(rng.randint(0, 8)),
            ewma_ttft=maybe(rng.random() * 0.5),
            ewma_token_time=maybe(rng.random() * 0.05),
            running=maybe(rng.randint(0, 4)),
            kv_cache_usage=maybe(rng.random()),
            adapters_loaded=frozenset(a for a in ADAPTERS if rng.random() < 0.4),
            adapter_slots=maybe(rng.randint(1, 4)),
        )
        for c in pool
    }


def random_uses(rng: random.Random, model: str) -> tuple[AdapterUse, ...]:
    if rng.random() < 0.3:
        return ()
    names = rng.sample(ADAPTERS, rng.choice((1, 1, 1, 2)))
    return tuple(AdapterUse(adapter(n, model), rng.choice((1.0, 1.0, 0.7))) for n in names)


def record_log(path: Path, name: str, options: Mapping[str, Any], requests: int = 60) -> int:
    """Drive ``name`` as the gateway does, through the recorder, into the log at
    ``path``: two gateway starts, two models each, requests that finish out of
    order and some ranked again (a retry round). Returns the policy calls."""
    rng = random.Random(zlib.crc32(f"{name}{sorted(options.items())}".encode()))
    log = DecisionLog(path)
    calls = 0
    for run in range(2):
        decisions = Decisions(log, record_prompts=run == 1)
        entries = {m: ModelEntry(m, (), new_policy(name, options), "test", name) for m in MODELS}
        pending: list[tuple[RouteDecision, AnyRequest, RequestContext, ModelEntry]] = []
        for _ in range(requests):
            entry = entries[rng.choice(MODELS)]
            request, ctx = random_request(rng, entry.name)
            uses = random_uses(rng, entry.name)
            pool = random_pool(rng, entry.name, uses)
            trace = RouteTrace("completions" if "prompt" in _fields(request) else "chat", 99)
            ranking = decisions.rank(entry, request, ctx, pool, random_stats(rng, pool))
            decision = decisions.open(request, ctx, ranking, trace)
            calls += 1
            pending.append((decision, request, ctx, entry))
            while pending and rng.random() < 0.5:
                decision, request, ctx, entry = pending.pop(rng.randrange(len(pending)))
                if rng.random() < 0.25:  # another round for it, later than others' calls
                    pool = random_pool(rng, entry.name, uses)
                    again = decisions.rank(entry, request, ctx, pool, random_stats(rng, pool))
                    decisions.ranked_again(decision, again)
                    calls += 1
                chosen = decision.rankings[-1].ranked[0].deployment
                decision.attempts.append((chosen, "ok"))
                decision.chosen = chosen
                decisions.settle(decision, None)
        for decision, *_ in pending:
            decisions.settle(decision, None)
    asyncio.run(log.flush())
    return calls


def _fields(request: AnyRequest) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(wire.encoder.encode(request))
    return decoded


@pytest.mark.parametrize("policy", POLICIES, ids=policy_id)
def test_replaying_with_the_same_policy_reproduces_every_ranking(
    policy: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    name, options = policy
    path = tmp_path / "decisions.jsonl"
    calls = record_log(path, name, options)
    decisions = read_log(path)
    assert len(decisions) == 120

    report = replay(decisions, lambda: new_policy(name, options))
    assert report.rankings == calls > 120
    assert report.changed == []
    assert report.same_order == calls and report.agreed == report.records == 120

    # Scores and reasons too, not only the order.
    fresh: dict[tuple[str, str], RoutingPolicy] = {}
    for decision, ranking in in_call_order(decisions):
        policy_now = fresh.setdefault((decision.run, ranking.entry), new_policy(name, options))
        replayed = rerank(decision, ranking, policy_now)
        assert [
            (r.candidate.target.deployment, r.score if r.score != float("inf") else None, r.reason)
            for r in replayed
        ] == [(c.deployment, c.score, c.reason) for c in ranking.ranked]


@pytest.mark.parametrize("name", ["weighted-round-robin", "lora-affinity"])
def test_stateful_policies_replay_in_call_order_not_log_order(name: str, tmp_path: Path) -> None:
    """The log is in the order requests finished; replaying in that order
    would feed stateful policies their calls out of step (the test data
    above would not catch a replay that ignored ``seq``)."""
    path = tmp_path / "decisions.jsonl"
    record_log(path, name, {})
    decisions = read_log(path)
    seqs = [r.seq for d in decisions if d.run == decisions[0].run for r in d.rankings]
    assert seqs != sorted(seqs)
    fresh: dict[str, RoutingPolicy] = {}
    differs = 0
    for decision in decisions:
        for ranking in decision.rankings:
            policy = fresh.setdefault(decision.run + ranking.entry, new_policy(name, {}))
            after = [r.candidate.target.deployment for r in rerank(decision, ranking, policy)]
            differs += after != [c.deployment for c in ranking.ranked]
    assert differs > 0


# What a version 1 record held of a candidate and a request: the rest is what
# the old log lacked.
def _as_old_format(decision: RouteDecision) -> RouteDecision:
    request = msgspec.structs.replace(
        decision.request, user=None, max_tokens=None, max_completion_tokens=None, headers={}
    )
    rankings = [
        msgspec.structs.replace(r, candidates=[_old_candidate(c) for c in r.candidates])
        for r in decision.rankings
    ]
    return msgspec.structs.replace(decision, request=request, rankings=rankings)


def _old_candidate(view: CandidateView) -> CandidateView:
    stats = StatsView(
        in_flight=view.stats.in_flight,
        queue_depth=view.stats.queue_depth,
        ewma_ttft=view.stats.ewma_ttft,
        ewma_token_time=view.stats.ewma_token_time,
    )
    return msgspec.structs.replace(
        view, stats=stats, adapters=[], input_usd_per_million=0.0, output_usd_per_million=0.0
    )


@pytest.mark.parametrize(
    "policy",
    [
        ("lowest-latency", {}),
        ("shortest-queue", {}),
        ("lowest-cost", {}),
        ("session-affinity", {}),
        ("session-affinity", {"key": "header"}),
        ("lora-affinity", {}),
    ],
    ids=policy_id,
)
def test_what_the_old_format_lacked_changes_these_policies_rankings(
    policy: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The version 1 record (in flight, queue, the two averages) could not
    replay these: without the fields added since, their rankings change."""
    name, options = policy
    path = tmp_path / "decisions.jsonl"
    record_log(path, name, options)
    old = [_as_old_format(d) for d in read_log(path)]
    report = replay(old, lambda: new_policy(name, options))
    assert report.same_order < report.rankings


def test_the_record_holds_every_field_of_the_stats_and_the_candidate() -> None:
    stats_fields = {f.name for f in dataclasses.fields(CandidateStats)}
    assert set(StatsView.__struct_fields__) == stats_fields
    covered = {
        "target": {"deployment", "model", "engine_model", "adapters"},
        "backend": {"backend"},
        "weight": {"weight"},
        "input_usd_per_million": {"input_usd_per_million"},
        "output_usd_per_million": {"output_usd_per_million"},
        "max_concurrency": {"max_concurrency"},
    }
    assert set(covered) == {f.name for f in dataclasses.fields(Candidate)}
    assert covered["target"] == {f.name for f in dataclasses.fields(Target)}
    assert set().union(*covered.values()) <= set(CandidateView.__struct_fields__)


def _one_decision(record_prompts: bool, request: AnyRequest) -> RouteDecision:
    decisions = Decisions(None, record_prompts)
    headers = {
        "x-session-id": "s1",
        "x-api-key": "sk-1",
        "api-key": "sk-2",
        "x-auth-token": "t",
        "x-goog-api-key": "g",
        "x-client-secret": "c",
        "user-agent": "sdk",
    }
    ctx = RequestContext("req-1", 5, "fp1234", None, headers)
    entry = ModelEntry("m", (), new_policy("ordered", {}), "test", "ordered")
    pool = [Candidate(Target("m", "m", "m/0"), "b")]
    decision = decisions.open(request, ctx, decisions.rank(entry, request, ctx, pool, {}), None)
    decisions.settle(decision, None)
    return decision


def test_the_log_keeps_credentials_and_by_default_prompts_out() -> None:
    request = chat_request("my secret plan", user="u1")
    decision = _one_decision(False, request)
    line = msgspec.json.encode(decision).decode()
    assert decision.request.headers == {"x-session-id": "s1", "user-agent": "sdk"}
    assert "secret plan" not in line and "sk-" not in line
    assert decision.request.user == "u1" and decision.request.api_key_id == "fp1234"
    assert json.loads(line)["request"]["prompt"] is None
    assert json.loads(line)["version"] == DECISION_LOG_VERSION


@pytest.mark.parametrize(
    "request_",
    [
        chat_request(
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        ),
        completion_request("once upon"),
        completion_request([[1, 2, 3], [4]]),
    ],
    ids=["chat", "completion-text", "completion-tokens"],
)
def test_recorded_prompts_come_back_exactly(request_: AnyRequest, tmp_path: Path) -> None:
    decision = _one_decision(True, request_)
    path = tmp_path / "log.jsonl"
    path.write_bytes(msgspec.json.encode(decision) + b"\n")
    (loaded,) = read_log(path)
    rebuilt = rerank(loaded, loaded.rankings[0], new_policy("ordered", {}))
    assert rebuilt  # the record replays
    again = rebuild_request(loaded.request)
    if isinstance(request_, wire.ChatCompletionRequest):
        assert isinstance(again, wire.ChatCompletionRequest)
        assert again.messages == request_.messages
    else:
        assert isinstance(again, wire.CompletionRequest)
        assert again.prompt == request_.prompt


OLD_RECORD = {
    "request_id": "chatcmpl-1",
    "model": "m",
    "policy": "ordered",
    "endpoint": "chat",
    "body_bytes": 10,
    "stream": False,
    "candidates": [],
    "chosen": None,
    "outcome": "ok",
}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (json.dumps(OLD_RECORD), "format version 1, written by an older nomoat"),
        (json.dumps({"version": 9}), "format version 9, written by a newer nomoat"),
        ('{"version": 3, "run": 1}', ":1: not a decision record"),
        ("not json", ":1: not a decision record"),
    ],
    ids=["v1", "newer", "wrong-shape", "garbage"],
)
def test_logs_of_another_format_are_refused_clearly(
    line: str, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / "old.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(LogFormatError, match=expected):
        read_log(path)


# ------------------------------------------------------------------ the CLI


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def order_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("same ranking order"))


def test_cli_replay_takes_policy_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "decisions.jsonl"
    options = {"load_tolerance": 0.5, "balance": 3}
    record_log(path, "lora-affinity", options)
    log = str(path)

    code, out, _ = run_cli(
        capsys, "replay", log, "--policy", "lora-affinity",
        "--option", "load_tolerance=0.5", "--option", "balance=3",
    )  # fmt: skip
    assert code == 0 and order_line(out).endswith("(100.0%)")
    assert "same first choice: 120 (100.0%)" in out

    code, out, _ = run_cli(
        capsys, "replay", log, "--policy", "lora-affinity", "--options-json", json.dumps(options)
    )
    assert code == 0 and order_line(out).endswith("(100.0%)")

    code, out, _ = run_cli(capsys, "replay", log, "--policy", "lora-affinity")
    assert code == 0 and not order_line(out).endswith("(100.0%)")
    assert "changed rankings" in out

    code, out, _ = run_cli(
        capsys, "replay", log, "--policy", "lora-affinity", "--model", "alpha",
        "--option", "load_tolerance=0.5", "--option", "balance=3",
    )  # fmt: skip
    assert code == 0 and order_line(out).endswith("(100.0%)")
    assert "beta/" not in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--option", "nope=1"], "nope: unknown key (its options: load_tolerance, balance)"),
        (["--option", "load_tolerance=-1"], "load_tolerance: Input should be greater than"),
        (["--option", "load_tolerance"], "--option takes KEY=VALUE"),
        (["--options-json", "[1]"], "--options-json takes a JSON object"),
        (["--options-json", "{"], "--options-json is not JSON"),
    ],
)
def test_cli_replay_refuses_bad_options_clearly(
    args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "decisions.jsonl"
    path.write_text("")
    code, _, err = run_cli(capsys, "replay", str(path), "--policy", "lora-affinity", *args)
    assert code == 2
    assert expected in err


def test_cli_replay_refuses_an_unknown_policy_and_an_old_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(OLD_RECORD) + "\n")
    code, _, err = run_cli(capsys, "replay", str(path), "--policy", "fastest")
    assert code == 2 and 'unknown policy "fastest" (known: ' in err and "ordered" in err
    code, _, err = run_cli(capsys, "replay", str(path), "--policy", "ordered")
    assert code == 2 and "format version 1" in err
