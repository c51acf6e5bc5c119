"""Tracing set up the standard way: the OpenTelemetry SDK, an OTLP exporter
(http/protobuf or grpc), configured by the standard ``OTEL_*`` variables,
each of which wins over its key of ``[telemetry]``:

=====================================  ==============================
variable                               ``[telemetry]`` key
=====================================  ==============================
OTEL_SDK_DISABLED=true                 enabled = false
OTEL_EXPORTER_OTLP_ENDPOINT            endpoint
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT     traces_endpoint
OTEL_EXPORTER_OTLP(_TRACES)_PROTOCOL   protocol
OTEL_EXPORTER_OTLP(_TRACES)_HEADERS    headers
OTEL_TRACES_SAMPLER, _ARG              sampler, sampler_arg
OTEL_SERVICE_NAME                      service_name (default "nomoat")
OTEL_RESOURCE_ATTRIBUTES               resource_attributes
=====================================  ==============================

The exporters read the variables they know themselves (endpoint, headers,
timeout, certificates, compression); nomoat passes a value of the file only
when its variable is unset. Spans are exported in batches, off the request
path (``OTEL_BSP_*`` tune the batches).

No endpoint, or tracing disabled: :func:`build_tracing` returns ``None``,
and nothing of this package runs on the request path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, SynchronousMultiSpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from gateway.settings import TelemetrySettings
from gateway.telemetry.spans import Tracing

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True, slots=True)
class TraceExport:
    """Where and how spans are exported, the environment applied."""

    protocol: str
    # The exporter's ``endpoint`` argument, or None: it reads its variables.
    endpoint: str | None
    headers: Mapping[str, str] | None


def enabled(settings: TelemetrySettings, env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if not settings.enabled:
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or settings.traces_endpoint
        or settings.endpoint
    )


def trace_export(settings: TelemetrySettings, env: Mapping[str, str]) -> TraceExport:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or settings.protocol
    ).strip()
    if protocol not in ("http/protobuf", "grpc"):
        raise ValueError(f'OTLP protocol "{protocol}" is not supported (use http/protobuf or grpc)')
    endpoint: str | None = None
    if not env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") and not env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        if settings.traces_endpoint:
            endpoint = settings.traces_endpoint
        elif settings.endpoint:
            base = settings.endpoint.rstrip("/")
            endpoint = base + TRACES_PATH if protocol == "http/protobuf" else base
    headers = None
    if not env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") and not env.get(
        "OTEL_EXPORTER_OTLP_HEADERS"
    ):
        headers = dict(settings.headers) or None
    return TraceExport(protocol, endpoint, headers)


def exporter(export: TraceExport) -> SpanExporter:
    if export.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        insecure = None
        if export.endpoint is not None and export.endpoint.startswith("http://"):
            insecure = True
        headers = dict(export.headers) if export.headers is not None else None
        return GrpcExporter(endpoint=export.endpoint, headers=headers, insecure=insecure)
    # The SDK's http/protobuf exporter with an encoder about three times
    # cheaper (gateway/telemetry/otlp.py).
    from gateway.telemetry.otlp import FastOTLPSpanExporter

    return FastOTLPSpanExporter(endpoint=export.endpoint, headers=export.headers)


def sampler(settings: TelemetrySettings, env: Mapping[str, str]) -> Sampler:
    """The sampler OTEL_TRACES_SAMPLER (or ``sampler``) names."""
    name = (env.get("OTEL_TRACES_SAMPLER") or settings.sampler).strip().lower()
    raw_arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    ratio = settings.sampler_arg
    if raw_arg:
        try:
            ratio = min(max(float(raw_arg), 0.0), 1.0)
        except ValueError:
            ratio = 1.0
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise ValueError(f'trace sampler "{name}" is not one of {", ".join(samplers)}')
    return samplers[name]


def new_instance_id() -> str:
    """A process's ``service.instance.id``: a random UUID, as the resource
    conventions recommend (a restarted pod keeps its host name and pid 1)."""
    return str(uuid.uuid4())


def resource(settings: TelemetrySettings, instance_id: str) -> Resource:
    """service.name "nomoat", this process's service.instance.id (so the
    processes of ``--workers N`` and the replicas export series a backend
    keeps apart, rather than one overwriting another) and the file's
    attributes, under what OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES say."""
    base = Resource.create(
        {
            "service.name": settings.service_name,
            "service.instance.id": instance_id,
            **settings.resource_attributes,
        }
    )
    return base.merge(OTELResourceDetector().detect())


def span_processors() -> SynchronousMultiSpanProcessor:
    """What a provider hands its spans to (all its processors, in order)."""
    return SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]


def tracer_provider(
    settings: TelemetrySettings,
    processor: SpanProcessor,
    env: Mapping[str, str],
    processors: SynchronousMultiSpanProcessor | None = None,
    instance_id: str | None = None,
) -> TracerProvider:
    """The provider, its span processors ``processors`` (given to the
    constructor, so nomoat's recorder can reach them: see recorder.py) with
    ``processor`` added."""
    provider = TracerProvider(
        sampler=sampler(settings, env),
        resource=resource(settings, instance_id or new_instance_id()),
        active_span_processor=processors or span_processors(),
    )
    provider.add_span_processor(processor)
    return provider


def problems(settings: TelemetrySettings, env: Mapping[str, str] | None = None) -> list[str]:
    """What in the OTEL_* variables (the file is validated with the rest of
    it) would stop tracing from starting, each said plainly."""
    env = os.environ if env is None else env
    if not enabled(settings, env):
        return []
    found = []
    for check in (trace_export, sampler):
        try:
            check(settings, env)
        except ValueError as error:
            found.append(f"telemetry: {error}")
    return found


def build_tracing(
    settings: TelemetrySettings,
    env: Mapping[str, str] | None = None,
    instance_id: str | None = None,
) -> tuple[Tracing, TracerProvider] | None:
    """Tracing with OTLP export as configured, or ``None`` when it is off.
    Shut the provider down at exit (it flushes the last batch)."""
    env = os.environ if env is None else env
    if not enabled(settings, env):
        return None
    processor = BatchSpanProcessor(exporter(trace_export(settings, env)))
    processors = span_processors()
    provider = tracer_provider(settings, processor, env, processors, instance_id)
    tracing = Tracing(provider, processors=processors, capture_content=settings.capture_content)
    return tracing, provider
