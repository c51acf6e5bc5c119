"""Optional OTLP export of the request metrics, through the OpenTelemetry SDK.

Switched on by ``[metrics] otlp = true`` or ``OTEL_METRICS_EXPORTER=otlp``;
the standard variables say where and how (``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``..._PROTOCOL`` ``http/protobuf`` (the
default) or ``grpc``, ``..._HEADERS``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``); ``OTEL_SDK_DISABLED=true`` wins over both.

Each call is recorded in ``prometheus-client`` first (``/metrics`` stays as
it is) and then in the SDK, whose instruments carry the conventions' names,
units and bucket boundaries. The SDK costs about ten times as much per
observation, which is why it is not on the request path unless asked for.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gateway import wire
from gateway.contract import Target
from gateway.exchange import Exchange, adapter_label
from gateway.metrics import PrometheusMetrics
from gateway.settings import MetricsSettings
from gateway.telemetry import semconv as names
from gateway.telemetry.semconv import (
    DURATION_BUCKETS,
    HOOK_BUCKETS,
    SCHEMA_URL,
    SERVER_PROVIDER,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter
    from opentelemetry.sdk.resources import Resource

Attributes = dict[str, str]


def otlp_metrics_wanted(settings: MetricsSettings) -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = os.environ.get("OTEL_METRICS_EXPORTER", "")
    return settings.otlp or "otlp" in [e.strip() for e in exporters.split(",")]


def _exporter() -> MetricExporter:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


def _provider(interval_seconds: float, resource: Resource) -> MeterProvider:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    buckets = {
        names.CLIENT_OPERATION_DURATION: DURATION_BUCKETS,
        names.CLIENT_TOKEN_USAGE: TOKEN_BUCKETS,
        names.SERVER_REQUEST_DURATION: DURATION_BUCKETS,
        names.SERVER_TIME_TO_FIRST_TOKEN: TTFT_BUCKETS,
        names.SERVER_TIME_PER_OUTPUT_TOKEN: TPOT_BUCKETS,
        names.HOOK_DURATION_METRIC: HOOK_BUCKETS,
    }
    views = [
        View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(bounds))
        for name, bounds in buckets.items()
    ]
    reader = PeriodicExportingMetricReader(
        _exporter(), export_interval_millis=interval_seconds * 1000
    )
    return MeterProvider(
        metric_readers=[reader],
        resource=resource,
        views=views,
    )


class OtlpMetrics:
    """The request metrics recorded in ``prometheus-client`` and in the SDK."""

    def __init__(
        self, inner: PrometheusMetrics, interval_seconds: float, resource: Resource
    ) -> None:
        """``resource``: the traces' own (gateway/telemetry/setup.py), so a
        process's metrics and spans carry one service.instance.id."""
        self._inner = inner
        self._provider = _provider(interval_seconds, resource)
        meter = self._provider.get_meter(names.INSTRUMENTATION_SCOPE, schema_url=SCHEMA_URL)
        self._client_duration = meter.create_histogram(
            names.CLIENT_OPERATION_DURATION, "s", "GenAI operation duration."
        )
        self._token_usage = meter.create_histogram(
            names.CLIENT_TOKEN_USAGE, "{token}", "Number of input and output tokens used."
        )
        self._server_duration = meter.create_histogram(
            names.SERVER_REQUEST_DURATION, "s", "Generative AI server request duration."
        )
        self._ttft = meter.create_histogram(
            names.SERVER_TIME_TO_FIRST_TOKEN, "s", "Time to generate first token."
        )
        self._tpot = meter.create_histogram(
            names.SERVER_TIME_PER_OUTPUT_TOKEN, "s", "Time per output token after the first."
        )
        self._requests = meter.create_counter(names.REQUESTS_METRIC, "{request}", "Requests.")
        self._in_flight = meter.create_up_down_counter(
            names.IN_FLIGHT_METRIC, "{request}", "Requests being served."
        )
        self._retries = meter.create_counter(names.RETRIES_METRIC, "{round}", "Retry rounds.")
        self._fallbacks = meter.create_counter(
            names.FALLBACKS_METRIC, "{model}", "Fallbacks tried."
        )
        self._cooldowns = meter.create_counter(names.COOLDOWNS_METRIC, "{cooldown}", "Cooldowns.")
        self._hook_time = meter.create_histogram(names.HOOK_DURATION_METRIC, "s", "Time in hooks.")

    def shutdown(self) -> None:
        """Export what is left, then stop."""
        self._provider.shutdown()

    def request_started(self) -> None:
        self._inner.request_started()
        self._in_flight.add(1)

    def request_ended(self, exchange: Exchange, status: int, error: str | None) -> None:
        self._inner.request_ended(exchange, status, error)
        now = exchange.seconds()
        self._in_flight.add(-1)
        place = _place(exchange.model, exchange.deployment, exchange.backend)
        self._requests.add(
            1, {**place, "adapter": exchange.adapter, "status_class": f"{status // 100}xx"}
        )
        server = {**_genai(exchange.operation, SERVER_PROVIDER, exchange.model), **place}
        self._server_duration.record(now, {**server, **_error(error)})
        first = exchange.time_to_first_token()
        if error is not None or first is None:
            return
        self._ttft.record(first, server)
        tokens = exchange.output_tokens() or 0
        if tokens > 1:
            self._tpot.record((now - first) / (tokens - 1), server)

    def attempt_ended(
        self,
        exchange: Exchange,
        target: Target,
        backend: str,
        seconds: float,
        usage: wire.Usage | None,
        error: str | None,
    ) -> None:
        self._inner.attempt_ended(exchange, target, backend, seconds, usage, error)
        provider = self._inner.provider(backend)
        genai = _genai(exchange.operation, provider, target.engine_model)
        place = _place(exchange.model, target.deployment, backend)
        self._client_duration.record(seconds, {**genai, **place, **_error(error)})
        output = usage.completion_tokens if usage is not None else exchange.output_tokens()
        if output is None:
            return
        labels = {**genai, **place, "adapter": adapter_label(target)}
        if usage is not None:
            self._token_usage.record(
                usage.prompt_tokens, {**labels, names.TOKEN_TYPE: names.TOKEN_INPUT}
            )
        self._token_usage.record(output, {**labels, names.TOKEN_TYPE: names.TOKEN_OUTPUT})

    def retried(self, model: str) -> None:
        self._inner.retried(model)
        self._retries.add(1, {"model": model})

    def fell_back(self, model: str, fallback: str) -> None:
        self._inner.fell_back(model, fallback)
        self._fallbacks.add(1, {"model": model, "fallback": fallback})

    def cooled_down(self, model: str, deployment: str, backend: str) -> None:
        self._inner.cooled_down(model, deployment, backend)
        self._cooldowns.add(1, _place(model, deployment, backend))

    def hook_timed(self, hook: str, stage: str, seconds: float) -> None:
        self._inner.hook_timed(hook, stage, seconds)
        self._hook_time.record(seconds, {"hook": hook, "stage": stage})


def _genai(operation: str, provider: str, model: str) -> Attributes:
    return {
        names.OPERATION_NAME: operation,
        names.PROVIDER_NAME: provider,
        names.REQUEST_MODEL: model,
    }


def _place(model: str, deployment: str, backend: str) -> Attributes:
    return {"model": model, "deployment": deployment, "backend": backend}


def _error(error: str | None) -> Attributes:
    return {} if error is None else {names.ERROR_TYPE: error}
