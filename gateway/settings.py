"""Settings: a TOML file, overridden by ``NOMOAT_*`` environment variables.

Validation has two phases. Phase one checks the file's own shape (pydantic,
unknown keys rejected). Phase two needs the installed plugins: each
``[backends.NAME]`` table is validated by the config model of its ``type``, each
model's ``policy`` by its policy's model, and cross references (a deployment's
backend) are resolved. Both phases collect every error, each reported by its
path (``models.x.deployments[0].backend: unknown backend "y"``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.auth import KEY_HASH_FORMAT
from gateway.media import MediaPolicy
from gateway.schema_guard import SCHEMA_CEILINGS as _CEILING
from gateway.schema_guard import SchemaLimits

_SCHEMA_DEFAULTS = SchemaLimits()

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_BACKEND = "embedded"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _well_formed_hashes(hashes: tuple[str, ...]) -> tuple[str, ...]:
    for entry in hashes:
        if KEY_HASH_FORMAT.fullmatch(entry) is None:
            raise ValueError('each entry must be "sha256:" followed by 64 lowercase hex digits')
    return hashes


# Key hashes as `nomoat hash-key` prints them: any other spelling never matches a key.
KeyHashes = Annotated[tuple[str, ...], AfterValidator(_well_formed_hashes)]


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    # Hashes of the static API keys ("sha256:<hex>", see `nomoat hash-key`).
    # Once any is set, every request must present one.
    api_key_hashes: KeyHashes = ()
    # Hashes of the keys allowed to use the admin API (/admin/...). Once any
    # key exists (here or above), the admin API requires one of these.
    admin_key_hashes: KeyHashes = ()
    # Listening beyond loopback without keys is refused unless this is true.
    allow_unauthenticated_network: bool = False
    shutdown_grace_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # Full garbage collections run while no request is in progress, or at most
    # this many seconds apart under constant load, never in the middle of a
    # burst (gateway/collector.py). 0: CPython's own schedule.
    full_collection_max_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # With this many requests in progress or more, automatic garbage collection
    # is off until they fall to a quarter of it: in a burst the young
    # collections scan every stream's live objects and free nothing
    # (gateway/collector.py). 0: never off. Needs full_collection_max_seconds.
    collection_suspend_requests: Annotated[int, Field(ge=0, le=1_000_000)] = 64
    # Add an `x-nomoat-route` header (chosen deployment, score, policy) to responses.
    route_header: bool = False
    # Append every routing decision to this JSON-lines file (for `nomoat replay`).
    decision_log: Path | None = None
    # Also record prompt text in the decision log (off: sizes and timing only).
    decision_log_prompts: bool = False
    log_level: str = "info"
    # /metrics needs a key (of api_key_hashes or admin_key_hashes) like the
    # API does. Off by default: Prometheus scrapes without credentials.
    metrics_requires_key: bool = False

    @model_validator(mode="after")
    def _metrics_key_exists(self) -> ServerSettings:
        if self.metrics_requires_key and not (self.api_key_hashes or self.admin_key_hashes):
            raise ValueError(
                "metrics_requires_key needs a key in api_key_hashes or admin_key_hashes"
            )
        return self


class LimitSettings(_Strict):
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    max_messages: Annotated[int, Field(ge=1)] = 512
    max_n: Annotated[int, Field(ge=1, le=128)] = 8
    max_stop_sequences: Annotated[int, Field(ge=0)] = 4
    max_logit_bias: Annotated[int, Field(ge=0)] = 300
    max_tools: Annotated[int, Field(ge=0)] = 128
    # Generations one request asks for: its prompts (a completion request may
    # send a list) times n.
    max_choices: Annotated[int, Field(ge=1)] = 8
    # Characters in one stop sequence (engines match every stop against the
    # text held back after each token).
    max_stop_length: Annotated[int, Field(ge=1)] = 256
    # The highest max_tokens / max_completion_tokens a request may set.
    max_tokens_ceiling: Annotated[int, Field(ge=1)] = 16384
    # HTTP, before the request reaches the application: header lines, the
    # request line and headers together (431 past either), the URL (414).
    max_header_count: Annotated[int, Field(ge=8)] = 100
    max_header_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024
    max_url_bytes: Annotated[int, Field(ge=256)] = 8 * 1024
    # A request's line and headers must arrive within this time (from the
    # connection, or from its first byte on a kept-alive one): 408 past it.
    header_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    # A request body may pause this long between reads: 408 past it.
    body_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # Open client connections; a new one past it gets 503 with Retry-After
    # and is closed. Capped by the file descriptors the process may open.
    max_connections: Annotated[int, Field(ge=1)] = 4096
    # Requests in progress (a stream counts until its end); past it, 503
    # with Retry-After. /health and /ready are always answered.
    max_requests: Annotated[int, Field(ge=1)] = 512
    # The kernel's send buffer for each client connection, in bytes; 0: the
    # kernel sizes it (Linux grows it up to net.ipv4.tcp_wmem's maximum,
    # 4 MiB, for a client that reads slowly). Smaller: a slow reader holds
    # less memory, and its stream's generation waits for it sooner.
    socket_send_buffer_bytes: Annotated[int, Field(ge=0)] = 0
    # JSON schemas (response_format, each tool's parameters), before any
    # grammar is built (docs/security.md). The maxima are what llama.cpp can take.
    schema_max_bytes: Annotated[int, Field(ge=64, le=_CEILING.max_bytes)] = (
        _SCHEMA_DEFAULTS.max_bytes
    )
    schema_max_depth: Annotated[int, Field(ge=1, le=_CEILING.max_depth)] = (
        _SCHEMA_DEFAULTS.max_depth
    )
    schema_max_properties: Annotated[int, Field(ge=1, le=_CEILING.max_properties)] = (
        _SCHEMA_DEFAULTS.max_properties
    )
    schema_max_optional_properties: Annotated[
        int, Field(ge=0, le=_CEILING.max_optional_properties)
    ] = _SCHEMA_DEFAULTS.max_optional_properties
    schema_max_enum_values: Annotated[int, Field(ge=1, le=_CEILING.max_enum_values)] = (
        _SCHEMA_DEFAULTS.max_enum_values
    )
    schema_max_repetition: Annotated[int, Field(ge=1, le=_CEILING.max_repetition)] = (
        _SCHEMA_DEFAULTS.max_repetition
    )
    schema_max_pattern_length: Annotated[int, Field(ge=1, le=_CEILING.max_pattern_length)] = (
        _SCHEMA_DEFAULTS.max_pattern_length
    )
    schema_max_grammar_bytes: Annotated[int, Field(ge=1024, le=_CEILING.max_grammar_bytes)] = (
        _SCHEMA_DEFAULTS.max_grammar_bytes
    )

    def schema_limits(self) -> SchemaLimits:
        return SchemaLimits(
            max_bytes=self.schema_max_bytes,
            max_depth=self.schema_max_depth,
            max_properties=self.schema_max_properties,
            max_optional_properties=self.schema_max_optional_properties,
            max_enum_values=self.schema_max_enum_values,
            max_repetition=self.schema_max_repetition,
            max_pattern_length=self.schema_max_pattern_length,
            max_grammar_bytes=self.schema_max_grammar_bytes,
        )

    # Deepest nesting of arrays and objects in a request body (JSON schemas
    # included); deeper is a 400 before anything parses it further. At most
    # 256: deeper would reach Python's recursion limit in the decoder.
    max_json_depth: Annotated[int, Field(ge=8, le=256)] = 64
    # Adapter uploads to the admin API (PUT /admin/adapters/NAME/files, edge
    # nodes): the largest body, streamed to disk (a larger one is a 413 and
    # nothing of it is kept), and how many are received at once (one more is
    # a 503 with Retry-After).
    max_upload_bytes: Annotated[int, Field(ge=1024)] = 2 * 1024**3
    max_concurrent_uploads: Annotated[int, Field(ge=1)] = 2
    # Image URLs in chat messages, which the engine would fetch itself:
    # "data" (only data: URLs, the image inline), "remote" (http(s) too),
    # "none" (no image or audio parts at all). Others are a 400.
    media_urls: MediaPolicy = "data"


ModelCapability = Literal["chat", "embeddings"]


def _chat_only() -> list[ModelCapability]:
    return ["chat"]


class DeploymentSettings(_Strict):
    backend: str
    # A name for rules to refer to; defaults to the backend's name.
    name: str | None = None
    # The engine's own name for the model; defaults to the model's name.
    model: str | None = None
    weight: Annotated[float, Field(gt=0)] = 1.0
    # What a million tokens are charged here, in USD (a hosted API's list
    # price, or what the operator charges its users for a self-hosted model):
    # budgets count these, the lowest-cost policy ranks by them. Cached input
    # tokens (a prefix the engine had already evaluated) cost the input price
    # unless their own price is given.
    input_usd_per_million: Annotated[float, Field(ge=0)] = 0.0
    output_usd_per_million: Annotated[float, Field(ge=0)] = 0.0
    cached_input_usd_per_million: Annotated[float, Field(ge=0)] | None = None
    # Requests (streams until their last chunk) in flight here at most, e.g.
    # the engine's batch size (vLLM's --max-num-seqs, an edge node's
    # parallel): past it the policy tries another deployment, and when every
    # deployment is full the request waits (models.*.capacity_wait_seconds).
    # Unset: the gateway sets no limit of its own.
    max_concurrency: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_single_price(cls, data: Any) -> Any:
        if isinstance(data, dict) and "cost_per_million_tokens" in data:
            raise ValueError(
                "cost_per_million_tokens is gone: set input_usd_per_million and "
                "output_usd_per_million (and cached_input_usd_per_million if cached "
                "input is cheaper) instead"
            )
        return data


class RuleSettings(_Strict):
    """Picks the pool for a request; every condition given must hold.

    Prompt size is estimated from characters (4 per token), not tokenized:
    the gateway decides before any engine sees the request.
    """

    pool: Annotated[list[str], Field(min_length=1)]
    min_prompt_tokens: Annotated[int, Field(ge=0)] | None = None
    max_prompt_tokens: Annotated[int, Field(ge=0)] | None = None
    # "name: value" of a request header (name case-insensitive).
    header: str | None = None
    # Hashes of the API keys this rule applies to (as in server.api_key_hashes).
    api_key_hashes: KeyHashes = ()


class ModelSettings(_Strict):
    deployments: Annotated[list[DeploymentSettings], Field(min_length=1)]
    # The first rule that matches picks the pool; none matching: every deployment.
    rules: list[RuleSettings] = Field(default_factory=list)
    # A routing policy offered by an installed plugin, and its options.
    policy: str = "ordered"
    policy_options: dict[str, Any] = Field(default_factory=dict)
    # Other names clients may use for this model (e.g. a hosted model's name).
    aliases: list[str] = Field(default_factory=list)
    # Other models to try, in order, when every deployment of this one failed
    # before sending anything.
    fallbacks: list[str] = Field(default_factory=list)
    # Further rounds over all deployments and fallbacks once all failed,
    # after a jittered backoff that honours Retry-After (capped).
    retries: Annotated[int, Field(ge=0, le=10)] = 1
    retry_backoff_seconds: Annotated[float, Field(ge=0)] = 0.25
    retry_after_cap_seconds: Annotated[float, Field(ge=0)] = 5.0
    # Until the answer starts (the first chunk of a stream), retries included:
    # past it, 504.
    timeout_seconds: Annotated[float, Field(gt=0)] | None = None
    # A stream's whole duration, from the request's arrival: past it, the
    # stream ends with an error event and the generation is cancelled.
    stream_timeout_seconds: Annotated[float, Field(gt=0)] | None = None
    # How long a request waits for a free slot when every deployment it may
    # use is at its max_concurrency; past it, 503 with Retry-After.
    capacity_wait_seconds: Annotated[float, Field(ge=0)] = 10.0
    owned_by: str = "nomoat"
    # What the model serves (GET /v1/models lists it): "chat" (chat and
    # completions) and/or "embeddings" (POST /v1/embeddings, on backends
    # that embed). Asked for the other, it answers 400 naming the model.
    capabilities: Annotated[list[ModelCapability], Field(min_length=1)] = Field(
        default_factory=_chat_only
    )
    # Its embeddings are Matryoshka-trained: `dimensions` keeps the first N
    # values, renormalised. Otherwise a request with `dimensions` is a 400.
    matryoshka: bool = False
    # Requests and tokens per minute for this model, all keys together
    # (aliases count as the model): what its deployments can take.
    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None


class HookSettings(_Strict):
    """One ``[[hooks]]`` entry: hooks run in the order they are listed."""

    type: str
    # Name in logs, metrics and errors; defaults to the type.
    name: str | None = None
    # On an unexpected failure, skip this hook instead of rejecting the request.
    fail_open: bool = False
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.type


class AdapterSettings(_Strict):
    """One ``[lora.adapters.NAME]`` table."""

    # The model it fine-tunes: a name of [models] (or an alias).
    base: str
    # Under lora.root: a PEFT folder (adapter_config.json and
    # adapter_model.safetensors) or a .gguf file.
    path: str
    # Of the files (see gateway/lora/sources.py for a PEFT folder's order).
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class StackSettings(_Strict):
    """One ``[lora.stacks.NAME]`` table: adapters applied together."""

    base: str
    # "name" or "name@scale", e.g. ["alpha@0.7", "beta@0.3"].
    adapters: Annotated[list[str], Field(min_length=1)]


class LoRASettings(_Strict):
    # Where adapter files live on the gateway's host; unset: no adapters.
    root: Path | None = None
    adapters: dict[str, AdapterSettings] = Field(default_factory=dict)
    stacks: dict[str, StackSettings] = Field(default_factory=dict)


class PluginSettings(_Strict):
    # Entry-point names not to load at all (a broken or unwanted plugin).
    disabled: tuple[str, ...] = ()


class MetricsSettings(_Strict):
    """``[metrics]``: the request metrics on /metrics (the engines' state is
    always there)."""

    enabled: bool = True
    # Also push the request metrics over OTLP, to OTEL_EXPORTER_OTLP_METRICS_ENDPOINT
    # (or OTEL_EXPORTER_OTLP_ENDPOINT), with the standard OTEL_* variables. Setting
    # OTEL_METRICS_EXPORTER=otlp in the environment does the same.
    otlp: bool = False
    otlp_interval_seconds: Annotated[float, Field(gt=0)] = 60.0


class AccessLogSettings(_Strict):
    """``[access_log]``: one JSON line per request (never prompt text). Off
    unless asked for: it costs a request about 5 us (docs/benchmarks.md),
    and uvicorn's own access log is off too."""

    enabled: bool = False
    # Append to this file; unset: standard error, beside nomoat's other logs.
    path: Path | None = None


class BackendSettings(BaseModel):
    """``type`` picks the backend kind; the other keys belong to that kind's
    config model and are validated in phase two."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str
    # A self-hosted node's price per hour (llamacpp, edge, vllm), in USD:
    # split among the requests it served by their share of its busy time,
    # the rest reported as idle cost (docs/accounting.md).
    usd_per_hour: Annotated[float, Field(ge=0)] | None = None

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _default_backends() -> dict[str, BackendSettings]:
    return {EMBEDDED_BACKEND: BackendSettings(type="llamacpp")}


def _default_models() -> dict[str, ModelSettings]:
    deployment = DeploymentSettings(backend=EMBEDDED_BACKEND, model=EMBEDDED_MODEL)
    # The embedded model's pooled embeddings too (docs/embeddings.md).
    return {
        EMBEDDED_MODEL: ModelSettings(deployments=[deployment], capabilities=["chat", "embeddings"])
    }


class StaticKeySettings(_Strict):
    """One ``[[accounting.static_keys]]``: the limits of a static key."""

    # One of server.api_key_hashes.
    key_hash: Annotated[str, Field(pattern=KEY_HASH_FORMAT.pattern)]
    # How errors and the ledger name it (else its fingerprint).
    name: str = ""
    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None
    budget_usd: Annotated[float, Field(gt=0)] | None = None
    budget_period: Literal["day", "month", "total"] | None = None

    @model_validator(mode="after")
    def _budget_whole(self) -> StaticKeySettings:
        if (self.budget_usd is None) != (self.budget_period is None):
            raise ValueError("budget_usd and budget_period go together")
        return self


class AccountingSettings(_Strict):
    """``[accounting]``: the ledger, managed keys and teams, budgets and rate
    limits (gateway/accounting). On by default, with SQLite in the user's data
    directory: nothing to set up for one process."""

    enabled: bool = True
    # "" (default): SQLite at $XDG_DATA_HOME/nomoat/accounting.db (else
    # ~/.local/share/nomoat/accounting.db). Or "sqlite:///PATH" or
    # "postgresql://user:password@host:port/db" (for several replicas).
    database: str = ""
    # "" (default): limits and budget reservations in this process only.
    # "redis://host:port/db": shared by every worker and replica.
    redis: str = ""
    # Apply pending migrations at start-up (else run `nomoat migrate` first;
    # the Helm chart runs it as a hook before the gateway rolls).
    migrate_on_start: bool = True
    # A budget reservation lapses after this long if its request never
    # settles it (its process died): longer than any request may run.
    reservation_seconds: Annotated[float, Field(gt=0)] = 3600.0
    # Budgets and rate limits of static keys (server.api_key_hashes).
    static_keys: list[StaticKeySettings] = Field(default_factory=list)
    # How often each process polls the database for managed keys and teams
    # changed elsewhere: a revoked key stops within about this long.
    key_refresh_seconds: float = Field(default=0.5, gt=0, le=60)
    # The ledger's writer (gateway/accounting/ledger.py): a batch is written
    # every ledger_flush_seconds, or as soon as ledger_batch_size records
    # wait; at most ledger_max_pending wait while the database is unreachable.
    ledger_batch_size: int = Field(default=500, ge=1)
    ledger_flush_seconds: float = Field(default=0.5, gt=0)
    ledger_max_pending: int = Field(default=100_000, ge=1)
    # Records the database has not taken by shutdown go to this JSON-lines
    # file ("": ledger-unwritten.jsonl beside the SQLite file, else in the
    # user's data directory); `nomoat ledger load FILE` writes them later.
    ledger_spill: str = ""
    # Add `x-nomoat-cost-usd` (the request's charge at the deployment's token
    # prices) to JSON answers, and as the last stream event's `nomoat_cost_usd`
    # to streams (an SSE answer has no trailers a browser can read).
    cost_header: bool = False
    # Self-hosted nodes' busy and idle cost: one node_costs row per backend
    # per window of this many seconds.
    node_cost_window_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Tell each answer's busy seconds on this node's engine to its client
    # (header x-nomoat-busy-seconds; a stream's last SSE comment): what an
    # edge node does (`nomoat edge` sets it) so the gateway can price it.
    report_busy_seconds: bool = False
    # Keep each request's usage for a while, for the gateway that sent it
    # (GET /nomoat/usage/KEY, KEY its x-nomoat-usage-key header): a stream
    # the gateway cut carries no usage, yet the engine knows what it spent.
    # What an edge node does (`nomoat edge` sets it).
    report_cut_usage: bool = False


class ResponsesSettings(_Strict):
    """``[responses]``: the store of Responses (``POST /v1/responses`` with
    ``store: true``; docs/responses.md "The store")."""

    # How long a stored Response can be retrieved and continued. 30 days, as
    # OpenAI keeps them: SDK code written against OpenAI may continue a
    # conversation that long, and no longer is expected of prompts kept.
    ttl_seconds: Annotated[float, Field(gt=0)] = 30 * 86400.0
    # What one owner (an API key; every request without keys is one owner)
    # may keep: past either bound, its oldest Responses are deleted as it
    # stores new ones. The count also bounds what each store write reads.
    max_per_key: Annotated[int, Field(ge=1)] = 10_000
    max_bytes_per_key: Annotated[int, Field(ge=1024)] = 100 * 1024**2
    # How often each process deletes the expired Responses (off the request
    # path; an expired one is not found even before that).
    sweep_seconds: Annotated[float, Field(gt=0)] = 600.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NOMOAT_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    limits: LimitSettings = LimitSettings()
    plugins: PluginSettings = PluginSettings()
    lora: LoRASettings = LoRASettings()
    backends: dict[str, BackendSettings] = Field(default_factory=_default_backends)
    models: dict[str, ModelSettings] = Field(default_factory=_default_models)
    hooks: list[HookSettings] = Field(default_factory=list)
    telemetry: TelemetrySettings = Field(default_factory=lambda: TelemetrySettings())
    metrics: MetricsSettings = MetricsSettings()
    access_log: AccessLogSettings = AccessLogSettings()
    accounting: AccountingSettings = AccountingSettings()
    responses: ResponsesSettings = ResponsesSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)


class ConfigError(Exception):
    """Every problem found in a configuration, each prefixed by its path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def format_location(location: Iterable[int | str]) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def validation_problems(error: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for item in error.errors():
        location = format_location(item["loc"])
        path = f"{prefix}.{location}" if prefix and location else prefix or location
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append(f"{path or '(top level)'}: {message}")
    return problems


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as error:
        raise ConfigError([f"{path}: no such file"]) from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path}: not valid TOML: {error}"]) from error


def load_settings(path: Path | None) -> Settings:
    """Phase one: the file's shape. Raises :class:`ConfigError` with every problem."""
    data = read_toml(path) if path is not None else {}
    try:
        return Settings(**data)
    except ValidationError as error:
        raise ConfigError(validation_problems(error)) from error


def reference_problems(settings: Settings) -> list[str]:
    """Cross references that pydantic cannot see: deployments name backends,
    rules name deployments, fallbacks name models, aliases name nothing else."""
    problems = []
    taken = set(settings.models)
    for model_name, model in settings.models.items():
        for index, alias in enumerate(model.aliases):
            if alias in taken:
                problems.append(
                    f'models.{model_name}.aliases[{index}]: "{alias}" already names a model'
                )
            taken.add(alias)
        for index, fallback in enumerate(model.fallbacks):
            if fallback not in settings.models or fallback == model_name:
                problems.append(
                    f'models.{model_name}.fallbacks[{index}]: unknown model "{fallback}"'
                )
        names = {d.name or d.backend for d in model.deployments}
        for index, rule in enumerate(model.rules):
            for unknown in sorted(set(rule.pool) - names):
                problems.append(
                    f'models.{model_name}.rules[{index}].pool: unknown deployment "{unknown}"'
                )
        for index, deployment in enumerate(model.deployments):
            if deployment.backend not in settings.backends:
                problems.append(
                    f"models.{model_name}.deployments[{index}].backend: "
                    f'unknown backend "{deployment.backend}"'
                )
    return problems + limit_problems(settings)


class TelemetrySettings(_Strict):
    """``[telemetry]``: OpenTelemetry traces, as the standard ``OTEL_*``
    variables configure them; each variable, when set, wins over its key
    here (``OTEL_EXPORTER_OTLP_ENDPOINT`` over ``endpoint``, and so on).
    Traces are exported once an endpoint is known; with none, no tracing
    code runs on the request path."""

    # false: no tracing even with an endpoint (OTEL_SDK_DISABLED=true too).
    enabled: bool = True
    # The collector's base URL; traces go to <endpoint>/v1/traces over
    # http/protobuf, to the endpoint itself over grpc.
    endpoint: str | None = None
    # The full URL for traces, if it is not <endpoint>/v1/traces.
    traces_endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    # Sent with every export (e.g. an authorization header of the collector).
    headers: dict[str, str] = Field(default_factory=dict)
    service_name: str = "nomoat"
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    # OTEL_TRACES_SAMPLER's names.
    sampler: Literal[
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ] = "parentbased_always_on"
    # The ratio of the *traceidratio samplers.
    sampler_arg: Annotated[float, Field(ge=0, le=1)] = 1.0
    # Record prompts and answers on the attempt spans (gen_ai.input.messages,
    # gen_ai.output.messages) as the hooks (redaction) left them: prompts after
    # the request hooks, answers after the response and stream hooks.
    capture_content: bool = False


def limit_problems(settings: Settings) -> list[str]:
    """Static keys' limits name configured keys, once each; limits and
    budgets need accounting on."""
    problems = []
    seen: set[str] = set()
    accounting = settings.accounting
    for index, key in enumerate(accounting.static_keys):
        where = f"accounting.static_keys[{index}].key_hash"
        if key.key_hash not in settings.server.api_key_hashes:
            problems.append(f"{where}: not one of server.api_key_hashes")
        if key.key_hash in seen:
            problems.append(f"{where}: this key already has limits")
        seen.add(key.key_hash)
    if accounting.redis and not accounting.redis.startswith(("redis://", "rediss://", "unix://")):
        problems.append('accounting.redis: a Redis URL ("redis://HOST:PORT/DB"), or ""')
    if not accounting.enabled:
        limited = [f"models.{n}" for n, m in settings.models.items() if m.rpm or m.tpm]
        limited += ["accounting.static_keys"] if accounting.static_keys else []
        problems += [f"{name}: limits need accounting (accounting.enabled)" for name in limited]
    return problems


# Settings names TelemetrySettings, defined after it (appended here to keep
# the settings above as they were): resolve the reference now.
Settings.model_rebuild()
