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
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.auth import KEY_HASH_FORMAT

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
    # Add an `x-nomoat-route` header (chosen deployment, score, policy) to responses.
    route_header: bool = False
    # Append every routing decision to this JSON-lines file (for `nomoat replay`).
    decision_log: Path | None = None
    # Also record prompt text in the decision log (off: sizes and timing only).
    decision_log_prompts: bool = False
    log_level: str = "info"


class LimitSettings(_Strict):
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    max_messages: Annotated[int, Field(ge=1)] = 512
    max_n: Annotated[int, Field(ge=1, le=128)] = 8
    max_stop_sequences: Annotated[int, Field(ge=0)] = 4
    max_logit_bias: Annotated[int, Field(ge=0)] = 300
    max_tools: Annotated[int, Field(ge=0)] = 128


class DeploymentSettings(_Strict):
    backend: str
    # A name for rules to refer to; defaults to the backend's name.
    name: str | None = None
    # The engine's own name for the model; defaults to the model's name.
    model: str | None = None
    weight: Annotated[float, Field(gt=0)] = 1.0
    # Price of a million tokens here, for the lowest-cost policy.
    cost_per_million_tokens: Annotated[float, Field(ge=0)] = 0.0


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
    owned_by: str = "nomoat"


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

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _default_backends() -> dict[str, BackendSettings]:
    return {EMBEDDED_BACKEND: BackendSettings(type="llamacpp")}


def _default_models() -> dict[str, ModelSettings]:
    deployment = DeploymentSettings(backend=EMBEDDED_BACKEND, model=EMBEDDED_MODEL)
    return {EMBEDDED_MODEL: ModelSettings(deployments=[deployment])}


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
    metrics: MetricsSettings = MetricsSettings()
    access_log: AccessLogSettings = AccessLogSettings()

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
    return problems
