"""Write helm/nomoat/values.schema.json: the chart's values, every object closed
(an unknown key is an error), and `gateway.config` checked against nomoat's own
settings (gateway/settings.py), so a key nomoat.toml would refuse is refused by
`helm install` first.

    python scripts/helm_values_schema.py          # rewrite the file
    python scripts/helm_values_schema.py --check  # exit 1 if it is stale

tests/test_helm_chart.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.settings import Settings  # noqa: E402

SCHEMA_FILE = ROOT / "helm" / "nomoat" / "values.schema.json"
Schema = dict[str, Any]

# Keys of nomoat.toml the chart writes itself (or that hold secrets, which reach
# the pods from Secrets): refused in gateway.config.
CHART_OWNED = {
    "ServerSettings": (
        "host",
        "port",
        "shutdown_grace_seconds",
        "allow_unauthenticated_network",
        "api_key_hashes",
        "admin_key_hashes",
    ),
    "LoRASettings": ("root",),
    "AccountingSettings": ("enabled", "migrate_on_start", "database", "redis"),
}
OWNED_MESSAGE = "(set by the chart from its own values or a Secret, not in gateway.config)"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def string(**extra: Any) -> Schema:
    return {"type": "string", **extra}


def integer(minimum: int = 0, **extra: Any) -> Schema:
    return {"type": "integer", "minimum": minimum, **extra}


def boolean() -> Schema:
    return {"type": "boolean"}


def strings() -> Schema:
    return {"type": "array", "items": {"type": "string"}}


# Kubernetes objects passed through as they are (the API server checks them).
K8S_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
K8S_OBJECT: Schema = {"type": "object"}
K8S_LIST: Schema = {"type": "array", "items": {"type": "object"}}
RESOURCES = obj(
    {
        "requests": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
        "limits": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
        "claims": K8S_LIST,
    }
)
# Every container of the chart asks for resources: requests are required.
RESOURCES_WITH_REQUESTS = {**RESOURCES, "required": ["requests"]}
SECRET_REF = obj(
    {"name": string(minLength=1), "key": string(minLength=1)},
    required=("name", "key"),
)


def gateway() -> Schema:
    return obj(
        {
            "replicas": integer(0),
            "port": integer(1, maximum=65535),
            "shutdownGraceSeconds": integer(0, maximum=3600),
            "preStopSleepSeconds": integer(0, maximum=300),
            "defaultPolicy": string(minLength=1),
            "embedded": obj(
                {
                    "enabled": boolean(),
                    "modelName": string(minLength=1),
                    "parallel": integer(1, maximum=64),
                    "threads": integer(0),
                    "options": {"type": "object"},
                }
            ),
            "config": {"$ref": "#/$defs/nomoat.Settings"},
            "secretEnv": {
                "type": "array",
                "items": obj(
                    {
                        "name": string(pattern=ENV_NAME),
                        "secretName": string(minLength=1),
                        "secretKey": string(minLength=1),
                    },
                    required=("name", "secretName", "secretKey"),
                ),
            },
            "extraEnv": K8S_LIST,
            "extraVolumes": K8S_LIST,
            "extraVolumeMounts": K8S_LIST,
            "resources": RESOURCES_WITH_REQUESTS,
            "podAnnotations": K8S_MAP,
            "podLabels": K8S_MAP,
            "nodeSelector": K8S_MAP,
            "tolerations": K8S_LIST,
            "affinity": K8S_OBJECT,
            "topologySpreadConstraints": K8S_LIST,
            "priorityClassName": string(),
            "podSecurityContext": K8S_OBJECT,
            "securityContext": K8S_OBJECT,
            "probes": obj(
                {
                    "startupSeconds": integer(5),
                    "periodSeconds": integer(1),
                    "timeoutSeconds": integer(1),
                    "livenessFailureThreshold": integer(1),
                    "readinessFailureThreshold": integer(1),
                }
            ),
        }
    )


def auth() -> Schema:
    schema = obj(
        {
            "generateApiKey": boolean(),
            "existingSecret": string(),
            "apiKeyHashes": {
                "type": "array",
                "items": string(pattern=r"^sha256:[0-9a-f]{64}$"),
            },
            "adminKeyHashes": {
                "type": "array",
                "items": string(pattern=r"^sha256:[0-9a-f]{64}$"),
            },
            "allowUnauthenticated": boolean(),
        }
    )
    # Keys are required (allowUnauthenticated is false), none is generated and no
    # hash is given: the hashes must come from an existing Secret, so it needs a name.
    schema["if"] = {
        "properties": {
            "allowUnauthenticated": {"const": False},
            "generateApiKey": {"const": False},
            "apiKeyHashes": {"maxItems": 0},
        },
        "required": ["allowUnauthenticated", "generateApiKey", "apiKeyHashes"],
    }
    schema["then"] = {
        "properties": {"existingSecret": string(minLength=1)},
        "required": ["existingSecret"],
    }
    return schema


def vllm() -> Schema:
    pool = obj(
        {
            "name": string(pattern=DNS_LABEL, maxLength=20),
            "model": string(minLength=1),
            "servedModelName": string(minLength=1),
            "replicas": integer(0),
            "gpus": integer(0),
            "maxModelLen": integer(1),
            "maxLoras": integer(1),
            "maxLoraRank": integer(1),
            "extraArgs": strings(),
            "env": K8S_LIST,
            "hfTokenSecret": SECRET_REF,
            "resources": RESOURCES_WITH_REQUESTS,
            "nodeSelector": K8S_MAP,
            "tolerations": K8S_LIST,
            "affinity": K8S_OBJECT,
            "backendOptions": {"type": "object"},
        },
        required=("name", "model", "servedModelName", "replicas"),
    )
    return obj(
        {
            "image": image(),
            "port": integer(1, maximum=65535),
            "podSecurityContext": K8S_OBJECT,
            "securityContext": K8S_OBJECT,
            "pools": {"type": "array", "items": pool},
        }
    )


def image() -> Schema:
    return obj(
        {
            "repository": string(minLength=1),
            "tag": string(),
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        }
    )


def edge() -> Schema:
    return obj(
        {
            "enabled": boolean(),
            "replicas": integer(0),
            "modelName": string(minLength=1),
            "modelPath": string(),
            "parallel": integer(1, maximum=64),
            "threads": integer(0),
            "port": integer(1, maximum=65535),
            "onePerNode": boolean(),
            "backendOptions": {"type": "object"},
            "resources": RESOURCES_WITH_REQUESTS,
            "nodeSelector": K8S_MAP,
            "tolerations": K8S_LIST,
            "extraVolumes": K8S_LIST,
            "extraVolumeMounts": K8S_LIST,
        }
    )


def chart_schema() -> Schema:
    return obj(
        {
            "nameOverride": string(),
            "fullnameOverride": string(),
            "clusterDomain": string(minLength=1),
            "commonLabels": K8S_MAP,
            "image": image(),
            "imagePullSecrets": K8S_LIST,
            "serviceAccount": obj({"create": boolean(), "name": string(), "annotations": K8S_MAP}),
            "gateway": gateway(),
            "writableVolumes": obj(
                {"tmpSize": string(pattern=QUANTITY), "dataSize": string(pattern=QUANTITY)}
            ),
            "auth": auth(),
            "service": obj(
                {
                    "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "port": integer(1, maximum=65535),
                    "annotations": K8S_MAP,
                }
            ),
            "ingress": obj(
                {
                    "enabled": boolean(),
                    "className": string(),
                    "annotations": K8S_MAP,
                    "hosts": {
                        "type": "array",
                        "items": obj(
                            {
                                "host": string(),
                                "paths": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": obj(
                                        {
                                            "path": string(pattern="^/"),
                                            "pathType": {
                                                "enum": [
                                                    "Prefix",
                                                    "Exact",
                                                    "ImplementationSpecific",
                                                ]
                                            },
                                        },
                                        required=("path", "pathType"),
                                    ),
                                },
                            },
                            required=("host", "paths"),
                        ),
                    },
                    "tls": K8S_LIST,
                },
                **{
                    "if": {"properties": {"enabled": {"const": True}}},
                    "then": {"properties": {"hosts": {"minItems": 1}}},
                },
            ),
            "httpRoute": obj(
                {
                    "enabled": boolean(),
                    "parentRefs": K8S_LIST,
                    "hostnames": strings(),
                    "pathPrefixes": {
                        "type": "array",
                        "minItems": 1,
                        "items": string(pattern="^/"),
                    },
                    "annotations": K8S_MAP,
                },
                # A route attached to no Gateway routes nothing.
                **{
                    "if": {"properties": {"enabled": {"const": True}}},
                    "then": {"properties": {"parentRefs": {"minItems": 1}}},
                },
            ),
            "autoscaling": obj(
                {
                    "enabled": boolean(),
                    "minReplicas": integer(1),
                    "maxReplicas": integer(1),
                    "targetCPUUtilizationPercentage": integer(0, maximum=100),
                    "inFlight": obj(
                        {
                            "enabled": boolean(),
                            "metricName": string(minLength=1),
                            "averageValue": string(pattern=QUANTITY),
                        }
                    ),
                }
            ),
            "podDisruptionBudget": obj(
                {"enabled": boolean(), "maxUnavailable": {"type": ["integer", "string"]}}
            ),
            "vllm": vllm(),
            "edge": edge(),
            "adapters": obj(
                {
                    "enabled": boolean(),
                    "mountPath": string(pattern="^/"),
                    "existingClaim": string(),
                    "storageClass": string(),
                    "accessModes": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "enum": [
                                "ReadWriteOnce",
                                "ReadOnlyMany",
                                "ReadWriteMany",
                                "ReadWriteOncePod",
                            ]
                        },
                    },
                    "size": string(pattern=QUANTITY),
                }
            ),
            "accounting": obj(
                {
                    "enabled": boolean(),
                    "existingSecret": string(),
                    "redis": boolean(),
                    "databaseUrl": string(pattern=r"^(|postgres(ql)?://.+)$"),
                    "redisUrl": string(pattern=r"^(|rediss?://.+)$"),
                    "migration": obj(
                        {
                            "enabled": boolean(),
                            "backoffLimit": integer(0),
                            "activeDeadlineSeconds": integer(1),
                            "resources": RESOURCES_WITH_REQUESTS,
                        }
                    ),
                }
            ),
            "telemetry": obj(
                {
                    "otlp": obj(
                        {
                            "enabled": boolean(),
                            "endpoint": string(),
                            "protocol": {"enum": ["http/protobuf", "grpc"]},
                            "vllmTracesEndpoint": string(),
                            "sampler": {
                                "enum": [
                                    "always_on",
                                    "always_off",
                                    "traceidratio",
                                    "parentbased_always_on",
                                    "parentbased_always_off",
                                    "parentbased_traceidratio",
                                ]
                            },
                            "samplerArg": string(pattern=r"^(0(\.[0-9]+)?|1(\.0+)?)$"),
                            "metrics": boolean(),
                            "headersSecret": obj({"name": string(), "key": string(minLength=1)}),
                            "resourceAttributes": K8S_MAP,
                        },
                        # Exporting needs somewhere to export to.
                        **{
                            "if": {"properties": {"enabled": {"const": True}}},
                            "then": {"properties": {"endpoint": string(minLength=1)}},
                        },
                    )
                }
            ),
            "metrics": obj(
                {
                    "serviceMonitor": obj(
                        {
                            "enabled": boolean(),
                            "engines": boolean(),
                            "interval": string(pattern=r"^[0-9]+(ms|s|m|h)$"),
                            "labels": K8S_MAP,
                        }
                    ),
                    "grafanaDashboard": obj(
                        {"enabled": boolean(), "labels": K8S_MAP, "annotations": K8S_MAP}
                    ),
                }
            ),
            "networkPolicy": obj(
                {"enabled": boolean(), "gatewayFrom": K8S_LIST, "scrapeFrom": K8S_LIST}
            ),
        },
        **{
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "nomoat chart values",
        },
    )


def _clean(node: Any) -> Any:
    """pydantic's schema without its titles and defaults, refs renamed."""
    if isinstance(node, dict):
        cleaned = {}
        for key, value in node.items():
            if key in ("title", "default"):
                continue
            if key == "$ref" and isinstance(value, str):
                value = value.replace("#/$defs/", "#/$defs/nomoat.")
            cleaned[key] = _clean(value)
        return cleaned
    if isinstance(node, list):
        return [_clean(item) for item in node]
    return node


def config_defs() -> dict[str, Schema]:
    """nomoat.toml's settings as $defs, less what the chart owns; a model's
    deployments are optional (the chart generates them)."""
    settings = Settings.model_json_schema()
    defs = {f"nomoat.{name}": _clean(schema) for name, schema in settings.pop("$defs").items()}
    defs["nomoat.Settings"] = _clean(settings)
    for name, owned in CHART_OWNED.items():
        properties = defs[f"nomoat.{name}"]["properties"]
        for key in owned:
            # The validator's message quotes the const: it reads as the reason.
            properties[key] = {"const": OWNED_MESSAGE, "not": {}}
    defs["nomoat.ModelSettings"].pop("required", None)
    return defs


def build() -> Schema:
    schema = chart_schema()
    schema["$defs"] = config_defs()
    return schema


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if SCHEMA_FILE.read_text() != text:
            print(f"{SCHEMA_FILE} is stale: run python scripts/helm_values_schema.py")
            return 1
        return 0
    SCHEMA_FILE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
