"""``nomoat``: serve, run an edge node, check a config, hash an API key, check
the engine, list plugins, explain and replay routing decisions."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import BaseModel, ValidationError

from gateway import explain
from gateway.accounting.cli import add_commands as add_key_commands
from gateway.accounting.commands import add_commands as add_accounting_commands
from gateway.accounting.gating import config_refusal
from gateway.accounting.keys import managed_keys_exist
from gateway.app import Runtime, create_app, handle_exception, shed_recorder
from gateway.auth import hash_api_key, is_loopback
from gateway.catalog import Plan, plan
from gateway.collector import QuietCollector
from gateway.connections import ConnectionGuard, HttpLimits, fit_file_limit, protocol_class
from gateway.decision_log import LogFormatError, read_log
from gateway.direct_routes import DirectRoutes
from gateway.listener import Listener
from gateway.registry import PluginLoadError, Registry, discover
from gateway.replay import replay
from gateway.settings import (
    ConfigError,
    ServerSettings,
    Settings,
    load_settings,
    validation_problems,
)
from gateway.shedding import RequestShedder
from gateway.telemetry.setup import problems as telemetry_problems
from gateway.workers import embedded_refusal, listening_socket, run_workers

DEFAULT_ADMIN_KEY_ENV = "NOMOAT_ADMIN_KEY"


def check(path: Path | None) -> tuple[Settings | None, list[str]]:
    """Both validation phases; every problem, each by its path."""
    try:
        settings = load_settings(path)
    except ConfigError as error:
        return None, error.problems
    try:
        plan(settings, discover(settings.plugins.disabled))
    except (ConfigError, PluginLoadError) as error:
        return settings, _problems(error)
    return settings, []


_log = logging.getLogger("gateway.cli")


def _problems(error: ConfigError | PluginLoadError) -> list[str]:
    return error.problems if isinstance(error, ConfigError) else [str(error)]


class _Server(uvicorn.Server):
    """uvicorn, telling the runtime when shutdown starts so /ready says so, and
    running full garbage collections when the gateway is quiet."""

    def __init__(
        self, config: uvicorn.Config, runtime: Runtime, collector: QuietCollector | None = None
    ) -> None:
        super().__init__(config)
        self._runtime = runtime
        self._collector = collector
        self._collecting: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (the lifespan) with no server of its own: the
        gateway's :class:`Listener` accepts on ``sockets`` instead."""
        if sockets is None:
            raise ValueError("the gateway's server is given its listening sockets")
        await super().startup(sockets=[])
        loop = asyncio.get_running_loop()
        self.servers = [Listener(loop, sock, self._protocol) for sock in sockets]  # type: ignore[misc]
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            _log.info("serving on http://%s:%d", f"[{host}]" if ":" in host else host, port)
        if self._collector is not None:
            self._collecting = loop.create_task(self._collector.run())

    def _protocol(self) -> asyncio.Protocol:
        """A connection's protocol, made as uvicorn's own server makes it."""
        config = self.config
        protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=self.server_state, app_state=self.lifespan.state
        )
        return protocol

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._collecting is not None:
            self._collecting.cancel()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        self._runtime.draining = True
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


def _with_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    """Command-line flags win over the file and the environment."""
    flags = {
        "host": args.host,
        "port": args.port,
        "allow_unauthenticated_network": args.allow_unauthenticated_network or None,
    }
    update = {key: value for key, value in flags.items() if value is not None}
    return settings.model_copy(update={"server": settings.server.model_copy(update=update)})


def _open_network_refusal(server: ServerSettings) -> str | None:
    if server.api_key_hashes or is_loopback(server.host) or server.allow_unauthenticated_network:
        return None
    return (
        f"nomoat: refusing to listen on {server.host} with no API key configured. "
        "Add server.api_key_hashes (see `nomoat hash-key`) or a managed key (`nomoat keys "
        "create`), or pass "
        "--allow-unauthenticated-network if an open gateway is intended."
    )


def serve(args: argparse.Namespace) -> int:
    try:
        settings = _with_overrides(load_settings(args.config), args)
    except ConfigError as error:
        print(f"nomoat: configuration error:\n{error}", file=sys.stderr)
        return 2
    return _run(settings, workers=args.workers)


def edge(args: argparse.Namespace) -> int:
    """An edge node: one llama.cpp engine behind the same OpenAI API, with its
    queue and busy slots on /metrics for the gateways that route to it."""
    options: dict[str, object] = {
        "type": "llamacpp",
        "model_name": args.name,
        "parallel": args.parallel,
        "threads": args.threads,
        "max_waiting": args.max_waiting,
        # An edge node's client is usually one gateway, with one key for all
        # its users: a per-key share would cap that gateway (its own engine
        # limits each user's key).
        "max_per_key": args.max_per_key,
        # Only gateways reach an edge node: it keeps their tenants apart.
        "trust_tenant_header": True,
    }
    if args.model is not None:
        options["model_path"] = str(args.model)
    # Embeddings: the embedding model's, else the chat model's pooled ones.
    models: dict[str, object] = {
        args.name: {
            "deployments": [{"backend": "engine", "model": args.name}],
            "capabilities": ["chat"] if args.embedding_model else ["chat", "embeddings"],
        }
    }
    if args.embedding_model is not None:
        options["embedding_model_path"] = str(args.embedding_model)
        options["embedding_model_name"] = args.embedding_name
        models[args.embedding_name] = {
            "deployments": [{"backend": "engine", "model": args.embedding_name}],
            "capabilities": ["embeddings"],
        }
    data = {
        "server": {
            "host": args.host or "127.0.0.1",
            "port": args.port or 8100,
            "api_key_hashes": args.api_key_hash,
            "admin_key_hashes": args.admin_key_hash,
            "allow_unauthenticated_network": args.allow_unauthenticated_network,
        },
        "lora": {"root": args.adapter_root},
        # The gateways in front of it keep the ledger (and the keys, limits
        # and budgets): a node has no database of its own. It tells them each
        # answer's busy time on its engine, for its usd_per_hour there.
        "accounting": {
            "enabled": False,
            "report_busy_seconds": True,
            "report_cut_usage": True,
        },
        "backends": {"engine": options},
        "models": models,
    }
    try:
        settings = Settings(**data)  # type: ignore[arg-type]
    except ValidationError as error:
        print(f"nomoat edge: {error}", file=sys.stderr)
        return 2
    return _run(settings)


def _run(settings: Settings, workers: int = 1) -> int:
    try:
        startup_plan = plan(settings, discover(settings.plugins.disabled))
    except (ConfigError, PluginLoadError) as error:
        print(f"nomoat: configuration error:\n{error}", file=sys.stderr)
        return 2
    telemetry = telemetry_problems(settings.telemetry)
    if telemetry:
        print("nomoat: configuration error:\n" + "\n".join(telemetry), file=sys.stderr)
        return 2
    server = settings.server
    refusal = _open_network_refusal(server)
    # Managed keys (`nomoat keys create`) protect a network gateway as well.
    if refusal is not None and managed_keys_exist(settings.accounting):
        refusal = None
    refusal = (
        refusal
        or embedded_refusal(
            {name: backend.type for name, backend in settings.backends.items()}, workers
        )
        or config_refusal(settings, workers)
    )
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    logging.basicConfig(
        level=server.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    if workers <= 1:
        return _serve(settings, startup_plan)
    sock = listening_socket(server.host, server.port)
    return run_workers(
        workers, sock, lambda index: _serve(settings, startup_plan, (index, workers), sock)
    )


def _serve(
    settings: Settings,
    startup_plan: Plan,
    worker: tuple[int, int] = (0, 1),
    sock: socket.socket | None = None,
) -> int:
    """One server process: the only one, or worker ``worker[0]`` of ``worker[1]``."""
    server = settings.server
    index, workers = worker
    if workers > 1 and server.decision_log is not None:
        # One file per worker: lines of several processes would interleave.
        log_path = server.decision_log
        log_path = log_path.with_name(f"{log_path.stem}.worker{index}{log_path.suffix}")
        server = server.model_copy(update={"decision_log": log_path})
        settings = settings.model_copy(update={"server": server})
    runtime = Runtime(settings, startup_plan, worker=index, workers=workers)
    limits = settings.limits
    # Connections and requests are bounded before the app sees them, and
    # shed with 503 + Retry-After past the bounds (gateway/connections.py,
    # gateway/shedding.py); uvicorn's limit_concurrency is not used: it
    # counts idle connections too, so they would shed /health.
    max_connections = fit_file_limit(limits.max_connections)
    guard = ConnectionGuard(HttpLimits.from_settings(limits, max_connections))
    app = create_app(runtime)
    # The collector reads the shedder's count, the shedder tells the collector
    # when it crosses its marks: the lambda reads ``shedder`` once it exists.
    collector = (
        QuietCollector(
            lambda: shedder.in_progress,
            server.full_collection_max_seconds,
            suspend_at=server.collection_suspend_requests,
        )
        if server.full_collection_max_seconds > 0
        else None
    )
    shedder = RequestShedder(
        DirectRoutes(app, handle_exception),
        limits.max_requests,
        shed_recorder(runtime, app),
        collector,
    )
    config = uvicorn.Config(
        shedder,
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=protocol_class(guard),
        lifespan="on",
        timeout_graceful_shutdown=int(server.shutdown_grace_seconds),
        log_level=server.log_level,
        access_log=False,
        # uvicorn's X-Forwarded-For/-Proto middleware would only rewrite the
        # scope's client address and scheme, which nomoat reads nowhere (the
        # headers stay in the request for any hook); it walked every
        # request's headers (docs/benchmarks.md, "Streaming at scale").
        proxy_headers=False,
    )
    # uvicorn re-raises the signal that stopped it once shutdown is complete;
    # by then SIGTERM has been handled (the server drained), so exit 0.
    signal.signal(signal.SIGTERM, _drained)
    if sock is None:
        sock = listening_socket(server.host, server.port)
    _Server(config, runtime, collector).run(sockets=[sock])
    return 0


def _drained(sig: int, frame: FrameType | None) -> None:
    """SIGTERM once uvicorn has shut down: nothing is left to stop."""


def check_config(args: argparse.Namespace) -> int:
    _, problems = check(args.file)
    if problems:
        print(f"{args.file}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0


def hash_key(args: argparse.Namespace) -> int:
    key = args.key if args.key is not None else getpass.getpass("API key: ")
    if len(key) < 16:
        print("nomoat: an API key needs at least 16 characters", file=sys.stderr)
        return 2
    print(hash_api_key(key))
    return 0


def doctor(args: argparse.Namespace) -> int:
    from gateway.backends.llamacpp import embedded_model_path, smoke_test

    path = args.model or embedded_model_path()
    if not path.is_file():
        print(f"nomoat doctor: no such file: {path}", file=sys.stderr)
        return 1
    try:
        smoke_test(path)
    except RuntimeError as error:
        print(f"nomoat doctor: {error}", file=sys.stderr)
        return 1
    print(f"nomoat doctor: llama.cpp decodes {path.name} on this CPU")
    return 0


def _load_plan(path: Path | None) -> tuple[Settings, Registry, Plan] | None:
    try:
        settings = load_settings(path)
        registry = discover(settings.plugins.disabled)
        return settings, registry, plan(settings, registry)
    except (ConfigError, PluginLoadError) as error:
        print(f"nomoat: configuration error:\n{error}", file=sys.stderr)
        return None


def plugins(args: argparse.Namespace) -> int:
    loaded = _load_plan(args.config)
    if loaded is None:
        return 2
    settings, registry, _ = loaded
    print(f"{'plugin':<16} {'kind':<8} {'component':<16} used by this config")
    for manifest in registry.plugins:
        for kind, names in (
            ("backend", manifest.backends),
            ("policy", manifest.policies),
            ("hook", manifest.hooks),
        ):
            for name in names:
                users = _users(settings, kind, name)
                used = ", ".join(users) if users else "-"
                print(f"{manifest.name:<16} {kind:<8} {name:<16} {used}")
    return 0


def _users(settings: Settings, kind: str, name: str) -> list[str]:
    if kind == "backend":
        return [f"backends.{b}" for b, spec in settings.backends.items() if spec.type == name]
    if kind == "policy":
        return [f"models.{m}" for m, spec in settings.models.items() if spec.policy == name]
    return [f"hooks[{i}]" for i, hook in enumerate(settings.hooks) if hook.type == name]


def route(args: argparse.Namespace) -> int:
    """Dry-run on a running gateway: its rules, health, cooldowns, live stats
    and each policy's ranking for a request; nothing reaches an engine."""
    admin_key = os.environ.get(args.admin_key_env)
    if admin_key is None and args.admin_key_env != DEFAULT_ADMIN_KEY_ENV:
        print(f"nomoat route: ${args.admin_key_env} is not set", file=sys.stderr)
        return 2
    try:
        headers = dict(_header(text) for text in args.header)
        decision = explain.ask(
            args.url,
            args.model,
            message=args.message,
            headers=headers,
            api_key_id=args.api_key_id,
            admin_key=admin_key,
        )
    except (ValueError, explain.ExplainError) as error:
        hint = ""
        if isinstance(error, explain.ExplainError) and error.status in (401, 403):
            hint = f" (${args.admin_key_env} must hold an admin key)"
        print(f"nomoat route: {error}{hint}", file=sys.stderr)
        return 1
    print(explain.table(decision))
    return 0


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise ValueError(f'--header takes "NAME: VALUE", not "{text}"')
    return name.strip().lower(), value.strip()


def replay_log(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        registry = discover(settings.plugins.disabled)
    except (ConfigError, PluginLoadError) as error:
        print(f"nomoat: configuration error:\n{error}", file=sys.stderr)
        return 2
    policy_type = registry.policies.get(args.policy)
    if policy_type is None:
        known = ", ".join(sorted(registry.policies))
        print(f'nomoat replay: unknown policy "{args.policy}" (known: {known})', file=sys.stderr)
        return 2
    try:
        options = policy_type.config_model.model_validate(_policy_options(args))
    except ValueError as error:  # pydantic's ValidationError is one
        print(
            f"nomoat replay: {_options_problem(args.policy, policy_type.config_model, error)}",
            file=sys.stderr,
        )
        return 2
    try:
        decisions = read_log(args.log)
    except (OSError, LogFormatError) as error:
        print(f"nomoat replay: {error}", file=sys.stderr)
        return 2
    report = replay(decisions, lambda: policy_type.factory(options), args.model)
    print(report.summary())
    return 0


def _policy_options(args: argparse.Namespace) -> dict[str, object]:
    """``--options-json`` first, then each ``--option KEY=VALUE`` (the value
    read as JSON where it is JSON: 3, 2.5, true, null; else as a string)."""
    options: dict[str, object] = {}
    if args.options_json is not None:
        try:
            parsed = json.loads(args.options_json)
        except ValueError as error:
            raise ValueError(f"--options-json is not JSON: {error}") from None
        if not isinstance(parsed, dict):
            raise ValueError("--options-json takes a JSON object")
        options.update(parsed)
    for item in args.option:
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f'--option takes KEY=VALUE, not "{item}"')
        try:
            options[key.strip()] = json.loads(text)
        except ValueError:
            options[key.strip()] = text
    return options


def _options_problem(policy: str, model: type[BaseModel], error: ValueError) -> str:
    if not isinstance(error, ValidationError):
        return str(error)
    problems = "; ".join(validation_problems(error))
    known = ", ".join(model.model_fields) or "none"
    return f"invalid options for policy {policy}: {problems} (its options: {known})"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="nomoat", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    run = commands.add_parser("serve", help="run the gateway")
    run.add_argument("--config", type=Path, help="TOML file (default: embedded model only)")
    run.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="port (default 8000)")
    run.add_argument(
        "--allow-unauthenticated-network",
        action="store_true",
        help="listen beyond loopback even with no API key configured",
    )
    run.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="processes serving the port, each a whole gateway (default 1; not with the "
        "embedded engine; see gateway/workers.py)",
    )
    run.set_defaults(handler=serve)

    node = commands.add_parser("edge", help="run an edge node: one llama.cpp engine")
    node.add_argument("--model", type=Path, help="a GGUF file (default: the embedded model)")
    node.add_argument("--name", default="smollm2-135m-instruct", help="the model's name")
    node.add_argument(
        "--embedding-model",
        type=Path,
        help="an embedding model's GGUF (default: the model's own pooled embeddings)",
    )
    node.add_argument("--embedding-name", default="embedding", help="the embedding model's name")
    node.add_argument("--parallel", type=int, default=4, help="requests batched at once")
    node.add_argument("--threads", type=int, default=0, help="CPU threads (0: one per core)")
    node.add_argument("--max-waiting", type=int, default=16, help="queued requests before 503")
    node.add_argument(
        "--max-per-key",
        type=int,
        default=0,
        help="generations one API key may hold, waiting and running (0: no limit)",
    )
    node.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    node.add_argument("--port", type=int, help="port (default 8100)")
    node.add_argument(
        "--api-key-hash", action="append", default=[], help="a key hash (nomoat hash-key)"
    )
    node.add_argument(
        "--admin-key-hash", action="append", default=[], help="an admin key hash (adapters)"
    )
    node.add_argument(
        "--adapter-root",
        type=Path,
        help="where LoRA adapters live (shared with the gateway); unset: no adapters",
    )
    node.add_argument("--allow-unauthenticated-network", action="store_true")
    node.set_defaults(handler=edge)

    validate = commands.add_parser("check-config", help="report every problem in a config")
    validate.add_argument("file", type=Path)
    validate.set_defaults(handler=check_config)

    hashing = commands.add_parser("hash-key", help="print the hash to put in api_key_hashes")
    hashing.add_argument("key", nargs="?", help="the key (prompted for if omitted)")
    hashing.set_defaults(handler=hash_key)

    health = commands.add_parser("doctor", help="check that llama.cpp decodes on this CPU")
    health.add_argument("--model", type=Path, help="a GGUF file (default: the embedded model)")
    health.set_defaults(handler=doctor)
    listing = commands.add_parser("plugins", help="installed plugins and what the config uses")
    listing.add_argument("--config", type=Path)
    listing.set_defaults(handler=plugins)

    dry = commands.add_parser(
        "route", help="dry-run a request on a running gateway: how it would be routed now"
    )
    dry.add_argument(
        "--explain", action="store_true", help="print rules, health, stats, scores and reasons"
    )
    dry.add_argument("--model", required=True)
    dry.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway's address")
    dry.add_argument(
        "--admin-key-env",
        default=DEFAULT_ADMIN_KEY_ENV,
        help=f"variable holding an admin key (default {DEFAULT_ADMIN_KEY_ENV})",
    )
    dry.add_argument("--message", help="a user message to route (rules match its size)")
    dry.add_argument(
        "--header", action="append", default=[], help='a request header to simulate, "NAME: VALUE"'
    )
    dry.add_argument("--api-key-id", help="the API key fingerprint to simulate (rules by key)")
    dry.set_defaults(handler=route)

    rerun = commands.add_parser("replay", help="replay a decision log against a policy")
    rerun.add_argument("log", type=Path, help="a server.decision_log file")
    rerun.add_argument("--policy", required=True)
    rerun.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy option (repeatable), checked like policy_options in the config",
    )
    rerun.add_argument("--options-json", help="the policy options as one JSON object")
    rerun.add_argument("--model", help="replay only this model's policy calls")
    rerun.add_argument("--config", type=Path, help="for plugins.disabled")
    rerun.set_defaults(handler=replay_log)
    add_key_commands(commands)
    add_accounting_commands(commands)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
