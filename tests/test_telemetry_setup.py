"""Tracing set up the standard way: OTEL_* variables win over [telemetry];
off (None) without an endpoint or when disabled; the sampler, the resource
and the exporter each as configured. Unit level: nothing is exported."""

from __future__ import annotations

import uuid

import pytest
from conftest import Cli
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpExporter,
)
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased
from pydantic import ValidationError

from gateway.settings import Settings, TelemetrySettings
from gateway.telemetry import semconv as names
from gateway.telemetry.setup import (
    build_tracing,
    enabled,
    exporter,
    new_instance_id,
    problems,
    resource,
    sampler,
    span_processors,
    trace_export,
    tracer_provider,
)
from gateway.telemetry.spans import Tracing

FILE = TelemetrySettings(endpoint="http://file:4318", headers={"x-file": "1"})


def test_nothing_configured_is_off() -> None:
    assert build_tracing(TelemetrySettings(), {}) is None
    assert Settings().telemetry == TelemetrySettings()


@pytest.mark.parametrize(
    ("settings", "env", "on"),
    [
        (FILE, {}, True),
        (TelemetrySettings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318"}, True),
        (TelemetrySettings(), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://e/v1/traces"}, True),
        (FILE, {"OTEL_SDK_DISABLED": "true"}, False),
        (FILE, {"OTEL_SDK_DISABLED": "false"}, True),
        (FILE.model_copy(update={"enabled": False}), {}, False),
    ],
)
def test_on_with_an_endpoint_unless_disabled(
    settings: TelemetrySettings, env: dict[str, str], on: bool
) -> None:
    assert enabled(settings, env) is on
    built = build_tracing(settings, env)
    assert (built is not None) is on
    if built is not None:
        built[1].shutdown()  # nothing was traced: nothing to export


def test_the_file_gives_the_endpoint_and_headers_when_the_environment_does_not() -> None:
    export = trace_export(FILE, {})
    assert export.protocol == "http/protobuf"
    assert export.endpoint == "http://file:4318/v1/traces"
    assert export.headers == {"x-file": "1"}
    traces = FILE.model_copy(update={"traces_endpoint": "http://t:1/custom"})
    assert trace_export(traces, {}).endpoint == "http://t:1/custom"
    grpc = FILE.model_copy(update={"protocol": "grpc", "endpoint": "http://file:4317"})
    assert trace_export(grpc, {}).endpoint == "http://file:4317"


def test_the_environment_wins_over_the_file() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-env=2",
    }
    export = trace_export(FILE, env)
    # The exporter reads the endpoint and headers from the environment itself.
    assert (export.protocol, export.endpoint, export.headers) == ("grpc", None, None)
    assert isinstance(exporter(export), GrpcExporter)
    traces_only = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_PROTOCOL": "x"}
    assert trace_export(FILE, traces_only).protocol == "grpc"
    assert isinstance(exporter(trace_export(FILE, {})), HttpExporter)


def test_an_unknown_protocol_is_refused() -> None:
    with pytest.raises(ValueError, match="http/json"):
        trace_export(FILE, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_samplers_by_their_standard_names() -> None:
    assert sampler(FILE, {"OTEL_TRACES_SAMPLER": "always_off"}) is ALWAYS_OFF
    assert sampler(FILE, {"OTEL_TRACES_SAMPLER": "always_on"}) is ALWAYS_ON
    ratio = sampler(
        FILE, {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    )
    assert isinstance(ratio, TraceIdRatioBased) and ratio.rate == 0.25
    from_file = sampler(FILE.model_copy(update={"sampler": "parentbased_traceidratio"}), {})
    assert isinstance(from_file, ParentBased)
    assert isinstance(sampler(FILE, {}), ParentBased)  # the default: parentbased_always_on
    with pytest.raises(ValueError, match="sometimes"):
        sampler(FILE, {"OTEL_TRACES_SAMPLER": "sometimes"})


def test_the_resource_names_nomoat_unless_the_environment_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    settings = TelemetrySettings(resource_attributes={"team": "a", "region": "x"})
    plain = resource(settings, "i-1").attributes
    assert plain["service.name"] == "nomoat" and plain["team"] == "a"
    assert plain["service.instance.id"] == "i-1"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gw-1")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "team=b")
    overridden = resource(settings, "i-1").attributes
    assert overridden["service.name"] == "gw-1"
    assert overridden["team"] == "b" and overridden["region"] == "x"


def test_each_process_has_its_own_instance_id_unless_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # --workers N: each process's spans and metrics must stay apart in a backend.
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    ids = {new_instance_id() for _ in range(3)}
    assert len(ids) == 3
    assert all(str(uuid.UUID(one)) == one for one in ids)
    provider = tracer_provider(FILE, SimpleSpanProcessor(InMemorySpanExporter()), {}, None, "w-2")
    assert provider.resource.attributes["service.instance.id"] == "w-2"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-7")
    assert resource(FILE, "w-2").attributes["service.instance.id"] == "pod-7"


def test_the_provider_has_the_sampler_resource_and_schema_url() -> None:
    exported = InMemorySpanExporter()
    settings = FILE.model_copy(update={"service_name": "gw"})
    provider = tracer_provider(settings, SimpleSpanProcessor(exported), {})
    Tracing(provider).tracer.start_span("x").end()
    [span] = exported.get_finished_spans()
    assert span.resource.attributes["service.name"] == "gw"
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.schema_url == names.SCHEMA_URL
    assert span.instrumentation_scope.name == names.INSTRUMENTATION_SCOPE
    off = tracer_provider(
        FILE, SimpleSpanProcessor(exported), {"OTEL_TRACES_SAMPLER": "always_off"}
    )
    Tracing(off).tracer.start_span("y").end()
    assert len(exported.get_finished_spans()) == 1


def test_the_environment_sets_telemetry_keys_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOMOAT_TELEMETRY__CAPTURE_CONTENT", "true")
    assert Settings(telemetry={"endpoint": "http://x:1"}).telemetry.capture_content is True


def test_a_sampler_the_sdk_does_not_know_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="sampler"):
        TelemetrySettings(sampler="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", 'OTLP protocol "http/json"'),
        ("OTEL_TRACES_SAMPLER", "sometimes", 'trace sampler "sometimes"'),
    ],
)
def test_serve_refuses_otel_variables_it_cannot_honour(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, name: str, value: str, said: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv(name, value)
    ran = cli("serve", "--port", "0")
    assert ran.returncode == 2
    assert "configuration error" in ran.stderr and said in ran.stderr
    assert problems(TelemetrySettings(), {name: value}) == []  # no endpoint: tracing off


def test_nomoats_spans_reach_processors_added_to_the_provider_later() -> None:
    # The recorder reaches the provider's processors through the set handed
    # to the provider's constructor (public API), those added later too.
    processors = span_processors()
    provider = tracer_provider(FILE, SimpleSpanProcessor(InMemorySpanExporter()), {}, processors)
    tracing = Tracing(provider, processors=processors)
    later = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(later))
    tracing.request("POST", "/v1/chat/completions", [], "rid").finish(200)
    [span] = later.get_finished_spans()
    assert span.name == "POST /v1/chat/completions"
    assert span.attributes is not None and span.attributes[names.REQUEST_ID] == "rid"
