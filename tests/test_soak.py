"""The soak, for two minutes (issue 11, "Soak"; the 30-minute run is in
docs/security/soak.md): locust against a gateway on the real embedded engine
and two ``nomoat edge`` nodes, each node behind a fault proxy that resets one
chat request in eight before its answer (edge-a) or cuts one stream in eight
in the middle of an event (edge-b).

Asserted (loadtests/soak.py's verdict): no client error but one error event
per injected cut, every process alive and answering ``/health``, and after a
40-second warm-up the resident memory and the open descriptors of the gateway
and both nodes within 10 % of where they were.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtests"))

from soak import soak  # noqa: E402

# Three engines and locust for two minutes, plus their start-up on a busy machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_two_minutes_of_load_with_faults_leave_no_error_and_no_growth(tmp_path: Path) -> None:
    verdict = soak(
        tmp_path,
        seconds=120,
        users=4,
        max_tokens=12,
        warmup=40,
        interval=2,
        csv_path=tmp_path / "soak.csv",
        fault_every=8,
    )
    assert verdict.passed, verdict.problems
    # The faults were really injected, both kinds: the verdict means something.
    assert verdict.injected.get("reset", 0) >= 1, verdict.injected
    assert verdict.injected.get("cut", 0) >= 1, verdict.injected
    assert verdict.requests >= 40, verdict.requests
