"""What the tests of cut streams share (test_cut_usage_live.py on the
embedded engine, test_ledger_edge.py through an edge node): streams the
client leaves early, the ledger rows they get, and the tokens an engine
evaluated for them. Not a test file."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from test_ledger_live import NO_END, ledger_rows

from tests.conftest import MODEL


def rows_once_written(path: Path, count: int) -> list[dict[str, Any]]:
    """The ledger's rows, once it holds at least ``count`` (30 s at most)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists() and len(rows := ledger_rows(path)) >= count:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} ledger rows")


def cut_after(stream: openai.Stream[Any], chunks: int, run_ahead: float) -> None:
    """Read ``chunks`` chunks, let the engine run ahead ``run_ahead``
    seconds, then leave."""
    for seen, _ in enumerate(stream, start=1):
        if seen == chunks:
            break
    time.sleep(run_ahead)
    stream.close()


def cut_chat_and_text(
    client: openai.OpenAI, decoded: Callable[[], int], chunks: tuple[int, int], run_ahead: float
) -> list[int]:
    """A chat stream, then a completions stream, each of a fresh prompt and
    cut by the client after ``chunks``; the tokens the engine evaluated for
    each (``decoded``: its counter, once nothing runs)."""
    before = decoded()
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Tell a long story about {uuid.uuid4().hex}."}],
        max_tokens=2000,
        stream=True,
        logit_bias=NO_END,
    )
    cut_after(chat, chunks[0], run_ahead)
    middle = decoded()
    text = client.completions.create(
        model=MODEL,
        prompt=f"Chapter {uuid.uuid4().hex}: it was a dark and stormy night",
        max_tokens=2000,
        stream=True,
        logit_bias=NO_END,
    )
    cut_after(text, chunks[1], run_ahead)
    return [middle - before, decoded() - middle]


def leave_a_json_request(impatient: openai.OpenAI) -> None:
    """A chat request of a fresh prompt that ``impatient`` (with a short
    timeout) leaves before its long answer ends."""
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {uuid.uuid4().hex}."}],
            max_tokens=4000,
            logit_bias=NO_END,
        )


def evaluated(row: dict[str, Any]) -> int:
    """The tokens llama.cpp evaluated for a row's request: the uncached
    prompt and every generated token but the last (sampled, never fed back)."""
    return int(row["prompt_tokens"] - row["cached_tokens"] + row["completion_tokens"] - 1)
