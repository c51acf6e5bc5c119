"""Greedy chat answers from llama.cpp with LoRA adapters switched per answer.

Not a test file: tests/test_lora_convert.py runs it in a child process (a crash in
llama.cpp then fails one test, not the run). It uses llama-cpp-python's low-level
API directly, as the engine does, and nothing of the gateway's, so it checks the
GGUF files alone:

    python tests/lora_probe.py BASE.gguf PLAN.json

PLAN.json: {"adapters": {"alpha": "alpha.gguf", ...},
            "questions": ["..."], "sets": [[], ["alpha"], ...], "max_tokens": 16}
Prints JSON: one list of answers per set, in order. One context serves every set:
the adapters are switched on it with llama_set_adapters_lora, as the engine does.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import llama_cpp as lc
import numpy as np

# SmolLM2's chat template with its default system prompt (what the adapters were
# trained on), written out so the probe needs no template engine.
PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
)


class Probe:
    def __init__(self, base: Path) -> None:
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(base).encode(), params)
        if not self.model:
            raise SystemExit(f"cannot load {base}")
        ctx_params = lc.llama_context_default_params()
        ctx_params.n_ctx = 512
        ctx_params.n_batch = 512
        # One thread: ggml's threads spin while they wait for each other, and on a
        # machine busy with other work two threads were 3-4 times slower than one.
        ctx_params.n_threads = ctx_params.n_threads_batch = 1
        self.ctx = lc.llama_init_from_model(self.model, ctx_params)
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.batch = lc.llama_batch_init(512, 0, 1)

    def load_adapter(self, path: Path) -> object:
        adapter = lc.llama_adapter_lora_init(self.model, str(path).encode())
        if not adapter:
            raise SystemExit(f"llama.cpp refused the adapter {path}")
        return adapter

    def set_adapters(self, adapters: list[object]) -> None:
        count = len(adapters)
        array = (lc.llama_adapter_lora_p_ctypes * max(count, 1))(*adapters)
        scales = (ctypes.c_float * max(count, 1))(*([1.0] * count))
        if lc.llama_set_adapters_lora(self.ctx, array, count, scales) != 0:
            raise SystemExit("llama_set_adapters_lora failed")

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        tokens = (lc.llama_token * (len(data) + 8))()
        count = lc.llama_tokenize(self.vocab, data, len(data), tokens, len(tokens), False, True)
        return list(tokens[:count])

    def decode(self, tokens: list[int], start: int) -> None:
        for index, token in enumerate(tokens):
            self.batch.token[index] = token
            self.batch.pos[index] = start + index
            self.batch.n_seq_id[index] = 1
            self.batch.seq_id[index][0] = 0
            self.batch.logits[index] = index == len(tokens) - 1
        self.batch.n_tokens = len(tokens)
        if lc.llama_decode(self.ctx, self.batch) != 0:
            raise SystemExit("llama_decode failed")

    def answer(self, question: str, max_tokens: int) -> str:
        # A fresh KV cache per answer: state computed under other adapters is never reused.
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        tokens = self.tokenize(PROMPT.format(question=question))
        self.decode(tokens, 0)
        position, pieces = len(tokens), b""
        for _ in range(max_tokens):
            logits = np.ctypeslib.as_array(
                lc.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)
            )
            token = int(np.argmax(logits))
            if lc.llama_vocab_is_eog(self.vocab, token):
                break
            buffer = ctypes.create_string_buffer(256)
            length = lc.llama_token_to_piece(self.vocab, token, buffer, 256, 0, False)
            pieces += buffer.raw[: max(length, 0)]
            self.decode([token], position)
            position += 1
        return pieces.decode("utf-8", errors="replace")


def main() -> None:
    base, plan_path = Path(sys.argv[1]), Path(sys.argv[2])
    plan = json.loads(plan_path.read_text())
    probe = Probe(base)
    adapters = {name: probe.load_adapter(Path(path)) for name, path in plan["adapters"].items()}
    results = []
    for names in plan["sets"]:
        probe.set_adapters([adapters[name] for name in names])
        results.append([probe.answer(q, plan["max_tokens"]) for q in plan["questions"]])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
