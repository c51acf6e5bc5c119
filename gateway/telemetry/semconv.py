"""Every span, event, attribute and metric name nomoat's traces and
metrics use, the metrics' bucket boundaries and the provider names, in one
place: the OpenTelemetry semantic conventions as nomoat follows them.

The GenAI names follow the OpenTelemetry GenAI semantic conventions, which
live in their own repository (open-telemetry/semantic-conventions-genai)
since 2026 and are still "development": no tagged release exists. nomoat
follows the registry as of commit ``002c8a6`` of that repository, whose
manifest publishes the schema URL below (it depends on the core conventions
1.44.0, where ``server.*``, ``error.type`` and the HTTP names come from).
The schema URL is recorded on nomoat's tracer and on its meter (OTLP metrics
export); a later version of the conventions is a change to this module only.
The GenAI metrics below read the same at that commit as in the core
conventions 1.44.0 (up to an unreleased change in the GenAI repository that
replaces ``gen_ai.client.token.usage`` by counters: not followed yet).

Names of nomoat's own (routing, the engine's phases, deployments) are under
``nomoat.``, as the conventions ask of names they do not define.

This module imports nothing: backends, the engine, tests and tools may use
it without pulling in the OpenTelemetry SDK or prometheus-client.
"""

from __future__ import annotations

from typing import Final

# The pinned version of the GenAI conventions (see the module's docstring),
# and of the core conventions it builds on.
GENAI_CONVENTIONS_COMMIT: Final = "002c8a6ea1c8a42b14a4527db83b3cabcded610a"
CORE_CONVENTIONS_VERSION: Final = "1.44.0"
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/gen-ai-dev/1.42.0-dev"
INSTRUMENTATION_SCOPE: Final = "nomoat"

# ------------------------------------------------------------------ GenAI
OPERATION_NAME: Final = "gen_ai.operation.name"
PROVIDER_NAME: Final = "gen_ai.provider.name"
REQUEST_MODEL: Final = "gen_ai.request.model"
REQUEST_STREAM: Final = "gen_ai.request.stream"
REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
REQUEST_TOP_P: Final = "gen_ai.request.top_p"
REQUEST_FREQUENCY_PENALTY: Final = "gen_ai.request.frequency_penalty"
REQUEST_PRESENCE_PENALTY: Final = "gen_ai.request.presence_penalty"
REQUEST_STOP_SEQUENCES: Final = "gen_ai.request.stop_sequences"
REQUEST_SEED: Final = "gen_ai.request.seed"
REQUEST_CHOICE_COUNT: Final = "gen_ai.request.choice.count"
OUTPUT_TYPE: Final = "gen_ai.output.type"
TOKEN_TYPE: Final = "gen_ai.token.type"  # on gen_ai.client.token.usage
RESPONSE_MODEL: Final = "gen_ai.response.model"
RESPONSE_ID: Final = "gen_ai.response.id"
RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
RESPONSE_TIME_TO_FIRST_CHUNK: Final = "gen_ai.response.time_to_first_chunk"
USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
USAGE_CACHE_READ_INPUT_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
# Opt-in content, recorded only with telemetry.capture_content, after the
# request hooks (redaction) have run.
INPUT_MESSAGES: Final = "gen_ai.input.messages"
OUTPUT_MESSAGES: Final = "gen_ai.output.messages"

# gen_ai.operation.name values.
OPERATION_CHAT: Final = "chat"
OPERATION_TEXT_COMPLETION: Final = "text_completion"
OPERATION_EMBEDDINGS: Final = "embeddings"

# ------------------------------------------------------- core conventions
ERROR_TYPE: Final = "error.type"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
HTTP_ROUTE: Final = "http.route"
URL_PATH: Final = "url.path"
# error.type's value when nothing more specific is known (the conventions' fallback).
ERROR_OTHER: Final = "_OTHER"

# ------------------------------------------------------------ nomoat's own
REQUEST_ID: Final = "nomoat.request.id"  # the x-request-id header
MODEL: Final = "nomoat.model"  # the name the client asked for
DEPLOYMENT: Final = "nomoat.deployment"
BACKEND: Final = "nomoat.backend"
ADAPTERS: Final = "nomoat.lora.adapters"  # names, in order
ADAPTER_SCALES: Final = "nomoat.lora.scales"  # their scales, same order
ATTEMPT: Final = "nomoat.attempt"  # 1 for the first attempt of a request
FALLBACK: Final = "nomoat.fallback"  # the attempt is for a fallback model
USAGE_ESTIMATED: Final = "nomoat.usage.estimated"  # tokens counted from chunks

# Routing: an event on the SERVER span per policy call; the candidates best
# first, and their backends, scores and reasons in the same order.
ROUTE_EVENT: Final = "nomoat.route"
ROUTE_POLICY: Final = "nomoat.route.policy"
ROUTE_RULE: Final = "nomoat.route.rule"
ROUTE_ROUND: Final = "nomoat.route.round"
ROUTE_CANDIDATES: Final = "nomoat.route.candidates"
ROUTE_BACKENDS: Final = "nomoat.route.backends"
ROUTE_SCORES: Final = "nomoat.route.scores"
ROUTE_REASONS: Final = "nomoat.route.reasons"
ROUTE_FALLBACKS: Final = "nomoat.route.fallbacks"

# The engine's phases (llama.cpp, embedded or on an edge node): child spans
# of the attempt span.
ENGINE_QUEUE_SPAN: Final = "engine.queue"
ENGINE_PROMPT_SPAN: Final = "engine.prompt"
ENGINE_DECODE_SPAN: Final = "engine.decode"
ENGINE_ADAPTER_LOAD_SPAN: Final = "engine.adapters.load"
ENGINE_PROMPT_TOKENS: Final = "nomoat.engine.prompt_tokens"
ENGINE_CACHED_TOKENS: Final = "nomoat.engine.cached_tokens"
ENGINE_OUTPUT_TOKENS: Final = "nomoat.engine.output_tokens"
ENGINE_FINISH_REASON: Final = "nomoat.engine.finish_reason"

# gen_ai.provider.name per backend type (config `type`): the conventions'
# well-known value where there is one ("openai"), else the engine's own name.
PROVIDERS: Final = {
    "openai": "openai",
    "vllm": "vllm",
    "edge": "llama.cpp",
    "llamacpp": "llama.cpp",
}
# gen_ai.provider.name on the server metrics: the server these describe.
SERVER_PROVIDER: Final = "nomoat"
# gen_ai.token.type values.
TOKEN_INPUT: Final = "input"
TOKEN_OUTPUT: Final = "output"


def provider_name(backend_type: str) -> str:
    """gen_ai.provider.name of a backend type."""
    return PROVIDERS.get(backend_type, backend_type)


# ---------------------------------------------------------------- metrics
# Instruments (OTLP export) with their units; on /metrics under the names
# OpenTelemetry's Prometheus exporter gives them (dots to underscores, the
# unit as a suffix, counters ending in _total), below.
CLIENT_OPERATION_DURATION: Final = "gen_ai.client.operation.duration"  # s
CLIENT_TOKEN_USAGE: Final = "gen_ai.client.token.usage"  # {token}
SERVER_REQUEST_DURATION: Final = "gen_ai.server.request.duration"  # s
SERVER_TIME_TO_FIRST_TOKEN: Final = "gen_ai.server.time_to_first_token"  # s
SERVER_TIME_PER_OUTPUT_TOKEN: Final = "gen_ai.server.time_per_output_token"  # s
REQUESTS_METRIC: Final = "nomoat.requests"  # {request}
IN_FLIGHT_METRIC: Final = "nomoat.requests.in_flight"  # {request}
RETRIES_METRIC: Final = "nomoat.retries"  # {round}
FALLBACKS_METRIC: Final = "nomoat.fallbacks"  # {model}
COOLDOWNS_METRIC: Final = "nomoat.cooldowns"  # {cooldown}
HOOK_DURATION_METRIC: Final = "nomoat.hook.duration"  # s


def prometheus_label(attribute: str) -> str:
    """An attribute's name as a Prometheus label (dots to underscores)."""
    return attribute.replace(".", "_")


PROM_CLIENT_OPERATION_DURATION: Final = "gen_ai_client_operation_duration_seconds"
PROM_CLIENT_TOKEN_USAGE: Final = "gen_ai_client_token_usage"
PROM_SERVER_REQUEST_DURATION: Final = "gen_ai_server_request_duration_seconds"
PROM_SERVER_TIME_TO_FIRST_TOKEN: Final = "gen_ai_server_time_to_first_token_seconds"
PROM_SERVER_TIME_PER_OUTPUT_TOKEN: Final = "gen_ai_server_time_per_output_token_seconds"
PROM_REQUESTS: Final = "nomoat_requests_total"
PROM_IN_FLIGHT: Final = "nomoat_requests_in_flight"
PROM_RETRIES: Final = "nomoat_retries_total"
PROM_FALLBACKS: Final = "nomoat_fallbacks_total"
PROM_COOLDOWNS: Final = "nomoat_cooldowns_total"
PROM_HOOK_DURATION: Final = "nomoat_hook_duration_seconds"

# The conventions' ExplicitBucketBoundaries, per metric.
DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TPOT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# Hooks run in microseconds to milliseconds (a classifier on a large body: tens).
HOOK_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

# Every label any request metric carries on /metrics; tests check against it.
# The GenAI attributes, as labels:
GENAI_LABELS: Final = tuple(
    prometheus_label(name)
    for name in (OPERATION_NAME, PROVIDER_NAME, REQUEST_MODEL, TOKEN_TYPE, ERROR_TYPE)
)
# nomoat's own labels (bounded by the configuration):
NOMOAT_LABELS: Final = (
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
