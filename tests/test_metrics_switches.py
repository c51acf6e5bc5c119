"""When the request metrics are also exported over OTLP: asked for in the file
or by the standard variable, and never with the SDK disabled."""

from __future__ import annotations

import pytest

from gateway.metrics_otlp import otlp_metrics_wanted
from gateway.settings import MetricsSettings


@pytest.mark.parametrize(
    ("otlp", "env", "wanted"),
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"OTEL_METRICS_EXPORTER": "otlp"}, True),
        (False, {"OTEL_METRICS_EXPORTER": "console, otlp"}, True),
        (False, {"OTEL_METRICS_EXPORTER": "none"}, False),
        # An endpoint alone exports traces (otel-traces), not metrics.
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
        (True, {"OTEL_SDK_DISABLED": "true"}, False),
        (False, {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ],
)
def test_otlp_export_is_asked_for(
    otlp: bool, env: dict[str, str], wanted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_METRICS_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert otlp_metrics_wanted(MetricsSettings(otlp=otlp)) is wanted
