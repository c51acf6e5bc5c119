"""Prometheus exposition: the engines' own load signals, hook failures,
whether each deployment is up, and per-adapter usage and loads."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.contract import AdapterCounters, Backend, ReportsLoad
from gateway.lora.stats import AdapterUsage
from gateway.stats import StatsTable, serves_adapters
from gateway.wire import GatewayStatus

_FAMILIES = (
    ("nomoat_engine_requests_running", "gauge", "Generations running in the engine."),
    ("nomoat_engine_requests_waiting", "gauge", "Requests queued for the engine."),
    (
        "nomoat_engine_kv_cache_usage_ratio",
        "gauge",
        "Share of the engine's KV cache in use, as the engine reports it.",
    ),
    (
        "nomoat_engine_decoded_tokens_total",
        "counter",
        "Tokens the engine itself reports having evaluated (prompt and generated).",
    ),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _adapter_lines(backends: Mapping[str, Backend], usage: Mapping[str, AdapterUsage]) -> list[str]:
    """Per adapter: what clients asked of it, and what each engine did with it."""
    families: dict[str, tuple[str, str, list[str]]] = {
        "nomoat_adapter_requests_total": ("counter", "Requests answered with the adapter.", []),
        "nomoat_adapter_prompt_tokens_total": ("counter", "Prompt tokens with the adapter.", []),
        "nomoat_adapter_completion_tokens_total": (
            "counter",
            "Completion tokens generated with the adapter.",
            [],
        ),
        "nomoat_adapter_loads_total": ("counter", "Times an engine loaded the adapter.", []),
        "nomoat_adapter_evictions_total": ("counter", "Times an engine unloaded the adapter.", []),
        "nomoat_adapter_load_seconds_total": (
            "counter",
            "Seconds engines spent loading the adapter.",
            [],
        ),
        "nomoat_adapter_loaded": ("gauge", "Whether an engine holds the adapter now.", []),
    }
    for adapter, entry in sorted(usage.items()):
        label = f'{{adapter="{_escape(adapter)}"}}'
        families["nomoat_adapter_requests_total"][2].append(f"{label} {entry.requests}")
        families["nomoat_adapter_prompt_tokens_total"][2].append(f"{label} {entry.prompt_tokens}")
        families["nomoat_adapter_completion_tokens_total"][2].append(
            f"{label} {entry.completion_tokens}"
        )
    for name, backend in sorted(backends.items()):
        if not serves_adapters(backend):
            continue
        loaded = backend.adapters_loaded()
        counters = backend.adapter_counters()
        for adapter in sorted(set(counters) | loaded):
            label = f'{{backend="{_escape(name)}",adapter="{_escape(adapter)}"}}'
            count = counters.get(adapter, AdapterCounters())
            families["nomoat_adapter_loads_total"][2].append(f"{label} {count.loads}")
            families["nomoat_adapter_evictions_total"][2].append(f"{label} {count.evictions}")
            families["nomoat_adapter_load_seconds_total"][2].append(
                f"{label} {count.load_seconds:.6f}"
            )
            families["nomoat_adapter_loaded"][2].append(f"{label} {int(adapter in loaded)}")
    lines = []
    for family, (kind, help_text, samples) in families.items():
        lines.append(f"# HELP {family} {help_text}")
        lines.append(f"# TYPE {family} {kind}")
        lines.extend(f"{family}{sample}" for sample in samples)
    return lines


def render_metrics(
    backends: Mapping[str, Backend],
    hook_failures: Mapping[str, int] | None = None,
    deployments_ready: Mapping[tuple[str, str, str], bool] | None = None,
    adapter_usage: Mapping[str, AdapterUsage] | None = None,
) -> str:
    samples: dict[str, list[str]] = {name: [] for name, _, _ in _FAMILIES}
    for name, backend in sorted(backends.items()):
        if not isinstance(backend, ReportsLoad):
            continue
        load = backend.load()
        label = f'{{backend="{_escape(name)}"}}'
        samples["nomoat_engine_requests_running"].append(f"{label} {load.running}")
        samples["nomoat_engine_requests_waiting"].append(f"{label} {load.waiting}")
        if load.kv_cache_usage is not None:
            samples["nomoat_engine_kv_cache_usage_ratio"].append(f"{label} {load.kv_cache_usage}")
        if load.decoded_tokens_total is not None:
            samples["nomoat_engine_decoded_tokens_total"].append(
                f"{label} {load.decoded_tokens_total}"
            )
    lines = []
    for family, kind, help_text in _FAMILIES:
        lines.append(f"# HELP {family} {help_text}")
        lines.append(f"# TYPE {family} {kind}")
        lines.extend(f"{family}{sample}" for sample in samples[family])
    lines.append("# HELP nomoat_hook_failures_total Hook calls that raised an unexpected error.")
    lines.append("# TYPE nomoat_hook_failures_total counter")
    for hook, count in sorted((hook_failures or {}).items()):
        lines.append(f'nomoat_hook_failures_total{{hook="{_escape(hook)}"}} {count}')
    lines.append(
        "# HELP nomoat_deployment_up Whether a deployment's backend can serve (1) or not (0)."
    )
    lines.append("# TYPE nomoat_deployment_up gauge")
    for (model, deployment, backend_name), up in sorted((deployments_ready or {}).items()):
        labels = ",".join(
            f'{name}="{_escape(value)}"'
            for name, value in (
                ("model", model),
                ("deployment", deployment),
                ("backend", backend_name),
            )
        )
        lines.append(f"nomoat_deployment_up{{{labels}}} {int(up)}")
    lines.extend(_adapter_lines(backends, adapter_usage or {}))
    return "\n".join(lines) + "\n"


def capacity_metrics(status: GatewayStatus, stats: StatsTable | None) -> str:
    """Each deployment's requests in flight and its max_concurrency, and the
    requests waiting for (or given up on) a free slot."""
    lines = [
        "# HELP nomoat_deployment_in_flight Requests this gateway has on a deployment now.",
        "# TYPE nomoat_deployment_in_flight gauge",
    ]
    limits = []
    for model, deployments in sorted(status.models.items()):
        for d in deployments:
            labels = f'model="{_escape(model)}",deployment="{_escape(d.deployment)}"'
            lines.append(f"nomoat_deployment_in_flight{{{labels}}} {d.in_flight}")
            if d.max_concurrency is not None:
                limits.append(f"nomoat_deployment_max_concurrency{{{labels}}} {d.max_concurrency}")
    lines += [
        "# HELP nomoat_deployment_max_concurrency A deployment's max_concurrency (if it has one).",
        "# TYPE nomoat_deployment_max_concurrency gauge",
        *limits,
        "# HELP nomoat_capacity_waiting Requests waiting for a deployment below its "
        "max_concurrency.",
        "# TYPE nomoat_capacity_waiting gauge",
        f"nomoat_capacity_waiting {status.waiting_for_capacity}",
        "# HELP nomoat_capacity_waits_total Requests that found every deployment at its "
        "max_concurrency and waited.",
        "# TYPE nomoat_capacity_waits_total counter",
        f"nomoat_capacity_waits_total {stats.capacity_waits if stats else 0}",
        "# HELP nomoat_capacity_timeouts_total Requests whose wait for a free slot ran out (503).",
        "# TYPE nomoat_capacity_timeouts_total counter",
        f"nomoat_capacity_timeouts_total {stats.capacity_timeouts if stats else 0}",
        "# HELP nomoat_worker_info The worker that answered (nomoat serve --workers N): "
        "every figure here is that worker's own.",
        "# TYPE nomoat_worker_info gauge",
        f'nomoat_worker_info{{worker="{status.worker}",workers="{status.workers}"}} 1',
    ]
    return "\n".join(lines) + "\n"
