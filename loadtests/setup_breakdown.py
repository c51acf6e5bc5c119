"""Where a relayed stream's set-up instructions go, stretch by stretch.

A copy of ``gateway/`` gets a mark at each point of ``POINTS`` (a call to
``CALLGRIND_DUMP_STATS_AT`` through a three-line C library loaded with
``ctypes``); ``nomoat serve`` runs that copy under callgrind in front of a
fake upstream (``loadtests/fake_upstream.py``: 4 content chunks 20 ms apart)
and serves ``--streams`` streams one after the other, so the instructions
between two consecutive marks are what that stretch of one stream's path
costs, event loop included. Each mark adds about 4,000 instructions of its
own. A point whose anchor is no longer in the code is reported and skipped:
the anchors are lines of the code as it was measured (docs/benchmarks.md,
"Streaming at scale", session 6).

    .venv/bin/python loadtests/setup_breakdown.py --streams 6

Needs valgrind (with ``valgrind/callgrind.h``) and a C compiler. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import chunk_instructions as ci  # noqa: E402

_MARK_C = """#include <valgrind/callgrind.h>
void mark(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""
_MARK_PY = """import ctypes
_mark = ctypes.CDLL({library!r}).mark
_mark.argtypes = [ctypes.c_char_p]
_labels = {{}}
def mark(label):
    encoded = _labels.get(label)
    if encoded is None:
        encoded = _labels[label] = label.encode()
    _mark(encoded)
"""
_OBSERVER_CLOSE = "self._observer.close(self._exchange, status, error)"
_RELAY_CALL = "return await opened(endpoint.relay(backend, asked, target, c, relay), relay)"
# (file, stretch name, mark "before" or "after" the anchor, its lines).
_POINTS = [
    ("gateway/connections.py", "01 after the answer: uvicorn's end, until the client closes",
     "after", "    def connection_lost(self, exc: Exception | None) -> None:"),
    ("gateway/connections.py", "02 the close, until the next connection", "after",
     "    def connection_made(self, transport: asyncio.Transport) -> None:"
     "  # type: ignore[override]"),
    ("gateway/shedding.py", "03 uvicorn: accept, parse, the request's task", "after",
     "    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:"),
    ("gateway/handling.py", "04 in front of the handler (direct routes or Litestar)", "before",
     '        request_id = accepted_request_id(request.scope["headers"])'),
    ("gateway/handling.py", "05 exchange opened, key checked, context", "after",
     "            call = Call(request, request_id, span, exchange, principal, ctx)"),
    ("gateway/app.py", "06 body read", "before", "        body = endpoint.decode(raw, limits)"),
    ("gateway/handling.py", "07 decode, admission, trace, first hang-up watch", "after",
     "    hang_up = HangUp(request.receive, request.scope)"),
    ("gateway/pipeline.py", "08 pipeline: hooks, route, context", "before",
     "        limit = route.entry.stream_timeout_seconds",
     "        include_usage = _wants_usage(asked)"),
    ("gateway/pipeline.py", "09 ranking", "before",
     "        decision = self.decisions.start(request, ctx, first)"),
    ("gateway/pipeline.py", "10 decision", "after",
     "        decision = self.decisions.start(request, ctx, first)"),
    ("gateway/pipeline.py", "11 attempt, ChunkRelay", "before", "                " + _RELAY_CALL),
    ("gateway/backends/relay_stream.py", "12 backend: request bytes, slot", "before",
     "        for attempt in range(2):"),
    ("gateway/backends/relay_stream.py", "13 pool, request written, idle watch", "after",
     "            watch = self._watch = _IdleWatch(connection, self._first_token, self.name)"),
    ("gateway/backends/relay_stream.py", "14 waiting for the status, head parsed", "before",
     "            status = connection.status"),
    ("gateway/backends/relay_stream.py", "15 first events (typed first chunk)", "after",
     "            connection.begin_relay()"),
    ("gateway/pipeline.py", "16 attempt settled", "before",
     "        result = started.result", "        if isinstance(result, Relayed):"),
    ("gateway/app.py", "17 back to the handler", "before",
     "            if isinstance(stream, Relayed):"),
    ("gateway/relay_response.py", "18 answer built, handed to the server", "before",
     "        stream = self._stream", "        span = self._span"),
    ("gateway/relay_response.py", "19 response start, first send", "before",
     "            hang_up = HangUp(receive, scope)"),
    ("gateway/relay_response.py", "20 second hang-up watch", "after",
     "            hang_up = HangUp(receive, scope)"),
    ("gateway/relay_response.py", "21 the chunks, [DONE], connection back to the pool", "before",
     "            if failure is not None:", "                error = error_type(failure)"),
    ("gateway/relay_response.py", "22 last send, relay's listeners", "before",
     "                " + _OBSERVER_CLOSE),
    ("gateway/relay_response.py", "23 observer's close", "after",
     "                " + _OBSERVER_CLOSE),
]  # fmt: skip
POINTS = [(path, "".join(f"{line}\n" for line in lines), label, where)
          for path, label, where, *lines in _POINTS]  # fmt: skip


def _marked(source: Path, into: Path) -> None:
    """A copy of ``source``'s gateway with a mark at each point."""
    shutil.copytree(source / "gateway", into / "gateway")
    shutil.copytree(source / "plugins", into / "plugins")
    by_file: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for path, anchor, label, where in POINTS:
        by_file[path].append((anchor, label, where))
    for path, points in by_file.items():
        file = into / path
        text = file.read_text()
        for anchor, label, where in points:
            if text.count(anchor) != 1:
                print(f"skipped (anchor not found once): {label}")
                continue
            line = anchor.split("\n")[-2] if where == "after" else anchor.split("\n")[0]
            indent = line[: len(line) - len(line.lstrip())]
            if where == "after" and line.lstrip().startswith(("def ", "async def ")):
                indent += "    "
            call = f"{indent}mark({label!r})\n"
            text = text.replace(anchor, anchor + call if where == "after" else call + anchor)
        head = "from __future__ import annotations\n"
        text = text.replace(head, head + "from _setup_mark import mark\n", 1)
        file.write_text(text)


def _stretches(directory: Path) -> dict[str, list[int]]:
    """Each stretch's instructions, stream by stream (dumps in order)."""
    dumps = sorted(
        directory.glob("cg.out.*"), key=lambda p: int(p.name.rsplit(".", 1)[1].split("-")[0])
    )
    sequence: list[tuple[str, int]] = []
    for dump in dumps:
        text = dump.read_text(errors="replace")
        total = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
        trigger = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.MULTILINE)
        if total is not None and trigger is not None and int(total.group(1)):
            sequence.append((trigger.group(1), int(total.group(1))))
    starts = [i for i, (label, _) in enumerate(sequence) if label.startswith("03 ")]
    found: dict[str, list[int]] = defaultdict(list)
    # Whole streams only: from the second start to the last.
    for label, count in sequence[starts[1] : starts[-1]]:
        found[label].append(count)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=6)
    args = parser.parse_args(argv)
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "mark.c").write_text(_MARK_C)
        library = work / "libmark.so"
        subprocess.run(
            ["gcc", "-O2", "-shared", "-fPIC", "-o", library, work / "mark.c"], check=True
        )
        (work / "_setup_mark.py").write_text(_MARK_PY.format(library=str(library)))
        _marked(HERE.parent, work / "code")
        upstream, port = ci._free_port(), ci._free_port()
        fake = subprocess.Popen(
            [python, str(HERE / "fake_upstream.py"), "--port", str(upstream), "--chunks", "4"],
            stdout=subprocess.DEVNULL,
        )
        config = work / "nomoat.toml"
        config.write_text(
            ci._config(upstream, upstream, port, "", "fake-slow-model", "own", accounting=False)
        )
        env = {
            **os.environ,
            "PYTHONPATH": f"{work / 'code'}:{work}",
            "PYTHONHASHSEED": "0",
            "XDG_DATA_HOME": str(work),
        }
        server = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={work / 'cg.out'}",
                *(python, "-m", "gateway.cli", "serve", "--config", str(config)),
            ],
            env=env,
            stderr=subprocess.DEVNULL,
            # Not the checkout's directory: ``-m`` would import its gateway.
            cwd=work,
        )
        try:
            ci._wait_streaming(port, "short", time.monotonic() + 400)
            for _ in range(5):  # warm-up
                ci._stream(port, "short", False)
            control = ["callgrind_control", "-i", "on", str(server.pid)]
            subprocess.run(control, check=True, capture_output=True)
            for _ in range(args.streams + 2):
                ci._stream(port, "short", False)
            time.sleep(2)
        finally:
            server.terminate()
            server.wait(120)
            fake.terminate()
            fake.wait(10)
        found = _stretches(work)
    streams = min(len(counts) for counts in found.values())
    total = sum(sum(counts[:streams]) for counts in found.values()) / streams
    print(f"{streams} streams of 4 chunks, {total:,.0f} instructions each (marks included)")
    for label in sorted(found):
        print(f"{label:60s} {sum(found[label][:streams]) / streams:>10,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
