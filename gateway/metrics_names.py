"""The version of the OpenTelemetry GenAI semantic conventions nomoat's
metrics follow (a later version is a change here), their bucket boundaries,
provider names, and every label the request metrics may carry.

Imports nothing, so tests and tools may read it without prometheus-client.
"""

from __future__ import annotations

# The GenAI metrics of this release of the semantic conventions. They read the
# same in open-telemetry/semantic-conventions-genai, where the conventions have
# moved since, up to its unreleased change that replaces gen_ai.client.token.usage
# by counters (gen_ai.client.inference.tokens and others): not followed yet.
SEMCONV_VERSION = "1.44.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

# The conventions' ExplicitBucketBoundaries, per metric.
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# Hooks run in microseconds to milliseconds (a classifier on a large body: tens).
HOOK_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

# gen_ai.provider.name on the server metrics: the server these describe.
SERVER_PROVIDER = "nomoat"
# Backend types (config `type`) as gen_ai.provider.name: the conventions'
# well-known value where there is one, else the engine's own name.
PROVIDERS = {"openai": "openai", "vllm": "vllm", "edge": "llama.cpp", "llamacpp": "llama.cpp"}

# Every label any request metric carries; tests check /metrics against it.
GENAI_LABELS = (
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_token_type",
    "error_type",
)
NOMOAT_LABELS = (
    "model",
    "deployment",
    "backend",
    "adapter",
    "status_class",
    "hook",
    "stage",
    "fallback",
    # nomoat_worker_info: which of `nomoat serve --workers N` answered.
    "worker",
)


def provider_name(backend_type: str) -> str:
    return PROVIDERS.get(backend_type, backend_type)
