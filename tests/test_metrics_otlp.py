"""OTLP export of the request metrics, over HTTP/protobuf and gRPC, to a real
receiver that decodes the protobuf (``opentelemetry-proto``): the GenAI
instruments arrive under the conventions' names, units and bucket
boundaries, with the schema URL, and count the requests sent.

The receivers run in threads of their own: the SDK's last export, at the
gateway's shutdown, is a blocking call."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as service
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as service_grpc
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

from gateway.telemetry.semconv import DURATION_BUCKETS, SCHEMA_URL, TOKEN_BUCKETS, TTFT_BUCKETS
from gateway.testing.inprocess import in_process_gateway
from tests.fast.support import chat_body, pool

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Received:
    """What a receiver decoded, request by request."""

    def __init__(self) -> None:
        self.requests: list[service.ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()

    def add(self, request: service.ExportMetricsServiceRequest) -> None:
        with self.lock:
            self.requests.append(request)

    def metrics(self) -> dict[str, tuple[str, Metric]]:
        """The last data point set of each metric, with its scope's schema URL."""
        found: dict[str, tuple[str, Metric]] = {}
        with self.lock:
            for request in self.requests:
                for resource in request.resource_metrics:
                    for scope in resource.scope_metrics:
                        for metric in scope.metrics:
                            found[metric.name] = (scope.schema_url, metric)
        return found

    def service_names(self) -> set[str]:
        return self.resource_values("service.name")

    def resource_values(self, key: str) -> set[str]:
        return {
            attribute.value.string_value
            for request in self.requests
            for resource in request.resource_metrics
            for attribute in resource.resource.attributes
            if attribute.key == key
        }


@contextmanager
def http_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = service.ExportMetricsServiceRequest()
            request.ParseFromString(body)
            assert self.path == "/v1/metrics"
            received.add(request)
            payload = service.ExportMetricsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Metrics(service_grpc.MetricsServiceServicer):
        def Export(  # noqa: N802 (the generated service's name)
            self, request: service.ExportMetricsServiceRequest, context: object
        ) -> service.ExportMetricsServiceResponse:
            received.add(request)
            return service.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None)


def histogram_count(metric: Metric, **attributes: str) -> int:
    return sum(
        point.count
        for point in metric.histogram.data_points
        if all(
            any(a.key == key and a.value.string_value == value for a in point.attributes)
            for key, value in attributes.items()
        )
    )


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_the_request_metrics_are_exported_over_otlp(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = http_receiver if protocol == "http/protobuf" else grpc_receiver
    with receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "nomoat-under-test")
        async with in_process_gateway(pool("a")) as gw:
            for stream in (False, True, True):
                response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=stream))
                assert response.status_code == 200
            instance = gw.runtime.instance_id
        # The gateway's shutdown exported what was left.
        metrics = received.metrics()
    assert received.service_names() == {"nomoat-under-test"}
    # The process's own id (the traces carry the same): workers stay apart.
    assert received.resource_values("service.instance.id") == {instance}
    schema, server = metrics["gen_ai.server.request.duration"]
    assert schema == SCHEMA_URL
    assert server.unit == "s"
    assert histogram_count(server, **{"gen_ai.operation.name": "chat"}) == 3
    assert list(server.histogram.data_points[0].explicit_bounds) == list(DURATION_BUCKETS)
    _, first = metrics["gen_ai.server.time_to_first_token"]
    assert histogram_count(first) == 2
    assert list(first.histogram.data_points[0].explicit_bounds) == list(TTFT_BUCKETS)
    _, tokens = metrics["gen_ai.client.token.usage"]
    assert tokens.unit == "{token}"
    assert histogram_count(tokens, **{"gen_ai.token.type": "input"}) == 3
    assert histogram_count(tokens, **{"gen_ai.token.type": "output"}) == 3
    assert list(tokens.histogram.data_points[0].explicit_bounds) == [
        float(b) for b in TOKEN_BUCKETS
    ]
    _, client = metrics["gen_ai.client.operation.duration"]
    assert histogram_count(client, deployment="m/0", backend="a") == 3
    _, requests = metrics["nomoat.requests"]
    assert sum(point.as_int for point in requests.sum.data_points) == 3


async def test_nothing_is_exported_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    with http_receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
        async with in_process_gateway(pool("a")) as gw:
            response = await gw.http.post("/v1/chat/completions", json=chat_body())
            assert response.status_code == 200
    assert received.requests == []
