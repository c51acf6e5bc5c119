"""The Helm chart (helm/nomoat) rendered by Helm's own engine (helm-python-sdk,
no helm binary, no cluster), and what the tests read from the result: the
objects, the gateway's nomoat.toml and the environment its pods would get."""

from __future__ import annotations

import base64
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "nomoat"
VALUE_SETS = sorted(path.stem for path in (CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "llm", "ai"

# The Secrets the ci/ value sets name but do not create: what a user would have
# made beforehand (kubectl create secret ...). Keys are real hashes of real keys.
API_KEY = "sk-test-0123456789abcdef"
ADMIN_KEY = "sk-admin-0123456789abcdef"


def _hash(key: str) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


EXISTING_SECRETS: dict[str, dict[str, str]] = {
    "nomoat-keys": {
        "api-key-hashes": f'["{_hash(API_KEY)}"]',
        "admin-key-hashes": f'["{_hash(ADMIN_KEY)}"]',
    },
    "nomoat-accounting": {
        "database-url": "postgresql://nomoat:s3cret-db-password@postgres.db:5432/nomoat",
        "redis-url": "redis://:s3cret-redis-password@redis.db:6379/0",
    },
    "openai": {"api-key": "sk-upstream-secret-value"},
    "otel-headers": {"headers": "authorization=Bearer otel-secret-token"},
    "hf-token": {"token": "hf_secret_token_value"},
}

Manifest = dict[str, Any]
# libyaml's loader where PyYAML has it: the dashboard ConfigMap alone is 27 kB.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# What the adapter volume holds for ci/gpu-edge-values.yaml (its lora.adapters.sql).
ADAPTER_FILES = {"sql.gguf": b"sql adapter (chart test)\n"}


@dataclass(frozen=True)
class Rendered:
    """One render: every object, by template file."""

    files: dict[str, str]

    @functools.cached_property
    def objects(self) -> list[Manifest]:
        found = []
        for name, text in sorted(self.files.items()):
            if name.endswith("NOTES.txt"):
                continue
            found += [doc for doc in yaml.load_all(text, Loader=_LOADER) if doc]
        return found

    def of_kind(self, kind: str) -> list[Manifest]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def named(self, kind: str, name: str) -> Manifest:
        matches = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
        return matches[0]

    @property
    def notes(self) -> str:
        return next(text for name, text in self.files.items() if name.endswith("NOTES.txt"))

    @property
    def gateway(self) -> Manifest:
        return self.named("Deployment", f"{RELEASE}-nomoat")

    @property
    def nomoat_toml(self) -> str:
        config = self.named("ConfigMap", f"{RELEASE}-nomoat-config")
        text: str = config["data"]["nomoat.toml"]
        return text

    def secret_values(self) -> dict[str, dict[str, str]]:
        """Every Secret's data, decoded: the rendered ones over the existing ones."""
        secrets = {name: dict(data) for name, data in EXISTING_SECRETS.items()}
        for secret in self.of_kind("Secret"):
            data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
            data.update(secret.get("stringData", {}))
            secrets[secret["metadata"]["name"]] = data
        return secrets

    def environment(self, container: Manifest) -> dict[str, str]:
        """The environment the container would start with, Secrets resolved."""
        secrets = self.secret_values()
        env: dict[str, str] = {}
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            source = entry["valueFrom"]
            if "fieldRef" in source:
                env[entry["name"]] = "from-" + source["fieldRef"]["fieldPath"]
                continue
            ref = source["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            if value is None:
                assert ref.get("optional"), f"{ref['name']}/{ref['key']} does not exist"
                continue
            env[entry["name"]] = value
        return env


def pod_specs(rendered: Rendered) -> Iterator[tuple[str, Manifest]]:
    for obj in rendered.objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


@functools.cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def values_of(value_set: str) -> dict[str, Any]:
    loaded = yaml.safe_load((CHART / "ci" / f"{value_set}.yaml").read_text())
    return loaded or {}


def render(values: dict[str, Any]) -> Rendered:
    files = chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return Rendered(files)


@functools.cache
def render_set(value_set: str) -> Rendered:
    return render(values_of(value_set))
