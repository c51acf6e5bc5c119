"""The cost of refusing control-token text for vLLM deployments: the gateway's
check (``ControlTextGuard.check_chat``) on one 4 MB message, for SmolLM2's
17 added tokens (tests/data/vllm/) and Llama 3's 256, on ordinary and
adversarial text. Prints the median and the maximum of 5 runs.

    PYTHONPATH=. .venv/bin/python loadtests/bench_control_text.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from gateway import wire
from gateway.backends.control_text import ControlTextGuard, token_texts

SIZE = 4 * 1024 * 1024
SMOLLM2 = Path(__file__).parent.parent / "tests" / "data" / "vllm" / "smollm2_tokenizer_info.json"
LLAMA3 = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{n}|>" for n in range(249)),
]
BODIES = {
    "prose": "The quick brown fox jumps over the lazy dog. ",
    "code with < and >": "if (a < b && c > d) { x = <T>y; } ",
    "non-ASCII": "é",
    "near misses": "<|reserved_special_token_2",
    "'<|' (worst case)": "<|",
}


def main() -> None:
    guards = {
        "SmolLM2 (17)": ControlTextGuard(token_texts(SMOLLM2.read_bytes())),
        "Llama 3 (256)": ControlTextGuard(LLAMA3),
    }
    for guard_name, guard in guards.items():
        for body_name, unit in BODIES.items():
            text = (unit * (SIZE // len(unit) + 1))[:SIZE]
            request = wire.ChatCompletionRequest(
                model="m", messages=[wire.UserMessage(content=text)]
            )
            times = []
            for _ in range(5):
                began = time.perf_counter()
                guard.check_chat(request)
                times.append(time.perf_counter() - began)
            print(
                f"{guard_name:14} {body_name:18} median {statistics.median(times) * 1000:6.1f} ms"
                f"  max {max(times) * 1000:6.1f} ms"
            )


if __name__ == "__main__":
    main()
