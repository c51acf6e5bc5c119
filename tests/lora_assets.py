"""Shared by the LoRA tests: the trained marker adapters and two helpers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from gateway.lora.sources import locate, sha256_of
from gateway.testing import LiveGateway

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Assets:
    def __init__(self, root: Path) -> None:
        self.root = root
        manifest = json.loads((root / "manifest.json").read_text())
        self.markers: dict[str, str] = manifest["markers"]

    def sha(self, relative: str) -> str:
        return sha256_of(locate(self.root, relative))


def ask(client: openai.OpenAI, model: str, max_tokens: int = 20) -> str:
    answer = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        temperature=0,
        max_tokens=max_tokens,  # type: ignore[arg-type]
    )
    assert answer.model == model
    return answer.choices[0].message.content or ""


def metric(gateway: LiveGateway, name: str, **labels: str) -> float:
    """The sample of ``name`` with exactly ``labels`` (in any order), else 0."""
    text = httpx.get(f"{gateway.root_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def make_identity_adapter(peft: Path, folder: Path) -> Path:
    """A copy of a PEFT adapter with every lora_B zeroed: it changes nothing."""
    from safetensors.numpy import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_bytes((peft / "adapter_config.json").read_bytes())
    tensors = load_file(str(peft / "adapter_model.safetensors"))
    zeroed = {name: (t * 0 if ".lora_B." in name else t) for name, t in tensors.items()}
    save_file(zeroed, str(folder / "adapter_model.safetensors"))
    return folder
