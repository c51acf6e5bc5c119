"""Instructions the gateway executes per relayed stream chunk, under callgrind.

Wall time on this shared VM drifts by tens of percent between minutes;
instruction counts repeat to within about 1 %. Two fake upstreams
(``loadtests/fake_upstream.py``) stream the same chat answer, one with
``--short`` content chunks and one with ``--long``; ``nomoat serve`` runs
under ``valgrind --tool=callgrind`` with collection off, is warmed up, then
collects over ``--streams`` sequential streams of each. The instructions per
chunk are the difference between a long and a short stream divided by the
difference in chunks, so the per-stream set-up cancels out.

    .venv/bin/python loadtests/chunk_instructions.py --streams 20

Needs valgrind (``callgrind_control`` on the PATH). Loopback only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEY = "sk-bench-not-secret-0123456789"
KEY_HASH = "sha256:2986b7864d51218b9baebab55b680a48d99278107423662024d6fdb5e61234c6"
_TOTAL = re.compile(r"^summary:\s+(\d+)", re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _config(
    short_port: int,
    long_port: int,
    port: int,
    extra: str,
    engine_model: str,
    client: str,
    *,
    accounting: bool,
) -> str:
    # Accounting off unless asked: its managed-key poll (every 0.5 s) would
    # be counted in proportion to how long a run takes, i.e. per chunk.
    accounting_section = "" if accounting else "[accounting]\nenabled = false"
    return f"""
[server]
host = "127.0.0.1"
port = {port}
api_key_hashes = ["{KEY_HASH}"]
log_level = "warning"

[plugins]
disabled = ["llamacpp"]

[backends.short]
type = "vllm"
base_url = "http://127.0.0.1:{short_port}/v1"
models = ["fake-model", "fake-slow-model"]
# No probes while measuring: they would be counted.
probe_interval = 3600
stream_client = "{client}"

[backends.long]
type = "vllm"
base_url = "http://127.0.0.1:{long_port}/v1"
models = ["fake-model", "fake-slow-model"]
# No probes while measuring: they would be counted.
probe_interval = 3600
stream_client = "{client}"

[models.short]
deployments = [{{ backend = "short", model = "{engine_model}" }}]

[models.long]
deployments = [{{ backend = "long", model = "{engine_model}" }}]
{accounting_section}
{extra}
"""


def _stream(port: int, model: str, usage: bool) -> int:
    """One streamed chat; the number of events read (ends with [DONE])."""
    request: dict[str, object] = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if usage:
        request["stream_options"] = {"include_usage": True}
    body = json.dumps(request).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            body,
            {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        text = response.read()
    finally:
        connection.close()
    if response.status != 200 or not text.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError(f"stream failed: {response.status} {text[-200:]!r}")
    return text.count(b"data: ")


def _wait_streaming(port: int, model: str, deadline: float) -> None:
    """Until the server streams (the bare proxy has no readiness endpoint)."""
    while time.monotonic() < deadline:
        try:
            _stream(port, model, False)
            return
        except (OSError, RuntimeError, http.client.HTTPException):
            time.sleep(0.5)
    raise RuntimeError("the server did not start streaming")


def _collected(pid: int, out: Path) -> int:
    """Instructions collected since the counters were zeroed: a dump's summary."""
    before = set(out.parent.glob(out.name + ".*"))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in set(out.parent.glob(out.name + ".*")) - before:
            match = _TOTAL.search(dump.read_text(errors="replace"))
            if match is not None:
                return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def _measure(pid: int, out: Path, port: int, model: str, streams: int, usage: bool) -> float:
    """Instructions per stream of ``model``, collected over ``streams``."""
    subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    for _ in range(streams):
        _stream(port, model, usage)
    total = _collected(pid, out)
    subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
    return total / streams


class _Run:
    """One server under callgrind: started, warmed up, measured, stopped."""

    def __init__(
        self,
        command: list[str],
        port: int,
        model: str,
        streams: int,
        usage: bool,
        tmp: Path,
        keep: Path | None,
    ) -> None:
        self.command, self.port, self.model = command, port, model
        self.streams, self.usage, self.tmp, self.keep = streams, usage, tmp, keep

    def instructions_per_stream(self) -> float:
        out = self.tmp / f"callgrind-{self.model}-{time.monotonic_ns()}.out"
        server = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                *self.command,
            ],
            stderr=subprocess.DEVNULL,
            # The ledger (with --accounting) in the run's directory, never the user's.
            env={**os.environ, "PYTHONHASHSEED": "0", "XDG_DATA_HOME": str(self.tmp)},
        )
        try:
            _wait_streaming(self.port, self.model, time.monotonic() + 400)
            for _ in range(5):  # warm-up: imports, first-use caches
                _stream(self.port, self.model, self.usage)
            result = _measure(server.pid, out, self.port, self.model, self.streams, self.usage)
            if self.keep is not None:
                last = max(out.parent.glob(out.name + ".*"), key=lambda p: p.stat().st_mtime)
                self.keep.write_bytes(last.read_bytes())
            return result
        finally:
            server.terminate()
            server.wait(120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--short", type=int, default=4, help="content chunks, short streams")
    parser.add_argument("--long", type=int, default=64, help="content chunks, long streams")
    parser.add_argument("--usage", action="store_true", help="ask for include_usage")
    parser.add_argument(
        "--together",
        action="store_true",
        help="the upstream writes a stream's chunks at once (default: --gap-ms apart)",
    )
    parser.add_argument(
        "--bare", action="store_true", help="measure loadtests/bare_proxy.py instead (the floor)"
    )
    parser.add_argument(
        "--raw-asgi",
        action="store_true",
        help="with --bare: the floor sends each read straight to ASGI send (no Litestar Stream)",
    )
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=20.0,
        help="between chunks upstream: long enough that each is read alone under valgrind",
    )
    parser.add_argument(
        "--client",
        choices=("own", "aiohttp"),
        default="own",
        help="the relay's upstream client (backends' stream_client)",
    )
    parser.add_argument(
        "--accounting",
        action="store_true",
        help="leave accounting on (its key poll is counted per unit of time)",
    )
    parser.add_argument("--keep", type=Path, help="copy the long streams' dump here")
    parser.add_argument(
        "--keep-short", type=Path, help="copy the short streams' dump here (mostly set-up)"
    )
    parser.add_argument("--config-extra", default="", help="TOML appended to the config")
    args = parser.parse_args(argv)
    python = sys.executable
    short_port, long_port, port = _free_port(), _free_port(), _free_port()
    fakes = [
        subprocess.Popen(
            [
                python,
                str(HERE / "fake_upstream.py"),
                *("--port", str(p), "--chunks", str(n), "--chunk-delay-ms", str(args.gap_ms)),
            ],
            stdout=subprocess.DEVNULL,
        )
        for p, n in ((short_port, args.short), (long_port, args.long))
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "nomoat.toml"
            engine_model = "fake-model" if args.together else "fake-slow-model"
            config.write_text(
                _config(
                    short_port,
                    long_port,
                    port,
                    args.config_extra,
                    engine_model,
                    args.client,
                    accounting=args.accounting,
                )
            )
            results = []
            for name, upstream_port in (("short", short_port), ("long", long_port)):
                if args.bare:
                    command = [
                        python,
                        str(HERE / "bare_proxy.py"),
                        *("--upstream", f"http://127.0.0.1:{upstream_port}", "--port", str(port)),
                        *(["--raw-asgi"] if args.raw_asgi else []),
                    ]
                    model = engine_model
                else:
                    command = [python, "-m", "gateway.cli", "serve", "--config", str(config)]
                    model = name
                keep = args.keep if name == "long" else args.keep_short
                run = _Run(command, port, model, args.streams, args.usage, Path(tmp), keep)
                results.append(run.instructions_per_stream())
            short, long = results
    finally:
        for fake in fakes:
            fake.terminate()
            fake.wait(10)
    per_chunk = (long - short) / (args.long - args.short)
    print(
        f"instructions per stream: {args.short} chunks {short:,.0f}, {args.long} chunks {long:,.0f}"
    )
    print(f"instructions per chunk: {per_chunk:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
