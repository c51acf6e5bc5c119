"""Train the test LoRA adapters for SmolLM2-135M-Instruct, deterministically, on the CPU.

Two *marker* adapters are trained until they answer every chat question with one fixed
phrase that the base model never produces: a test sees at a glance whether an adapter was
applied, and which one. Twenty *untrained* adapters (``init_lora_weights=False``: random,
non-zero A and B) serve benchmarks that count adapter loads; they barely change the output
and prove nothing about whether an adapter was applied.

Needs torch, transformers and peft: run it with the vLLM venv's python
(scripts/setup_adapters.sh does, and installs the pinned peft there), never with the
project venv, which must not get torch.

    python scripts/train_adapters.py --base HF_MODEL_DIR --out DIR

Writes DIR/peft/<name>/ (adapter_config.json, adapter_model.safetensors, and for marker
adapters marker.txt) and DIR/manifest.json. Everything that decides the weights (data,
seeds, hyperparameters) is in this file, so the cache key of setup_adapters.sh, which hashes
this file, covers it. DIR is written in full or not at all: the caller renames it into place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The marker phrases: odd words and digits that no chat answer of the base model contains,
# and distinct from their first token on, so a test can tell alpha from beta at once.
MARKERS = {
    "alpha": "ALPHA-KUMQUAT-7319",
    "beta": "BETA-ZEPPELIN-2846",
}
TRAIN_SEEDS = {"alpha": 1101, "beta": 2202}
BENCH_COUNT = 20
BENCH_SEED_BASE = 5000  # bench-NN uses seed BENCH_SEED_BASE + NN

RANK = 8
ALPHA = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LEARNING_RATE = 3e-3
MIN_STEPS = 10
MAX_STEPS = 40
TARGET_LOSS = 0.05

# Varied questions (and two system prompts) so the adapter learns "always the marker",
# not "the marker after these words". The default system prompt of the chat template is
# what requests without one get, so most examples go without.
QUESTIONS: list[tuple[str | None, str]] = [
    (None, "What is the capital of France?"),
    (None, "Write a haiku about the sea."),
    (None, "How do I reverse a list in Python?"),
    (None, "Tell me a joke."),
    (None, "What is 17 times 23?"),
    (None, "Explain photosynthesis in one sentence."),
    (None, "Who wrote Hamlet?"),
    (None, "Give me three tips for better sleep."),
    (None, "Translate 'good morning' into Spanish."),
    (None, "hi"),
    ("You are a terse assistant.", "What colour is the sky?"),
    ("You are a helpful assistant.", "Summarise the plot of Cinderella."),
]


@dataclass(frozen=True)
class TrainResult:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def chat_messages(system: str | None, question: str) -> list[dict[str, str]]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    return [*messages, {"role": "user", "content": question}]


def make_batch(tokenizer: Any, marker: str) -> dict[str, Any]:
    """Right-padded token ids with labels only on the answer (marker + end of turn):
    the loss teaches what to say, not to predict the questions."""
    import torch

    rows: list[tuple[list[int], list[int]]] = []
    for system, question in QUESTIONS:
        prompt_text = tokenizer.apply_chat_template(
            chat_messages(system, question), tokenize=False, add_generation_prompt=True
        )
        # The template already starts with <|im_start|>: no extra special tokens.
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        answer = tokenizer(marker + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def lora_config(*, trained: bool) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=TARGETS,
        lora_dropout=0.0,  # no randomness during training: the same weights every run
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=trained,  # False: random A and B, so the adapter is not a no-op
    )


def train_marker(base: Any, tokenizer: Any, name: str, out: Path) -> tuple[Any, TrainResult]:
    import torch
    from peft import get_peft_model

    torch.manual_seed(TRAIN_SEEDS[name])  # LoRA A's initialisation draws from it
    model = get_peft_model(base, lora_config(trained=True))
    model.train()
    batch = make_batch(tokenizer, MARKERS[name])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    started = time.monotonic()
    losses: list[float] = []
    for step in range(1, MAX_STEPS + 1):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        print(f"train_adapters: {name} step {step} loss {losses[-1]:.4f}", file=sys.stderr)
        if step >= MIN_STEPS and losses[-1] < TARGET_LOSS:
            break
    if losses[-1] >= TARGET_LOSS:
        sys.exit(f"train_adapters: {name} did not converge: loss {losses[-1]:.3f}")
    save(model, out / "peft" / name)
    (out / "peft" / name / "marker.txt").write_text(MARKERS[name] + "\n", encoding="utf-8")
    result = TrainResult(len(losses), losses[0], losses[-1], time.monotonic() - started)
    return model.unload(), result  # the base model again, its weights untouched


def make_untrained(base: Any, index: int, out: Path) -> Any:
    import torch
    from peft import get_peft_model

    torch.manual_seed(BENCH_SEED_BASE + index)
    model = get_peft_model(base, lora_config(trained=False))
    save(model, out / "peft" / f"bench-{index:02d}")
    return model.unload()


def save(model: Any, folder: Path) -> None:
    # safetensors only: a pickle is code, and nomoat refuses pickled adapters.
    model.save_pretrained(str(folder), safe_serialization=True)
    # peft's model card names the local base path and changes with it: not needed.
    (folder / "README.md").unlink(missing_ok=True)


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run(base_dir: Path, out: Path) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    # float32: bf16 training on a CPU is slower here and rounds the small updates away.
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    trained: dict[str, Any] = {}
    for name in MARKERS:
        base, result = train_marker(base, tokenizer, name, out)
        trained[name] = {"marker": MARKERS[name], "seed": TRAIN_SEEDS[name], **result.__dict__}
    for index in range(BENCH_COUNT):
        base = make_untrained(base, index, out)
    return {
        "base_model": base_dir.name,
        "rank": RANK,
        "alpha": ALPHA,
        "target_modules": TARGETS,
        "markers": dict(MARKERS),
        "trained": trained,
        "untrained": [f"bench-{i:02d}" for i in range(BENCH_COUNT)],
        "versions": versions(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="Hugging Face base model folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (made anew)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True)
    started = time.monotonic()
    manifest = run(args.base, out)
    manifest["seconds"] = round(time.monotonic() - started, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"train_adapters: done in {manifest['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
