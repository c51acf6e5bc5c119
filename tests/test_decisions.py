"""Explaining and replaying routing decisions."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import openai
import pytest

from gateway.contract import (
    AnyRequest,
    Candidate,
    CandidateStats,
    RankedCandidate,
    RequestContext,
)
from gateway.decisions import CandidateView, RouteDecision, StatsView, read_log
from gateway.policies import OrderedPolicy
from gateway.replay import replay
from tests.conftest import MODEL, Cli, config_with_key, running_server

TWO_DEPLOYMENTS = """
[backends.embedded]
type = "llamacpp"

[models.smollm2-135m-instruct]
deployments = [
  { backend = "embedded", model = "smollm2-135m-instruct" },
  { backend = "embedded", model = "smollm2-135m-instruct", weight = 2.0 },
]
"""


def test_route_explain_prints_every_candidate_with_score_and_reason(
    tmp_path: Path, cli: Cli
) -> None:
    config = tmp_path / "two.toml"
    config.write_text(TWO_DEPLOYMENTS)
    done = cli("route", "--explain", "--config", str(config), "--model", MODEL)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"model {MODEL}, policy ordered"
    assert lines[1].startswith(f"1. {MODEL}/0 on embedded") and "score 2" in lines[1]
    assert lines[2].startswith(f"2. {MODEL}/1 on embedded") and "score 1" in lines[2]
    assert "because position 1 in config" in lines[2]


def test_route_explain_unknown_model_fails(cli: Cli) -> None:
    done = cli("route", "--explain", "--model", "nope")
    assert done.returncode == 1
    assert "nope" in done.stderr


def test_plugins_lists_components_and_their_use(cli: Cli) -> None:
    done = cli("plugins")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert ["llamacpp", "backend", "llamacpp", "backends.embedded"] in rows
    assert ["builtin-policies", "policy", "ordered", f"models.{MODEL}"] in rows
    assert ["builtin-policies", "policy", "session-affinity", "-"] in rows


class Reverse:
    """Prefers the last deployment: a policy that disagrees with `ordered`."""

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        ordered = list(reversed(candidates))
        return [
            RankedCandidate(c, float(len(ordered) - i), "reversed") for i, c in enumerate(ordered)
        ]


def decision(request_id: str, deployments: list[str]) -> RouteDecision:
    stats = StatsView(in_flight=0, queue_depth=None, ewma_ttft=None, ewma_token_time=None)
    views = [
        CandidateView(
            deployment=name,
            backend="b",
            engine_model="e",
            weight=1.0,
            score=float(len(deployments) - i),
            reason="",
            stats=stats,
        )
        for i, name in enumerate(deployments)
    ]
    return RouteDecision(
        request_id=request_id,
        model="m",
        policy="ordered",
        endpoint="chat",
        body_bytes=10,
        stream=False,
        candidates=views,
        chosen=deployments[0],
        outcome="ok",
    )


def test_replay_compares_first_choices_per_record() -> None:
    log = [decision("r1", ["m/0", "m/1"]), decision("r2", ["m/0", "m/1"]), decision("r3", ["m/0"])]
    same = replay(log, OrderedPolicy())
    assert (same.records, same.agreed, same.changed) == (3, 3, [])
    other = replay(log, Reverse())
    assert other.agreed == 1
    assert other.changed == [("r1", "m/0", "m/1"), ("r2", "m/0", "m/1")]
    assert other.replayed["m/1"] == 2 and other.recorded["m/0"] == 3


@pytest.mark.e2e
def test_a_live_run_is_explained_logged_and_replayed(tmp_path: Path, cli: Cli) -> None:
    log_path = tmp_path / "decisions.jsonl"
    extra = f'route_header = true\ndecision_log = "{log_path}"\n'
    config = config_with_key().replace("[server]\n", "[server]\n" + extra)
    with running_server(tmp_path, config) as live:
        client = openai.OpenAI(base_url=live.base_url, api_key=live.api_key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert raw.headers["x-nomoat-route"].startswith(f"deployment={MODEL}/0; backend=embedded")
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
        )
        assert [chunk for chunk in stream]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(_lines(log_path)) < 2:
            time.sleep(0.2)
    records = read_log(log_path)
    assert [(r.endpoint, r.stream, r.outcome) for r in records] == [
        ("chat", False, "ok"),
        ("chat", True, "ok"),
    ]
    assert all(r.chosen == f"{MODEL}/0" and r.prompt is None for r in records)
    assert all(r.candidates[0].reason == "position 0 in config" for r in records)
    done = cli("replay", str(log_path), "--policy", "ordered")
    assert done.returncode == 0, done.stderr
    assert "same first choice: 2 (100.0%)" in done.stdout


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
