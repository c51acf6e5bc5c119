"""What the gateway adds to a request, beside a bare floor and LiteLLM (issue 3).

One run measures, side by side and interleaved, four paths to the same fast
fake upstream (``loadtests/fake_upstream.py``):

  direct     wrk straight at a fake upstream (the baseline every "added" is against)
  bare       ``loadtests/bare_proxy.py``: Litestar + msgspec + one aiohttp session,
             under uvicorn as nomoat runs: the floor for a Python proxy
  nomoat     ``nomoat serve`` with its whole pipeline on: API-key auth
             (``api_key_hashes``), a model with two ``vllm`` deployments (two
             ports of the fake) ranked by ``least-outstanding``, health and load
             probes of ``/health`` and ``/metrics``, per-deployment stats, usage
             read from every answer, requests re-encoded from typed structs
  litellm    the LiteLLM proxy (``scripts/setup_litellm.sh``, its own venv), one
             worker, master key on, the same two deployments, no database

Placement (2 cores): the server under test runs alone on one core (``--server-core``,
0); wrk, the fake upstream that the proxies call, this script and its streaming
client share the other (``--client-core``, 1). The server's core is the one being
measured, so it gets nothing else; the load side is cheap in comparison (the fake
serves over 30,000 requests/s, wrk more), so it never limits a Python proxy. The
``direct`` baseline is a second fake on the server's core, so a direct request
crosses cores like a proxied one does, and "added" is the proxy's own work plus
its extra hop to the upstream (``--direct-core client`` puts it beside wrk instead).

Figures, medians over ``--runs`` rounds; in each round every path runs once, in
an order rotated each round (this VM's speed drifts over minutes):

  c=1        wrk -t1 -c1 for ``--c1-seconds``: latency p50 and p99; "added" is the
             path's minus direct's in the same round (median of those differences)
  c=32       wrk -t1 -c32 for ``--c32-seconds``: requests/s, latency p99, and the
             server's CPU time per request (utime+stime from /proc of the server and
             all its threads and child processes, over the wrk run)
  TTFC       time to the first SSE event of a streamed chat at c=1, from a small
             raw-socket client (``--stream-requests`` per round), added vs direct
  relay      streams of ``fake-slow-model``, whose chunks the fake spaces by
             ``--chunk-delay-ms``: the client's arrival times must be as spread
             (every gap at least half the delay), not bunched

Quiet check: the 1-minute load average is read first (``--max-load``; the
script waits up to ``--wait-quiet`` seconds for it, then warns); during each
measured run, CPU used by processes that are not part of the benchmark is read
from /proc and a run over ``--max-other-load`` cores is redone (at most
``--max-redos`` times in all).

Needs ``wrk`` (Debian: ``apt-get install -y wrk``) and ``taskset`` (util-linux);
LiteLLM through ``scripts/setup_litellm.sh`` (or ``--skip-litellm``).
Everything is on 127.0.0.1, every run is bounded, every process it starts is
stopped at the end.

    .venv/bin/python loadtests/bench_overhead.py --runs 5 --json /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
API_KEY = "sk-bench-not-secret-0123456789"
MODEL = "fake-model"
SLOW_MODEL = "fake-slow-model"
PATHS = ("direct", "bare", "nomoat", "litellm")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello in one short sentence, please."},
    ],
    "max_tokens": 32,
    "temperature": 0.2,
}

# --------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _stat(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces: split after its closing parenthesis.
    return text[text.rfind(")") + 2 :].split()


def _processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime, stime+cstime in ticks) for every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat(entry.name)
        if fields is None:
            continue
        # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        table[int(entry.name)] = (
            int(fields[1]),
            int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]),
            int(fields[12]) + int(fields[14]),
        )
    return table


def tree_ticks(
    root: int, table: dict[int, tuple[int, int, int]] | None = None, system: bool = False
) -> int:
    """CPU ticks of a process, its threads, and its children (live or reaped);
    ``system``: the kernel's share alone (stime)."""
    table = _processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            total += table[pid][2 if system else 1]
        stack.extend(children.get(pid, ()))
    return total


def busy_ticks() -> int:
    """Ticks every CPU spent not idle, since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(v) for v in fields]
    # user nice system idle iowait irq softirq steal (guest is inside user)
    return sum(values[:8]) - values[3] - values[4] - values[7]


class OthersMeter:
    """CPU used by processes outside this benchmark (this process's tree)."""

    def __init__(self) -> None:
        self._start = (busy_ticks(), tree_ticks(os.getpid()), time.monotonic())

    def cores(self) -> float:
        busy, ours, started = busy_ticks(), tree_ticks(os.getpid()), time.monotonic()
        others = (busy - self._start[0]) - (ours - self._start[1])
        return max(others, 0) / CLK_TCK / max(started - self._start[2], 1e-3)


# ------------------------------------------------------------------ processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)


STARTED: list[Proc] = []


def stop_all() -> None:
    """Stop every process this module started, last first."""
    while STARTED:
        STARTED.pop().stop()


def start(
    name: str,
    command: Sequence[str],
    workdir: Path,
    core: int | None,
    env: dict[str, str] | None = None,
) -> Proc:
    """Start a process in its own session (so its children stop with it),
    pinned to ``core`` with taskset, output to a log file. Every process is
    recorded in ``STARTED``: :func:`stop_all` stops them."""
    argv = [*(["taskset", "-c", str(core)] if core is not None else []), *command]
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            # The gateways' accounting ledger in the run's directory, never
            # the user's (XDG_DATA_HOME is where its SQLite file goes).
            env={**os.environ, "XDG_DATA_HOME": str(workdir), **(env or {})},
            start_new_session=True,
        )
    proc = Proc(name, popen, log_path)
    STARTED.append(proc)
    return proc


def wait_http(
    proc: Proc, port: int, path: str, timeout_s: float, headers: dict[str, str] | None = None
) -> None:
    """Until GET path answers 200 (the process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        with contextlib.suppress(OSError):
            status, _ = request_once(port, "GET", path, b"", headers or {}, timeout_s=2)
            if status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(
        f"{proc.name} not ready on :{port}{path} in {timeout_s:.0f} s:\n{proc.tail()}"
    )


def start_fake(
    name: str, ports: Sequence[int], workdir: Path, core: int | None, chunk_delay_ms: float
) -> Proc:
    command = [PYTHON, str(HERE / "fake_upstream.py"), "--chunk-delay-ms", str(chunk_delay_ms)]
    for port in ports:
        command += ["--port", str(port)]
    proc = start(name, command, workdir, core)
    for port in ports:
        wait_http(proc, port, "/health", 20)
    return proc


def start_bare(upstream_port: int, port: int, workdir: Path, core: int | None) -> Proc:
    command = [
        PYTHON,
        str(HERE / "bare_proxy.py"),
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
        "--port",
        str(port),
    ]
    proc = start("bare", command, workdir, core)
    wait_for_chat(proc, port, {}, 30)
    return proc


def nomoat_config(port: int, upstream_ports: Sequence[int], extra: str = "") -> str:
    from gateway.auth import hash_api_key

    backends = "".join(
        textwrap.dedent(
            f"""
            [backends.fake-{index}]
            type = "vllm"
            base_url = "http://127.0.0.1:{upstream}/v1"
            models = ["{MODEL}", "{SLOW_MODEL}"]
            """
        )
        for index, upstream in enumerate(upstream_ports)
    )
    deployments = ", ".join(f'{{ backend = "fake-{i}" }}' for i in range(len(upstream_ports)))
    models = "".join(
        textwrap.dedent(
            f"""
            [models.{name}]
            policy = "least-outstanding"
            deployments = [{deployments}]
            """
        )
        for name in (MODEL, SLOW_MODEL)
    )
    server = textwrap.dedent(
        f"""
        [server]
        host = "127.0.0.1"
        port = {port}
        api_key_hashes = ["{hash_api_key(API_KEY)}"]
        shutdown_grace_seconds = 2
        log_level = "warning"

        [plugins]
        # Not needed here (no in-process engine), and never loaded then.
        disabled = ["llamacpp"]
        """
    )
    return server + backends + models + textwrap.dedent(extra)


def start_nomoat(
    upstream_ports: Sequence[int],
    port: int,
    workdir: Path,
    core: int | None,
    command: str | None = None,
    extra: str = "",
    name: str = "nomoat",
    env: dict[str, str] | None = None,
) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "nomoat.toml"
    config.write_text(nomoat_config(port, upstream_ports, extra))
    argv = (
        (command or f"{PYTHON} -m gateway.cli serve --config {{config}}")
        .format(config=config)
        .split()
    )
    proc = start(name, argv, workdir, core, env)
    wait_for_chat(proc, port, auth_headers(), 60)
    status, _ = request_once(port, "POST", "/v1/chat/completions", body_bytes(), {}, 5)
    if status != 401:
        raise RuntimeError(f"nomoat answered {status} to a request without a key (auth off?)")
    return proc


def variants(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=TOML`` pairs, ``\\n`` in the TOML read as a new line."""
    out = []
    for spec in specs:
        name, _, extra = spec.partition("=")
        if not name or name in PATHS:
            raise SystemExit(f"bench_overhead: bad variant name in {spec!r}")
        out.append((name, extra.replace("\\n", "\n")))
    return out


def variant_env(specs: Sequence[str], name: str) -> dict[str, str]:
    env = {}
    for spec in specs:
        owner, _, assignment = spec.partition(":")
        if owner == name:
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


def litellm_config(upstream_ports: Sequence[int]) -> str:
    lines = ["model_list:"]
    for name in (MODEL, SLOW_MODEL):
        for upstream in upstream_ports:
            lines += [
                f"  - model_name: {name}",
                "    litellm_params:",
                f"      model: openai/{name}",
                f"      api_base: http://127.0.0.1:{upstream}/v1",
                "      api_key: sk-fake-upstream",
            ]
    lines += [
        "litellm_settings:",
        "  telemetry: false",
        "  set_verbose: false",
        "  turn_off_message_logging: true",
        "  drop_params: true",
        "  callbacks: []",
        "  success_callback: []",
        "  failure_callback: []",
        "general_settings:",
        f"  master_key: {API_KEY}",
        "  disable_spend_logs: true",
        "  disable_error_logs: true",
        "  disable_adding_master_key_hash_to_db: true",
        "  background_health_checks: false",
    ]
    return "\n".join(lines) + "\n"


# No network from LiteLLM: the price table it bundles, no telemetry, no UI.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
    "DO_NOT_TRACK": "1",
    "ANONYMIZED_TELEMETRY": "False",
}


def litellm_command(given: str | None) -> str:
    if given:
        return given
    setup = ROOT / "scripts" / "setup_litellm.sh"
    out = subprocess.run(
        [str(setup)], check=True, capture_output=True, text=True, timeout=1800
    ).stdout
    return out.strip().splitlines()[-1]


def litellm_version(command: str) -> str:
    stamp = Path(command).parent.parent / ".nomoat-version"
    with contextlib.suppress(OSError):
        return stamp.read_text().strip()
    return "unknown"


def start_litellm(
    command: str, upstream_ports: Sequence[int], port: int, workdir: Path, core: int | None
) -> Proc:
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(upstream_ports))
    argv = [
        command,
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {**LITELLM_ENV, "HOME": str(workdir)}
    proc = start("litellm", argv, workdir, core, env)
    wait_http(proc, port, "/health/liveliness", 180)
    wait_for_chat(proc, port, auth_headers(), 60)
    # Refused, but LiteLLM 1.108.7 answers 500, not 401, when `prisma` (a
    # database client, not in litellm[proxy]) is missing: its error handler imports it.
    status, _ = request_once(port, "POST", "/v1/chat/completions", body_bytes(), {}, 10)
    if status == 200:
        raise RuntimeError("LiteLLM served a request without a key (auth off?)")
    return proc


def wait_for_chat(proc: Proc, port: int, headers: dict[str, str], timeout_s: float) -> None:
    """Until a chat request through the path answers 200 with the fake's text."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        try:
            status, content = request_once(
                port, "POST", "/v1/chat/completions", body_bytes(), headers, 10
            )
        except OSError as error:
            last = str(error)
        else:
            if status == 200 and b"fake upstream" in content:
                return
            last = f"{status} {content[:300]!r}"
        time.sleep(0.3)
    raise RuntimeError(f"{proc.name}: no good chat answer on :{port} ({last}):\n{proc.tail()}")


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def body_bytes(model: str = MODEL, stream: bool = False) -> bytes:
    body: dict[str, object] = {**BODY, "model": model}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------- a raw HTTP client


Event = tuple[float, bytes]  # (seconds after the request was sent, the event's text)


class RawClient:
    """HTTP/1.1 keep-alive over a blocking socket, timing every SSE event as
    its bytes arrive: the lightest client there is, so that what it measures
    is the server's."""

    def __init__(self, port: int, timeout_s: float = 30.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock, self._buffer = sock, b""
        return self._sock

    def _recv(self) -> bytes:
        assert self._sock is not None
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        return data

    def request(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, float, list[Event]]:
        """(status, body, seconds to the first body byte, each SSE event with
        its arrival in seconds after the request was sent)."""
        sock = self._connect()
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if body or method == "POST":
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        try:
            sent = time.perf_counter()
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            return self._response(sent)
        except BaseException:
            self.close()
            raise

    def _response(self, sent: float) -> tuple[int, bytes, float, list[Event]]:
        buffer = self._buffer
        while b"\r\n\r\n" not in buffer:
            buffer += self._recv()
        now = time.perf_counter()
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        events: list[Event] = []
        first: float | None = None
        body = bytearray()
        pending = b""  # SSE text not yet ended by a blank line

        def take(data: bytes, at: float) -> None:
            nonlocal pending, first
            if first is None and data:
                first = at - sent
            body.extend(data)
            pending += data
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                events.append((at - sent, event))

        if headers.get("transfer-encoding") == "chunked":
            while True:
                while b"\r\n" not in buffer:
                    buffer += self._recv()
                    now = time.perf_counter()
                size_line, buffer = buffer.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(buffer) < size + 2:
                    buffer += self._recv()
                    now = time.perf_counter()
                take(buffer[:size], now)
                buffer = buffer[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            while len(buffer) < length:
                buffer += self._recv()
                now = time.perf_counter()
            take(buffer[:length], now)
            buffer = buffer[length:]
        self._buffer = buffer
        if headers.get("connection") == "close":
            self.close()
        return status, bytes(body), first if first is not None else now - sent, events


def request_once(
    port: int,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float = 10,
) -> tuple[int, bytes]:
    client = RawClient(port, timeout_s)
    try:
        status, content, _, _ = client.request(method, path, body, headers)
        return status, content
    finally:
        client.close()


# ------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    port: int
    proc: Proc
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int
    cpu_ms_per_request: float | None
    others_cores: float
    # Of cpu_ms_per_request, in the kernel (stime): system calls, the network
    # stack, file I/O (SQLite's ledger).
    system_ms_per_request: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{headers}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK-RESULT %d %d %d %d %.3f %d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk_script(target: Target, workdir: Path) -> Path:
    path = workdir / f"wrk-{target.name}.lua"
    headers = "\n".join(
        f'wrk.headers["{name}"] = "{value}"' for name, value in target.headers.items()
    )
    path.write_text(LUA.format(body=body_bytes().decode(), headers=headers))
    return path


def run_wrk(
    target: Target, connections: int, seconds: float, workdir: Path, wrk: str = "wrk"
) -> WrkResult:
    script = wrk_script(target, workdir)
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        target.url,
    ]
    others = OthersMeter()
    table = _processes()
    before = tree_ticks(target.proc.pid, table)
    before_system = tree_ticks(target.proc.pid, table, system=True)
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    table = _processes()
    after = tree_ticks(target.proc.pid, table)
    after_system = tree_ticks(target.proc.pid, table, system=True)
    others_cores = others.cores()
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK-RESULT")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed on {target.name}: {out.stdout}\n{out.stderr}")
    requests, duration_us, p50, p99, mean, errors = line.split()[1:]
    count = int(requests)
    return WrkResult(
        requests=count,
        seconds=int(duration_us) / 1e6,
        p50_ms=int(p50) / 1000,
        p99_ms=int(p99) / 1000,
        mean_ms=float(mean) / 1000,
        errors=int(errors),
        cpu_ms_per_request=(after - before) / CLK_TCK * 1000 / count if count else None,
        system_ms_per_request=(
            (after_system - before_system) / CLK_TCK * 1000 / count if count else None
        ),
        others_cores=others_cores,
    )


@dataclass
class StreamResult:
    ttfc_ms: list[float]
    others_cores: float

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.ttfc_ms)


def stream_ttfc(target: Target, count: int) -> StreamResult:
    """Time to the first SSE event of ``count`` streamed chats, one at a time."""
    client = RawClient(target.port)
    body = body_bytes(stream=True)
    others = OthersMeter()
    times = []
    try:
        for _ in range(count):
            status, content, _, events = client.request(
                "POST", "/v1/chat/completions", body, target.headers
            )
            if status != 200 or not events or not content.rstrip().endswith(b"[DONE]"):
                raise RuntimeError(f"{target.name}: bad stream ({status}) {content[:300]!r}")
            times.append(events[0][0] * 1000)
    finally:
        client.close()
    return StreamResult(times, others.cores())


@dataclass
class RelayResult:
    events: int
    gaps_ms: list[float]
    min_gap_ms: float
    spread_ms: float
    relayed: bool


def relay_check(target: Target, delay_ms: float, count: int = 3) -> RelayResult:
    """Streams whose upstream content chunks are ``delay_ms`` apart: the
    client must see them that far apart too (every gap at least half the
    delay). The worst of ``count`` streams is kept."""
    client = RawClient(target.port)
    body = body_bytes(SLOW_MODEL, stream=True)
    worst: RelayResult | None = None
    try:
        for _ in range(count):
            status, content, _, events = client.request(
                "POST", "/v1/chat/completions", body, target.headers
            )
            arrivals = [at for at, text in events if _has_content(text)]
            if status != 200 or len(arrivals) < 2:
                raise RuntimeError(f"{target.name}: bad slow stream ({status}) {content[:300]!r}")
            gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
            result = RelayResult(
                events=len(events),
                gaps_ms=[round(g, 1) for g in gaps],
                min_gap_ms=min(gaps),
                spread_ms=(arrivals[-1] - arrivals[0]) * 1000,
                relayed=min(gaps) >= delay_ms / 2,
            )
            if worst is None or result.min_gap_ms < worst.min_gap_ms:
                worst = result
    finally:
        client.close()
    assert worst is not None
    return worst


def _has_content(event: bytes) -> bool:
    """A chat chunk with some text in its delta."""
    if not event.startswith(b"data: {"):
        return False
    with contextlib.suppress(ValueError):
        chunk = json.loads(event[6:])
        return any(
            (choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or ()
        )
    return False


# ------------------------------------------------------------------- the run


ResultT = TypeVar("ResultT", "WrkResult", "StreamResult")


@dataclass
class Round:
    c1: dict[str, WrkResult] = field(default_factory=dict)
    c32: dict[str, WrkResult] = field(default_factory=dict)
    stream: dict[str, StreamResult] = field(default_factory=dict)


def measured(
    what: str,
    run: Callable[[], ResultT],
    args: argparse.Namespace,
    budget: list[int],
) -> ResultT:
    """Run; redo while other processes were busy (within the redo budget)."""
    while True:
        result = run()
        if isinstance(result, WrkResult) and result.errors:
            raise RuntimeError(f"{what}: {result.errors} errors")
        if result.others_cores <= args.max_other_load or budget[0] <= 0:
            if result.others_cores > args.max_other_load:
                log(f"  {what}: others used {result.others_cores:.2f} cores (kept: no redos left)")
            return result
        budget[0] -= 1
        log(f"  {what}: others used {result.others_cores:.2f} cores; redone")


def measure(targets: Sequence[Target], args: argparse.Namespace, workdir: Path) -> list[Round]:
    log("warm-up")
    for target in targets:
        run_wrk(target, args.concurrency, 1, workdir, args.wrk)
        run_wrk(target, 1, 1, workdir, args.wrk)
        stream_ttfc(target, 20)
    rounds = []
    budget = [args.max_redos]
    for index in range(args.runs):
        shift = index % len(targets)
        order = [*targets[shift:], *targets[:shift]]
        log(f"round {index + 1}/{args.runs}: {', '.join(t.name for t in order)}")
        current = Round()
        for target in order:
            name, conc = target.name, args.concurrency
            c1 = measured(
                f"{name} c=1",
                functools.partial(run_wrk, target, 1, args.c1_seconds, workdir, args.wrk),
                args,
                budget,
            )
            c32 = measured(
                f"{name} c={conc}",
                functools.partial(run_wrk, target, conc, args.c32_seconds, workdir, args.wrk),
                args,
                budget,
            )
            stream = measured(
                f"{name} stream",
                functools.partial(stream_ttfc, target, args.stream_requests),
                args,
                budget,
            )
            current.c1[name], current.c32[name], current.stream[name] = c1, c32, stream
            log(
                f"  {name:8} c=1 p50 {c1.p50_ms:.3f} p99 {c1.p99_ms:.3f} ms | "
                f"c={conc} {c32.rps:.0f}/s p99 {c32.p99_ms:.2f} ms "
                f"cpu {c32.cpu_ms_per_request or 0:.3f} ms/req "
                f"(system {c32.system_ms_per_request or 0:.3f}) | ttfc {stream.p50_ms:.3f} ms"
            )
        rounds.append(current)
    return rounds


# ------------------------------------------------------------------- report


@dataclass
class Row:
    path: str
    c1_p50: float
    c1_p99: float
    added_p50: float | None
    added_p99: float | None
    rps: float
    c32_p99: float
    cpu_ms: float | None
    ttfc: float
    added_ttfc: float | None
    relay: RelayResult | None
    others_max: float


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def summarise(
    rounds: Sequence[Round], names: Sequence[str], relays: dict[str, RelayResult]
) -> list[Row]:
    rows = []
    for name in names:

        def added(pick: Callable[[Round, str], float], name: str = name) -> float | None:
            if name == "direct":
                return None
            return _median([pick(r, name) - pick(r, "direct") for r in rounds])

        cpu = [r.c32[name].cpu_ms_per_request for r in rounds]
        others = [
            max(r.c1[name].others_cores, r.c32[name].others_cores, r.stream[name].others_cores)
            for r in rounds
        ]
        rows.append(
            Row(
                path=name,
                c1_p50=_median([r.c1[name].p50_ms for r in rounds]),
                c1_p99=_median([r.c1[name].p99_ms for r in rounds]),
                added_p50=added(lambda r, n: r.c1[n].p50_ms),
                added_p99=added(lambda r, n: r.c1[n].p99_ms),
                rps=_median([r.c32[name].rps for r in rounds]),
                c32_p99=_median([r.c32[name].p99_ms for r in rounds]),
                cpu_ms=_median([c for c in cpu if c is not None]) if all(cpu) else None,
                ttfc=_median([r.stream[name].p50_ms for r in rounds]),
                added_ttfc=added(lambda r, n: r.stream[n].p50_ms),
                relay=relays.get(name),
                others_max=max(others),
            )
        )
    return rows


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: Sequence[Row], concurrency: int) -> str:
    lines = [
        f"| path | c=1 p50 ms | c=1 p99 ms | added p50 ms | added p99 ms | c={concurrency} req/s "
        f"| c={concurrency} p99 ms | server CPU ms/req | stream TTFC ms | added TTFC ms "
        "| chunks relayed (min gap ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        relay = (
            "-"
            if row.relay is None
            else f"{'yes' if row.relay.relayed else 'NO'} ({row.relay.min_gap_ms:.1f})"
        )
        lines.append(
            f"| {row.path} | {fmt(row.c1_p50, 3)} | {fmt(row.c1_p99, 3)} | "
            f"{fmt(row.added_p50, 3)} | {fmt(row.added_p99, 3)} | {row.rps:,.0f} | "
            f"{fmt(row.c32_p99)} | {fmt(row.cpu_ms, 3)} | {fmt(row.ttfc, 3)} | "
            f"{fmt(row.added_ttfc, 3)} | {relay} |"
        )
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def variant_lines(rows: Sequence[Row]) -> str:
    """Each --nomoat-variant against the plain nomoat path (e.g. telemetry
    on against off): CPU per request, added latency, requests/s."""
    by = {row.path: row for row in rows}
    base = by.get("nomoat")
    lines = []
    for row in rows:
        if row.path in PATHS or base is None:
            continue
        p50 = (
            f"{row.added_p50 - base.added_p50:+.3f} ms"
            if row.added_p50 is not None and base.added_p50 is not None
            else "-"
        )
        lines.append(
            f"- {row.path} vs nomoat: CPU/request {_ratio(row.cpu_ms, base.cpu_ms)}, "
            f"added p50 {p50}, requests/s {_ratio(row.rps, base.rps)}, "
            f"added TTFC {_ratio(row.added_ttfc, base.added_ttfc)}"
        )
    return "\n".join(lines)


def ratios_and_targets(rows: Sequence[Row], chunk_delay_ms: float) -> str:
    by = {row.path: row for row in rows}
    nomoat, bare, litellm = by.get("nomoat"), by.get("bare"), by.get("litellm")
    lines = []
    if nomoat and bare:
        lines += [
            "nomoat vs the bare floor: "
            f"added p50 {_ratio(nomoat.added_p50, bare.added_p50)}, "
            f"added p99 {_ratio(nomoat.added_p99, bare.added_p99)}, "
            f"CPU/request {_ratio(nomoat.cpu_ms, bare.cpu_ms)}, "
            f"requests/s {_ratio(nomoat.rps, bare.rps)}, "
            f"added TTFC {_ratio(nomoat.added_ttfc, bare.added_ttfc)}"
        ]
    if nomoat and litellm:
        lines += [
            "nomoat vs LiteLLM: "
            f"requests/s {_ratio(nomoat.rps, litellm.rps)} LiteLLM's, "
            f"CPU/request 1/{_ratio(litellm.cpu_ms, nomoat.cpu_ms)} of LiteLLM's, "
            f"added p50 1/{_ratio(litellm.added_p50, nomoat.added_p50)}, "
            f"added p99 1/{_ratio(litellm.added_p99, nomoat.added_p99)}, "
            f"added TTFC 1/{_ratio(litellm.added_ttfc, nomoat.added_ttfc)}"
        ]
    if nomoat:

        def verdict(ok: bool | None) -> str:
            return "n/a" if ok is None else ("met" if ok else "NOT met")

        def at_most(value: float | None, limit: float) -> bool | None:
            return None if value is None else value <= limit

        rps_ok = None if litellm is None else nomoat.rps >= 20 * litellm.rps
        relay = nomoat.relay
        lines += [
            "",
            "Targets (nomoat, one worker, everything on):",
            f"- added latency p50 <= 0.6 ms at c=1: {fmt(nomoat.added_p50, 3)} ms, "
            f"{verdict(at_most(nomoat.added_p50, 0.6))}",
            f"- added latency p99 <= 1.0 ms at c=1: {fmt(nomoat.added_p99, 3)} ms, "
            f"{verdict(at_most(nomoat.added_p99, 1.0))}",
            f"- server CPU <= 0.4 ms per request: {fmt(nomoat.cpu_ms, 3)} ms, "
            f"{verdict(at_most(nomoat.cpu_ms, 0.4))}",
            f"- requests/s >= 20x LiteLLM's: {nomoat.rps:,.0f} vs "
            f"{'-' if litellm is None else f'{litellm.rps:,.0f}'} "
            f"({_ratio(nomoat.rps, litellm.rps if litellm else None)}), {verdict(rps_ok)}",
            f"- streaming adds <= 0.5 ms to the time to first chunk: "
            f"{fmt(nomoat.added_ttfc, 3)} ms, {verdict(at_most(nomoat.added_ttfc, 0.5))}",
            f"- each chunk relayed as it arrives (chunks {chunk_delay_ms:g} ms apart upstream): "
            + ("-" if relay is None else f"gaps {relay.gaps_ms} ms, {verdict(relay.relayed)}"),
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5)
        wrk_version = (out.stdout + out.stderr).strip().splitlines()[0]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk_version,
    }


def wait_until_quiet(args: argparse.Namespace) -> float:
    load = loadavg()
    deadline = time.monotonic() + args.wait_quiet
    while load > args.max_load and time.monotonic() < deadline:
        log(f"load average {load:.2f} > {args.max_load}: waiting for a quieter machine")
        time.sleep(10)
        load = loadavg()
    if load > args.max_load:
        log(
            f"WARNING: 1-minute load average is {load:.2f} (> {args.max_load}): other work "
            "is running; figures will be noisy"
        )
    return load


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--c1-seconds", type=float, default=4.0)
    parser.add_argument("--c32-seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stream-requests", type=int, default=200, help="per path per round")
    parser.add_argument("--chunk-delay-ms", type=float, default=20.0)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument(
        "--direct-core",
        choices=("server", "client"),
        default="server",
        help="where the direct baseline's fake runs (see the module doc)",
    )
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--skip-bare", action="store_true")
    parser.add_argument("--litellm-cmd", help="the `litellm` command (default: setup script)")
    parser.add_argument("--nomoat-cmd", help="default: .venv/bin/nomoat serve --config {config}")
    parser.add_argument("--nomoat-config-extra", default="", help="TOML appended to its config")
    parser.add_argument(
        "--nomoat-variant",
        action="append",
        default=[],
        metavar="NAME=TOML",
        help="another nomoat path, its config extra TOML (\\n for new lines) instead of "
        "--nomoat-config-extra; repeatable (e.g. telemetry off and on, interleaved)",
    )
    parser.add_argument(
        "--nomoat-variant-env",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE",
        help="an environment variable for one variant's server (e.g. OTEL_* for tracing)",
    )
    parser.add_argument("--wrk", default="wrk")
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="seconds to wait for it")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the benchmark and every process it starts at this niceness (e.g. -10, "
        "as root: ahead of other work on a shared machine)",
    )
    parser.add_argument("--max-other-load", type=float, default=0.25)
    parser.add_argument("--max-redos", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write every sample and the summary here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary folder")
    return parser.parse_args(argv)


def check_tools(args: argparse.Namespace) -> None:
    missing = [tool for tool in (args.wrk, "taskset") if shutil.which(tool) is None]
    if missing:
        sys.exit(
            f"bench_overhead: missing {', '.join(missing)} "
            "(Debian: apt-get install -y wrk util-linux)"
        )
    cores = os.sched_getaffinity(0)
    if not {args.server_core, args.client_core} <= cores or args.server_core == args.client_core:
        sys.exit(f"bench_overhead: needs two distinct cores of {sorted(cores)}")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools(args)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.nice:
        # Inherited by every process started from here on.
        os.nice(args.nice)
    load_before = wait_until_quiet(args)
    litellm_cmd = None if args.skip_litellm else litellm_command(args.litellm_cmd)
    # This process, wrk, the streaming client and the upstream fake share the
    # client core; each server under test gets the other core to itself.
    os.sched_setaffinity(0, {args.client_core})
    server, client = args.server_core, args.client_core
    workdir = Path(tempfile.mkdtemp(prefix="nomoat-overhead-"))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        upstream = [free_port(), free_port()]
        direct_port = free_port()
        start_fake("fake", upstream, workdir, client, args.chunk_delay_ms)
        direct_core = server if args.direct_core == "server" else client
        direct = start_fake("direct", [direct_port], workdir, direct_core, args.chunk_delay_ms)
        targets = [Target("direct", direct_port, direct)]
        if not args.skip_bare:
            port = free_port()
            targets.append(Target("bare", port, start_bare(upstream[0], port, workdir, server)))
        port = free_port()
        nomoat = start_nomoat(
            upstream, port, workdir, server, args.nomoat_cmd, args.nomoat_config_extra
        )
        targets.append(Target("nomoat", port, nomoat, auth_headers()))
        for name, extra in variants(args.nomoat_variant):
            port = free_port()
            proc = start_nomoat(
                upstream,
                port,
                workdir / name,
                server,
                args.nomoat_cmd,
                extra,
                name=name,
                env=variant_env(args.nomoat_variant_env, name),
            )
            targets.append(Target(name, port, proc, auth_headers()))
        if litellm_cmd is not None:
            port = free_port()
            log("starting LiteLLM (takes a while)")
            litellm = start_litellm(litellm_cmd, upstream, port, workdir, server)
            targets.append(Target("litellm", port, litellm, auth_headers()))
        log(f"paths up: {', '.join(f'{t.name} :{t.port}' for t in targets)}; logs in {workdir}")
        rounds = measure(targets, args, workdir)
        relays = {t.name: relay_check(t, args.chunk_delay_ms) for t in targets}
        for proc in STARTED:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} died during the run:\n{proc.tail()}")
    finally:
        stop_all()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = summarise(rounds, [t.name for t in targets], relays)
    info = {
        **machine(),
        "started": started,
        "load_before": load_before,
        "load_after": loadavg(),
        "litellm": litellm_version(litellm_cmd) if litellm_cmd else None,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    report = [
        f"Gateway overhead, {started}; {info['cpu']}, {info['cores']} cores; "
        f"Python {info['python']}; LiteLLM {info['litellm'] or '(skipped)'}; "
        f"load average {load_before:.2f} before, {info['load_after']:.2f} after; "
        f"other processes used at most {max(r.others_max for r in rows):.2f} cores in a kept run"
        + (f"; benchmark at niceness {args.nice}." if args.nice else "."),
        f"Medians of {args.runs} interleaved rounds; c=1 and c={args.concurrency}: wrk "
        f"{args.c1_seconds:g} s / {args.c32_seconds:g} s per run; TTFC: "
        f"{args.stream_requests} streams per round.",
        "",
        table(rows, args.concurrency),
        "",
        ratios_and_targets(rows, args.chunk_delay_ms),
        variant_lines(rows),
    ]
    print("\n".join(report))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "info": info,
                    "rows": [asdict(row) for row in rows],
                    "rounds": [asdict(r) for r in rounds],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
