"""The Helm chart, rendered by Helm's own engine for each value set in
helm/nomoat/ci/ (no cluster): lint, the Kubernetes schemas, the gateway config
each set renders (nomoat's own validation), the values schema's refusals, and
the structure that matters (probes, rolling on config changes, secrets never in
ConfigMaps, the migration hook, NetworkPolicies, resources).

A render takes about a millisecond: these are fast tests. The same configs go
through the real `nomoat check-config` command in test_helm_check_config.py (e2e:
one child process per value set)."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest

from gateway.cli import _open_network_refusal, check
from gateway.telemetry import semconv
from tests.helm_chart import (
    ADAPTER_FILES,
    CHART,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUE_SETS,
    Manifest,
    Rendered,
    pod_specs,
    render,
    render_set,
    values_of,
)

KUBERNETES_VERSIONS = ("1.30", "1.33")
# Kinds of CRDs the chart may render (Prometheus Operator, Gateway API): no
# schema of theirs ships with kubernetes-validate; checked below by hand.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}


def with_values(base: str, **overrides: Any) -> dict[str, Any]:
    """A ci/ value set with dotted keys overridden: with_values(s, **{"a.b": 1})."""
    values = copy.deepcopy(values_of(base))
    for dotted, value in overrides.items():
        node = values
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return values


def container(spec: Manifest, name: str) -> Manifest:
    return next(c for c in spec["containers"] if c["name"] == name)


def gateway_container(rendered: Rendered) -> Manifest:
    return container(rendered.gateway["spec"]["template"]["spec"], "gateway")


# ---- Helm's lint and the Kubernetes schemas ----------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_is_clean(value_set: str) -> None:
    report = helm_python.lint(CHART, values_of(value_set), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems == []


def test_every_value_set_is_rendered() -> None:
    assert set(VALUE_SETS) == {
        "default-values",
        "gpu-edge-values",
        "accounting-telemetry-values",
        "locked-down-values",
    }


@pytest.fixture(scope="module")
def parsed_schemas() -> Iterator[None]:
    """kubernetes-validate parses its 1.4 MB definitions file on every call: once
    is enough (what it parses is only read)."""
    utils = kubernetes_validate.utils
    original = utils.schema_contents
    utils.schema_contents = functools.cache(original)  # type: ignore[assignment]
    yield
    utils.schema_contents = original  # type: ignore[assignment]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_manifests_validate_against_kubernetes(
    value_set: str, version: str, parsed_schemas: None
) -> None:
    for obj in render_set(value_set).objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)


def test_kubernetes_validation_catches_a_wrong_manifest(parsed_schemas: None) -> None:
    """The check above can fail: a misspelt field of a pod is refused (strict)."""
    deployment = copy.deepcopy(render_set("default-values").gateway)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    for version in KUBERNETES_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, version, strict=True)


def test_custom_resources_have_their_required_fields() -> None:
    rendered = render_set("accounting-telemetry-values")
    monitors = rendered.of_kind("ServiceMonitor")
    assert monitors, "the ServiceMonitor is on in this set"
    for monitor in monitors:
        assert monitor["spec"]["selector"]["matchLabels"]
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        selected = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s
            for s in rendered.of_kind("Service")
            if selected.items() <= s["metadata"]["labels"].items()
        ]
        assert services, f"{monitor['metadata']['name']} selects no Service"
        assert all("http" in [p["name"] for p in s["spec"]["ports"]] for s in services)
    route = render(
        with_values(
            "default-values",
            **{"httpRoute.enabled": True, "httpRoute.parentRefs": [{"name": "public"}]},
        )
    ).named("HTTPRoute", f"{RELEASE}-nomoat")
    assert route["spec"]["parentRefs"] == [{"name": "public"}]
    (rule,) = route["spec"]["rules"]
    assert [m["path"] for m in rule["matches"]] == [{"type": "PathPrefix", "value": "/v1"}]
    assert rule["backendRefs"] == [{"name": f"{RELEASE}-nomoat", "port": 8000}]


# ---- the gateway's config: nomoat's own validation -------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_config_passes_nomoat_validation(
    value_set: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both phases of `nomoat check-config` (gateway.cli.check), with the
    environment the gateway's pod gets (key hashes and URLs from Secrets), and
    the start-up refusal of an open network address without keys."""
    rendered = render_set(value_set)
    config = tmp_path / "nomoat.toml"
    config.write_text(rendered.nomoat_toml)
    for name in [n for n in os.environ if n.startswith(("NOMOAT_", "OTEL_"))]:
        monkeypatch.delenv(name)
    for name, value in rendered.environment(gateway_container(rendered)).items():
        monkeypatch.setenv(name, value)
    # The adapter volume, here: the declared adapters' files, under the same root.
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name, data in ADAPTER_FILES.items():
        (adapters / name).write_bytes(data)
    monkeypatch.setenv("NOMOAT_LORA__ROOT", str(adapters))
    settings, problems = check(config)
    assert problems == []
    assert settings is not None
    assert _open_network_refusal(settings.server) is None


def test_the_config_serves_every_replica_of_every_pool() -> None:
    rendered = render_set("gpu-edge-values")
    config = tomllib.loads(rendered.nomoat_toml)
    backends = config["backends"]
    vllm = rendered.named("StatefulSet", f"{RELEASE}-nomoat-vllm-qwen")
    edge = rendered.named("StatefulSet", f"{RELEASE}-nomoat-edge")
    for statefulset, kind, port in ((vllm, "vllm", 8000), (edge, "edge", 8100)):
        name, service = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
        headless = rendered.named("Service", service)
        assert headless["spec"]["clusterIP"] == "None"
        urls = sorted(b["base_url"] for b in backends.values() if b["type"] == kind)
        assert urls == [
            f"http://{name}-{i}.{service}.{NAMESPACE}.svc.cluster.local:{port}/v1"
            for i in range(statefulset["spec"]["replicas"])
        ]
    deployments = config["models"]["qwen2.5-7b-instruct"]["deployments"]
    assert [d["backend"] for d in deployments] == ["vllm-qwen-0", "vllm-qwen-1"]
    assert config["models"]["qwen2.5-7b-instruct"]["aliases"] == ["gpt-4o-mini"]
    assert "embedded" not in backends


def test_numbers_stay_integers_in_the_config() -> None:
    """Helm's values are floats; nomoat.toml must still say 8000, not 8000.0."""
    rendered = render(with_values("default-values", **{"gateway.config.limits.max_n": 4}))
    assert "port = 8000\n" in rendered.nomoat_toml
    assert tomllib.loads(rendered.nomoat_toml)["limits"]["max_n"] == 4


# ---- the values schema -------------------------------------------------------


BAD_VALUES = [
    ({"gateway": {"replicas": -1}}, "at '/gateway/replicas': minimum: got -1, want 0"),
    ({"gateway": {"replicas": "two"}}, "at '/gateway/replicas': got string, want integer"),
    ({"gateway": {"colour": "red"}}, "at '/gateway': additional properties 'colour' not allowed"),
    ({"servce": {}}, "additional properties 'servce' not allowed"),
    (
        {"auth": {"generateApiKey": False}},
        "at '/auth/existingSecret': minLength: got 0, want 1",
    ),
    (
        {"vllm": {"pools": [{"name": "a", "model": "m", "servedModelName": "s", "replicas": -2}]}},
        "at '/vllm/pools/0/replicas': minimum: got -2, want 0",
    ),
    (
        {"vllm": {"pools": [{"name": "a", "model": "m", "servedModelName": "s"}]}},
        "missing property 'replicas'",
    ),
    (
        {"gateway": {"secretEnv": [{"name": "OPENAI_API_KEY", "secretKey": "k"}]}},
        "missing property 'secretName'",
    ),
    ({"gateway": {"config": {"limitz": {}}}}, "at '/gateway/config': additional properties"),
    (
        {"gateway": {"config": {"limits": {"max_n": "many"}}}},
        "at '/gateway/config/limits/max_n': got string, want integer",
    ),
    (
        {"gateway": {"config": {"accounting": {"database": "postgresql://u:p@db/x"}}}},
        "at '/gateway/config/accounting/database': value must be '(set by the chart",
    ),
    (
        {"gateway": {"config": {"server": {"api_key_hashes": []}}}},
        "at '/gateway/config/server/api_key_hashes'",
    ),
    ({"telemetry": {"otlp": {"enabled": True}}}, "at '/telemetry/otlp/endpoint'"),
    ({"edge": {"replicas": 1.5}}, "at '/edge/replicas': got number, want integer"),
    ({"httpRoute": {"enabled": True}}, "at '/httpRoute/parentRefs': minItems: got 0, want 1"),
    (
        {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}},
        "autoscaling: minReplicas (5) is above maxReplicas (3)",
    ),
    (
        {"gateway": {"config": {"models": {"nowhere": {"policy": "ordered"}}}}},
        "gateway.config.models.nowhere has no deployments",
    ),
    (
        {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0}},
        "autoscaling: no metric to scale on",
    ),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError) as refused:
        render(values)
    assert message in str(refused.value)


def test_schema_is_generated_from_the_settings() -> None:
    spec = importlib.util.spec_from_file_location(
        "helm_values_schema", ROOT / "scripts" / "helm_values_schema.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (CHART / "values.schema.json").read_text() == module.render(), (
        "values.schema.json is stale: run python scripts/helm_values_schema.py"
    )


def test_values_yaml_is_documented_line_by_line() -> None:
    """Every key the schema defines has a comment right above it in values.yaml."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, dict[str, Any]]] = [(-1, schema)]
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match or line.lstrip().startswith("- "):
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else {}
        node = parent.get("properties", {}).get(key)
        if node is None:
            continue  # a default's own content (resources, a list's items)
        above = lines[number - 1].strip() if number else ""
        if not above.startswith("#"):
            undocumented.append(key)
        # Resources are Kubernetes' own content: documented where they start.
        stack.append((indent, {} if key == "resources" else node))
    assert undocumented == [], ", ".join(undocumented)


# ---- structure ---------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_gateway_probes_and_drain(value_set: str) -> None:
    rendered = render_set(value_set)
    spec = rendered.gateway["spec"]["template"]["spec"]
    gateway = container(spec, "gateway")
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert gateway["startupProbe"]["httpGet"]["path"] == "/health"
    pre_stop = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = tomllib.loads(rendered.nomoat_toml)["server"]["shutdown_grace_seconds"]
    # Kubernetes counts the preStop inside the grace period: streams keep theirs.
    assert spec["terminationGracePeriodSeconds"] > pre_stop + grace
    port = next(p for p in gateway["ports"] if p["name"] == "http")["containerPort"]
    assert tomllib.loads(rendered.nomoat_toml)["server"]["port"] == port


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_engine_probes(value_set: str) -> None:
    for name, spec in pod_specs(render_set(value_set)):
        if not name.startswith("StatefulSet/"):
            continue
        (engine,) = spec["containers"]
        assert engine["livenessProbe"]["httpGet"]["path"] == "/health", name
        assert engine["readinessProbe"]["httpGet"]["path"] in ("/health", "/ready"), name


def test_config_change_rolls_the_pods() -> None:
    before = render_set("default-values")
    after = render(with_values("default-values", **{"gateway.config.limits.max_n": 2}))
    annotation = "checksum/config"

    def checksum(rendered: Rendered) -> str:
        value: str = rendered.gateway["spec"]["template"]["metadata"]["annotations"][annotation]
        return value

    assert checksum(before) != checksum(after)
    for rendered in (before, after):
        text = rendered.nomoat_toml
        digests = {hashlib.sha256(t.encode()).hexdigest() for t in (text, text.rstrip("\n"))}
        assert checksum(rendered) in digests


@pytest.mark.parametrize("value_set", [*VALUE_SETS, "url-values"])
def test_no_secret_value_in_any_configmap(value_set: str) -> None:
    if value_set == "url-values":
        rendered = render(
            with_values(
                "default-values",
                **{
                    "accounting.databaseUrl": "postgresql://nomoat:inline-db-pw@db:5432/n",
                    "accounting.redisUrl": "redis://:inline-redis-pw@redis:6379/0",
                },
            )
        )
    else:
        rendered = render_set(value_set)
    secrets = [
        value
        for data in rendered.secret_values().values()
        for value in data.values()
        if len(value) >= 8
    ]
    # The secrets' telling parts too (a password inside a URL, a bare hash).
    secrets += re.findall(r"s3cret-[a-z-]+|inline-[a-z]+-pw|[0-9a-f]{64}", " ".join(secrets))
    assert secrets
    for config_map in rendered.of_kind("ConfigMap"):
        text = json.dumps(config_map["data"])
        leaked = [secret for secret in secrets if secret in text]
        assert leaked == [], config_map["metadata"]["name"]


def test_migration_hook_runs_before_the_gateway_rolls() -> None:
    rendered = render_set("accounting-telemetry-values")
    job = rendered.named("Job", f"{RELEASE}-nomoat-migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert annotations["helm.sh/hook-weight"] == "-5"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    migrate = container(spec, "migrate")
    assert migrate["args"] == ["migrate"]
    environment = rendered.environment(migrate)
    assert environment["NOMOAT_ACCOUNTING__DATABASE"].startswith("postgresql://")
    # Hooks run before the release's objects exist: the job reads no ConfigMap.
    assert not [v for v in spec["volumes"] if "configMap" in v]
    assert tomllib.loads(rendered.nomoat_toml)["accounting"]["migrate_on_start"] is False
    gateway_env = rendered.environment(gateway_container(rendered))
    assert gateway_env["NOMOAT_ACCOUNTING__DATABASE"] == environment["NOMOAT_ACCOUNTING__DATABASE"]
    assert gateway_env["NOMOAT_ACCOUNTING__REDIS"].startswith("redis://")


def test_a_secret_made_from_urls_exists_before_the_migration() -> None:
    rendered = render(
        with_values("default-values", **{"accounting.databaseUrl": "postgresql://u:p@db/n"})
    )
    secret = rendered.named("Secret", f"{RELEASE}-nomoat-accounting")
    job = rendered.named("Job", f"{RELEASE}-nomoat-migrate")
    assert secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    weight = int(secret["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert weight < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])


def test_no_migration_hook_without_a_database() -> None:
    rendered = render_set("default-values")
    assert rendered.of_kind("Job") == []
    assert "migrate_on_start" not in tomllib.loads(rendered.nomoat_toml)["accounting"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_network_policies_let_only_the_gateway_reach_engines() -> None:
    rendered = render_set("gpu-edge-values")
    gateway_labels = rendered.gateway["spec"]["template"]["metadata"]["labels"]
    policies = rendered.of_kind("NetworkPolicy")
    engines = rendered.of_kind("StatefulSet")
    assert len(engines) == 2
    for engine in engines:
        labels = engine["spec"]["template"]["metadata"]["labels"]
        covering = [
            p for p in policies if _matches(p["spec"]["podSelector"]["matchLabels"], labels)
        ]
        assert len(covering) == 1, engine["metadata"]["name"]
        (policy,) = covering
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = policy["spec"]["ingress"]
        (peer,) = rule["from"]
        assert _matches(peer["podSelector"]["matchLabels"], gateway_labels)
        assert not _matches(peer["podSelector"]["matchLabels"], labels)
        assert "namespaceSelector" not in peer
    gateway_policy = rendered.named("NetworkPolicy", f"{RELEASE}-nomoat-gateway")
    assert _matches(gateway_policy["spec"]["podSelector"]["matchLabels"], gateway_labels)


def test_locked_down_gateway_takes_traffic_only_from_the_ingress_namespace() -> None:
    rendered = render_set("locked-down-values")
    policy = rendered.named("NetworkPolicy", f"{RELEASE}-nomoat-gateway")
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]
    assert rendered.of_kind("Ingress") == [] and rendered.of_kind("HTTPRoute") == []


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_container_requests_resources(value_set: str) -> None:
    for name, spec in pod_specs(render_set(value_set)):
        for each in spec["containers"] + spec.get("initContainers", []):
            requests = each.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= requests.keys(), f"{name}/{each['name']}"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_nomoat_pods_run_read_only_as_non_root(value_set: str) -> None:
    for name, spec in pod_specs(render_set(value_set)):
        if name.startswith("StatefulSet/") and "vllm" in name:
            continue  # vLLM's own image
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["automountServiceAccountToken"] is False
        for each in spec["containers"]:
            context = each["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            mounts = {m["mountPath"]: m["name"] for m in each["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            for path in ("/tmp", "/data"):
                assert "emptyDir" in volumes[mounts[path]], f"{name}: {path}"


def test_vllm_pool_gets_gpus_adapters_and_tracing() -> None:
    rendered = render(
        with_values(
            "gpu-edge-values",
            **{
                "telemetry.otlp.enabled": True,
                "telemetry.otlp.endpoint": "http://collector:4318",
                "telemetry.otlp.vllmTracesEndpoint": "http://collector:4317",
            },
        )
    )
    vllm = rendered.named("StatefulSet", f"{RELEASE}-nomoat-vllm-qwen")
    spec = vllm["spec"]["template"]["spec"]
    engine = container(spec, "vllm")
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    args = engine["args"]
    assert "--enable-lora" in args and "--enable-tokenizer-info-endpoint" in args
    assert args[args.index("--otlp-traces-endpoint") + 1] == "http://collector:4317"
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in engine["env"]
    # One adapter volume, at the gateway's lora.root, in every pod that reads adapters.
    root = tomllib.loads(rendered.nomoat_toml)["lora"]["root"]
    claim = f"{RELEASE}-nomoat-adapters"
    rendered.named("PersistentVolumeClaim", claim)
    for name, pod in pod_specs(rendered):
        if name.startswith("Job/"):
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        (main,) = pod["containers"]
        mounts = [m for m in main["volumeMounts"] if m["mountPath"] == root]
        assert mounts and mounts[0]["readOnly"] is True, name
        assert volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"] == claim
    backends = tomllib.loads(rendered.nomoat_toml)["backends"]
    assert {b["adapter_root"] for b in backends.values()} == {root}


def test_edge_nodes_share_keys_with_the_gateway() -> None:
    rendered = render_set("gpu-edge-values")
    edge = rendered.named("StatefulSet", f"{RELEASE}-nomoat-edge")
    node_env = rendered.environment(container(edge["spec"]["template"]["spec"], "edge"))
    gateway_env = rendered.environment(gateway_container(rendered))
    for key, hashes in (
        ("NOMOAT_EDGE_API_KEY", "NOMOAT_SERVER__API_KEY_HASHES"),
        ("NOMOAT_EDGE_ADMIN_KEY", "NOMOAT_SERVER__ADMIN_KEY_HASHES"),
    ):
        digest = hashlib.sha256(gateway_env[key].encode()).hexdigest()
        assert json.loads(node_env[hashes]) == [f"sha256:{digest}"]
    assert edge["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]


def test_generated_api_key_matches_its_hash() -> None:
    rendered = render_set("default-values")
    secret = rendered.secret_values()[f"{RELEASE}-nomoat-keys"]
    digest = hashlib.sha256(secret["api-key"].encode()).hexdigest()
    assert json.loads(secret["api-key-hashes"]) == [f"sha256:{digest}"]
    assert "kubectl" in rendered.notes and "api-key" in rendered.notes


def test_autoscaling_on_the_gateways_in_flight_gauge() -> None:
    rendered = render_set("accounting-telemetry-values")
    hpa = rendered.named("HorizontalPodAutoscaler", f"{RELEASE}-nomoat")
    assert hpa["spec"]["scaleTargetRef"]["name"] == rendered.gateway["metadata"]["name"]
    assert "replicas" not in rendered.gateway["spec"]
    pods = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    name = pods[0]["pods"]["metric"]["name"]
    # The gauge the gateway really exports under that name (one conventions module).
    assert name == semconv.PROM_IN_FLIGHT


def test_disruption_budget_and_spread_select_the_gateway() -> None:
    rendered = render_set("default-values")
    labels = rendered.gateway["spec"]["template"]["metadata"]["labels"]
    budget = rendered.named("PodDisruptionBudget", f"{RELEASE}-nomoat")
    assert _matches(budget["spec"]["selector"]["matchLabels"], labels)
    spec = rendered.gateway["spec"]["template"]["spec"]
    for constraint in spec["topologySpreadConstraints"]:
        assert _matches(constraint["labelSelector"]["matchLabels"], labels)


def test_public_routes_keep_the_admin_api_off() -> None:
    rendered = render_set("accounting-telemetry-values")
    ingress = rendered.named("Ingress", f"{RELEASE}-nomoat")
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == ["/v1"]


def test_grafana_dashboard_configmap() -> None:
    rendered = render_set("accounting-telemetry-values")
    dashboard = rendered.named("ConfigMap", f"{RELEASE}-nomoat-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (ROOT / "deploy" / "grafana" / "nomoat.json").read_text()
    assert json.loads(dashboard["data"]["nomoat.json"]) == json.loads(shipped)
    # The chart carries a copy (Helm reads no file outside the chart).
    assert (CHART / "dashboards" / "nomoat.json").read_text() == shipped


def test_telemetry_environment() -> None:
    rendered = render_set("accounting-telemetry-values")
    env = rendered.environment(gateway_container(rendered))
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_METRICS_EXPORTER"] == "otlp"
    assert env["OTEL_EXPORTER_OTLP_HEADERS"].startswith("authorization=")
    assert "deployment.environment.name=production" in env["OTEL_RESOURCE_ATTRIBUTES"]
    assert env["OPENAI_API_KEY"] == "sk-upstream-secret-value"


def test_notes_show_the_sdk_call() -> None:
    notes = render_set("gpu-edge-values").notes
    assert "from openai import OpenAI" in notes
    assert 'model="qwen2.5-7b-instruct"' in notes


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendering_again_rolls_nothing(value_set: str) -> None:
    """Generated keys differ between two offline renders (in a cluster the chart
    reads them back): the workloads and the config must not, or every upgrade
    with unchanged values would roll every pod."""
    first, second = render(values_of(value_set)), render(values_of(value_set))
    for kind in ("Deployment", "StatefulSet", "ConfigMap"):
        assert first.of_kind(kind) == second.of_kind(kind), kind
