"""Issue 13's load test, small: 50 managed keys, two real `nomoat serve`
replicas sharing PostgreSQL and Redis, a bounded load over both; the ledger's
totals per key (``/admin/usage?group_by=key``) equal what the clients got
(loadtests/ledger_load.py; docs/benchmarks.md has a full-size run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "loadtests"))

from ledger_load import parse_args, run

pytestmark = pytest.mark.e2e


def test_two_replicas_ledger_equals_what_clients_received(
    tmp_path: Path, postgres_server: str, redis_url: str
) -> None:
    args = parse_args(
        [
            "--requests",
            "600",
            "--concurrency",
            "16",
            "--keys",
            "50",
            "--seconds",
            "60",
            "--postgres",
            postgres_server,
            "--redis",
            redis_url,
        ]
    )
    report = run(args, tmp_path)
    assert report.sent == 600
    assert report.failed == 0, report.problems
    assert report.problems == []
    # Both upstreams served (their completions differ: 6 and 9 tokens), so
    # the per-key totals depend on routing, not only on counts.
    assert 6 * 600 < report.completion_tokens < 9 * 600
    assert report.ledger_requests == 600
    assert report.ledger_completion_tokens == report.completion_tokens
