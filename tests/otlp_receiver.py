"""A real OTLP trace receiver for tests (no Collector binary can be
installed here): its own process, listening on loopback over both OTLP
transports, http/protobuf (``POST /v1/traces``) and grpc (``TraceService/
Export``), decoding each export with ``opentelemetry-proto`` and appending
every span as one JSON line to a file.

Run as ``python -m tests.otlp_receiver OUT_FILE``; it prints its two ports
(``http=PORT grpc=PORT``) on its first line of stdout once both listen.
:func:`running_receiver` does that for a test and reads the spans back.

Not a test file.
"""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------- the receiver


def _value(any_value: Any) -> object:
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    return getattr(any_value, kind)


def _attributes(pairs: Any) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in pairs}


def spans_of(request: Any, transport: str) -> list[dict[str, object]]:
    """An ExportTraceServiceRequest's spans, flattened, with their resource
    and scope, ids in hex."""
    spans: list[dict[str, object]] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    {
                        "transport": transport,
                        "service": resource.get("service.name"),
                        "resource": resource,
                        "scope": scope_spans.scope.name,
                        "schema_url": scope_spans.schema_url,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "attributes": _attributes(span.attributes),
                        "events": [
                            {"name": e.name, "attributes": _attributes(e.attributes)}
                            for e in span.events
                        ],
                        "status": span.status.code,
                    }
                )
    return spans


class _Sink:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def write(self, spans: list[dict[str, object]]) -> None:
        with self._lock, self._path.open("a") as out:
            for span in spans:
                out.write(json.dumps(span) + "\n")


def serve(out: Path) -> None:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as service
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as service_grpc

    sink = _Sink(out)

    class Http(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            request = service.ExportTraceServiceRequest()
            request.ParseFromString(body)
            sink.write(spans_of(request, "http/protobuf"))
            reply = service.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Traces(service_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (grpc's name)
            sink.write(spans_of(request, "grpc"))
            return service.ExportTraceServiceResponse()

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_grpc.add_TraceServiceServicer_to_server(Traces(), grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    http_server = ThreadingHTTPServer(("127.0.0.1", 0), Http)
    print(f"http={http_server.server_address[1]} grpc={grpc_port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=http_server.shutdown).start())
    http_server.serve_forever()
    grpc_server.stop(grace=1)


# ------------------------------------------------------------- for the tests


@dataclass
class Receiver:
    http_endpoint: str  # the base URL (OTEL_EXPORTER_OTLP_ENDPOINT over http/protobuf)
    grpc_endpoint: str  # http://127.0.0.1:PORT (over grpc)
    out: Path
    process: subprocess.Popen[str]

    def spans(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    def wait_for(self, check: Any, seconds: float = 60.0) -> list[dict[str, Any]]:
        """The spans once ``check(spans)`` is true (exports come in batches,
        seconds apart); the last ones seen if it never is."""
        deadline = time.monotonic() + seconds
        spans = self.spans()
        while not check(spans) and time.monotonic() < deadline:
            time.sleep(0.2)
            spans = self.spans()
        return spans


@contextmanager
def running_receiver(directory: Path) -> Iterator[Receiver]:
    out = directory / "spans.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.otlp_receiver", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().split()
        ports = dict(item.split("=") for item in first)
        yield Receiver(
            f"http://127.0.0.1:{ports['http']}",
            f"http://127.0.0.1:{ports['grpc']}",
            out,
            process,
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
