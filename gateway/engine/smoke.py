"""``python -m gateway.engine.smoke MODEL.gguf``: decode a few tokens, or crash.

Run in a child process at start-up (and by ``nomoat doctor``): a llama.cpp
built with instructions this CPU lacks, or with ggml's AMX path on CPUs where
it crashes, dies here with a clear message instead of inside the server.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gateway.engine.generation import GenerationRequest, generate
from gateway.engine.native import NativeModel, SamplerSpec


def decode_tokens_per_second(path: Path, tokens: int = 16) -> float:
    model = NativeModel(path, n_ctx=256, n_threads=0)
    try:
        prompt = model.tokenize("The capital of France is", add_special=True, parse_special=False)
        request = GenerationRequest(prompt, tokens, SamplerSpec(temperature=0))
        started = time.perf_counter()
        result = generate(model, request)
        return result.completion_tokens / (time.perf_counter() - started)
    finally:
        model.close()


def main() -> None:
    rate = decode_tokens_per_second(Path(sys.argv[1]))
    print(f"llama.cpp decodes: {rate:.0f} tokens/s")


if __name__ == "__main__":
    main()
