"""Instructions the nomoat server executes per request (callgrind), for one
configuration: sequential JSON chats, then sequential streamed chats, in front
of the benchmark's fake upstream, after a warm-up. Unlike time on a shared
VM, the count repeats to within about 1 %, so configurations a few percent
apart can be told apart (telemetry off and on, issue 12).

    .venv/bin/python loadtests/instructions_per_request.py --name off \\
        --config-extra '[metrics]\\nenabled = false' [--env OTEL_...=...] [--requests 200]

With tracing, count the span export too: ``--requests 512 --settle 3 --env
OTEL_BSP_SCHEDULE_DELAY=600000`` (full batches of 512 spans only, as under
load; docs/benchmarks.md, "Telemetry overhead").

Needs valgrind (Debian: apt-get install -y valgrind). The server starts under
callgrind with instrumentation off (a minute or more), which is switched on
only around the measured requests.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_overhead as bench  # noqa: E402


def total_instructions(out: Path) -> int:
    """The ``totals:`` line of a callgrind dump (its ``summary:`` may be 0)."""
    found = re.findall(r"^totals: (\d+)", out.read_text(), re.MULTILINE)
    if not found:
        raise RuntimeError(f"no totals in {out}")
    return int(found[-1])


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def measured(
    pid: int, port: int, out_dir: Path, label: str, stream: bool, requests: int, settle: float
) -> float:
    body = bench.body_bytes(stream=stream)
    headers = bench.auth_headers()
    client = bench.RawClient(port, 120)
    try:
        for _ in range(20):
            client.request("POST", "/v1/chat/completions", body, headers)
    finally:
        client.close()
    # With tracing: the warm-up's spans exported before the count starts,
    # and the counted requests' spans within it (the batch processor
    # exports every 5 s), so the export is counted, and only once. (A new
    # connection after the pause: the server closes idle ones after 5 s.)
    time.sleep(settle)
    client = bench.RawClient(port, 120)
    try:
        before = set(out_dir.glob("callgrind.out*"))
        control(pid, "-z")
        control(pid, "-i", "on")
        for _ in range(requests):
            status, _, _, _ = client.request("POST", "/v1/chat/completions", body, headers)
            if status != 200:
                raise RuntimeError(f"{label}: status {status}")
        time.sleep(settle)
        control(pid, "-i", "off")
        control(pid, "-d", label)
        time.sleep(1)
    finally:
        client.close()
    dumps = sorted(set(out_dir.glob("callgrind.out*")) - before, key=lambda p: p.stat().st_mtime)
    return total_instructions(dumps[-1]) / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--config-extra", default="", help="TOML (\\n for new lines)")
    parser.add_argument("--env", action="append", default=[], metavar="VAR=VALUE")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds idle before and after the counted requests (tracing: 8, so "
        "the batch exporter's work on their spans is counted)",
    )
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"nomoat-instr-{args.name}-"))
    upstream = [bench.free_port(), bench.free_port()]
    port = bench.free_port()
    try:
        bench.start_fake("fake", upstream, work, None, 0.0)
        config = work / "nomoat.toml"
        config.write_text(
            bench.nomoat_config(port, upstream, args.config_extra.replace("\\n", "\n"))
        )
        # The ledger (accounting) in the run's directory, never the user's.
        env = {**os.environ, "XDG_DATA_HOME": str(work)}
        env.update(item.split("=", 1) for item in args.env)
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={work}/callgrind.out",
            args.python,
            "-P",
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(config),
        ]
        proc = bench.start("nomoat", command, work, None, env)
        bench.wait_for_chat(proc, port, bench.auth_headers(), 900)
        pid = proc.pid
        json_ir = measured(pid, port, work, "json", False, args.requests, args.settle)
        stream_ir = measured(pid, port, work, "stream", True, args.requests, args.settle)
        per_request = f"JSON {json_ir / 1e6:.3f}M, stream {stream_ir / 1e6:.3f}M"
        print(f"{args.name}: {per_request} instructions/request")
    finally:
        bench.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
