"""Every span, event and attribute name nomoat's traces use, in one place.

The GenAI names follow the OpenTelemetry GenAI semantic conventions, which
live in their own repository (open-telemetry/semantic-conventions-genai)
since 2026 and are still "development": no tagged release exists. nomoat
follows the registry as of commit ``002c8a6`` of that repository, whose
manifest publishes the schema URL below (it depends on the core conventions
1.44.0, where ``server.*``, ``error.type`` and the HTTP names come from).
The schema URL is recorded on nomoat's tracer; a later version of the
conventions is a change to this module only.

Names of nomoat's own (routing, the engine's phases, deployments) are under
``nomoat.``, as the conventions ask of names they do not define.

This module imports nothing: backends and the engine may use it without
pulling in the OpenTelemetry SDK.
"""

from __future__ import annotations

from typing import Final

# The pinned version of the GenAI conventions (see the module's docstring).
GENAI_CONVENTIONS_COMMIT: Final = "002c8a6ea1c8a42b14a4527db83b3cabcded610a"
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

# gen_ai.provider.name per backend type: the conventions' well-known value
# where there is one ("openai"), else the engine's own name.
PROVIDERS: Final = {
    "openai": "openai",
    "vllm": "vllm",
    "edge": "llama.cpp",
    "llamacpp": "llama.cpp",
}
