"""The soak's verdict on failures (loadtests/soak.py): every failure must be
an injected cut's error event, and every cut a failure, except that up to one
request per user is in flight when locust stops its users and is counted
nowhere (its cut may already be injected)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))

from soak import LocustResult, judge

USERS = 4
EVENT = {"Error": "CatchResponseError('error event: ...')"}


def verdict_for(failures: int, cuts: int, error: str = EVENT["Error"]) -> list[str]:
    result = LocustResult(0, 100, failures, failure_rows=[{"Error": error}] if failures else [])
    verdict = judge(
        result,
        [],
        [],
        {"reset": 3, "cut": cuts},
        seconds=120,
        users=USERS,
        max_tokens=12,
        warmup=40,
        tolerance=0.1,
    )
    return verdict.problems


@pytest.mark.parametrize("failures", [10, 10 - USERS])
def test_cuts_and_their_error_events_agree(failures: int) -> None:
    assert verdict_for(failures, cuts=10) == []


@pytest.mark.parametrize("failures", [11, 10 - USERS - 1])
def test_a_failure_beyond_the_cuts_or_a_lost_error_event_fails(failures: int) -> None:
    assert verdict_for(failures, cuts=10)


def test_a_failure_that_is_not_an_error_event_fails() -> None:
    assert verdict_for(10, cuts=10, error="ConnectionResetError")
