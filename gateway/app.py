"""Assembles the Litestar application once, at start-up.

The :class:`Runtime` owns everything that lives as long as the server (the
backends, the pipeline) and closes it through one exit stack at shutdown.
Handlers are closures over the runtime: no globals, nothing looked up by name.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.resources
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.types import ASGIApp, ControllerRouterHandler
from prometheus_client import generate_latest

from gateway import wire
from gateway.access_log import AccessLog
from gateway.accounting.access import may_see
from gateway.accounting.admin_api import build_key_handlers
from gateway.accounting.admission import Ticket
from gateway.accounting.costing import Costing, start_costing
from gateway.accounting.gating import Admission, start_admission, static_principals
from gateway.accounting.keys import ManagedKeys
from gateway.accounting.principal import Principal
from gateway.accounting.runtime import Accounting
from gateway.accounting.shed import ShedRecorder
from gateway.accounting.usage_api import build_usage_handlers
from gateway.admin import build_admin_handlers
from gateway.auth import AdminAuthenticator, Authenticator, PrincipalAuthenticator, is_loopback
from gateway.catalog import Plan
from gateway.contract import Backend, BackendHealth
from gateway.decision_log import DecisionLog
from gateway.decisions import RouteTrace
from gateway.edge_usage import CutUsage, cut_usage_handlers
from gateway.embeddings.inputs import routing_view
from gateway.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, AnswerT, ChunkT, Endpoint, RequestT
from gateway.errors import (
    GatewayError,
    InternalError,
    NotFoundError,
)
from gateway.exchange import Exchange
from gateway.handling import (
    Call,
    OpenAIRoute,
    as_gateway_error,
    cancel_on_disconnect,
    openai_post,
    read_body,
)
from gateway.hooks import HookChain
from gateway.lora.registry import AdapterRegistry
from gateway.metrics import NoMetrics, PrometheusMetrics, RequestMetrics
from gateway.metrics_otlp import OtlpMetrics, otlp_metrics_wanted
from gateway.metrics_state import CapacityState, DeploymentState, ServerState
from gateway.observer import Ended, Observer, Unobserved, observing
from gateway.openai_responses.handlers import build_response_handlers
from gateway.openai_responses.store import ResponseStore, start_response_store
from gateway.pipeline import Pipeline
from gateway.relay import Relayed
from gateway.relay_response import RelayedEvents
from gateway.responses import EventStream, JsonAnswer
from gateway.settings import ServerSettings, Settings
from gateway.sse import sse_events
from gateway.telemetry.requests import (
    start_tracing,
)
from gateway.telemetry.semconv import provider_name
from gateway.telemetry.setup import new_instance_id, resource
from gateway.telemetry.spans import Tracing

_log = logging.getLogger(__name__)
JSON = "application/json"
# nomoat's own OpenAPI description of its OpenAI endpoints, served as written.
OPENAPI_FILE = importlib.resources.files("gateway") / "openapi" / "openai_endpoints.json"
AnyRequest = Request[Any, Any, State]
T = TypeVar("T")


@dataclass
class Runtime:
    """What the server holds while it runs; filled in by :meth:`start`."""

    settings: Settings
    plan: Plan
    backends: dict[str, Backend] = field(default_factory=dict)
    pipeline: Pipeline | None = None
    draining: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))
    # Which of the `nomoat serve --workers N` processes this is (gateway/workers.py).
    worker: int = 0
    workers: int = 1
    # This process's service.instance.id, on its spans and OTLP metrics alike.
    instance_id: str = field(default_factory=new_instance_id)
    # Traces (None: off). Given by tests; else built at start from [telemetry].
    tracing: Tracing | None = None
    # The request metrics (None: switched off) and what reports to them.
    metrics: PrometheusMetrics | None = field(init=False, default=None)
    observer: Observer = field(init=False)
    # Rate limits and budgets (gateway/accounting/gating.py); None: accounting off.
    admission: Admission | None = field(init=False, default=None)
    # Prices, the cost header, nodes' busy and idle cost (None: accounting off).
    costing: Costing | None = field(init=False, default=None)
    # Cost accounting (None: [accounting] enabled = false); see start_accounting.
    accounting: Accounting | None = field(init=False, default=None)
    # An edge node's usage kept for its gateways (None: not kept).
    cut_usage: CutUsage | None = field(init=False, default=None)
    # Stored Responses (POST /v1/responses), one store for the app; built at start.
    responses: ResponseStore | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.observer = Unobserved()
        if self.settings.accounting.report_cut_usage:
            self.cut_usage = CutUsage()
        if self.settings.metrics.enabled:
            providers = {
                name: provider_name(backend.type)
                for name, backend in self.settings.backends.items()
            }
            self.metrics = PrometheusMetrics(providers)

    async def start_telemetry(self, stack: AsyncExitStack) -> RequestMetrics:
        """The metrics recorder the pipeline reports to, OTLP export and the
        access log started (and stopped with the server)."""
        recorder: RequestMetrics = self.metrics or NoMetrics()
        if self.metrics is not None and otlp_metrics_wanted(self.settings.metrics):
            exporting = OtlpMetrics(
                self.metrics,
                self.settings.metrics.otlp_interval_seconds,
                resource(self.settings.telemetry, self.instance_id),
            )
            # Its last export is a blocking HTTP or gRPC call: off the loop.
            stack.push_async_callback(asyncio.to_thread, exporting.shutdown)
            recorder = exporting
        access_log = None
        if self.settings.access_log.enabled:
            access_log = AccessLog(self.settings.access_log.path)
            access_log.start()
            stack.push_async_callback(access_log.aclose)
        self.observer = observing(
            recorder,
            access_log,
            self.metrics is not None or access_log is not None,
            self._ended(),
        )
        return recorder

    def _ended(self) -> Ended | None:
        """Who hears of each request's end: the ledger, else (an edge node)
        the usage kept for the gateways."""
        if self.accounting is not None:
            return self.accounting.ended
        return self.cut_usage.ended if self.cut_usage is not None else None

    async def start_accounting(self, stack: AsyncExitStack) -> None:
        """The ledger (and what accounting holds) started before the
        backends, so it stops after them: every stream they end at shutdown
        is recorded before the ledger's last flush."""
        if self.settings.accounting.enabled:
            self.accounting = await Accounting.start(self.settings.accounting, stack)

    async def start(self, stack: AsyncExitStack) -> None:
        for warning in exposure_warnings(self.settings.server):
            _log.warning("%s", warning)
        self.tracing = start_tracing(self.settings, self.tracing, stack, self.instance_id)
        await self.start_accounting(stack)
        self.responses = await start_response_store(
            self.settings.responses,
            self.accounting.engine if self.accounting is not None else None,
            stack,
        )
        # After the backends stop (their last usage reports in), before the
        # ledger's last flush: requests still awaiting a report are recorded.
        stack.callback(lambda: self.observer.record_awaiting())
        for item in self.plan.backends:
            backend = await item.backend_type.factory(item.name, item.config)
            stack.push_async_callback(backend.aclose)
            self.backends[item.name] = backend
        server = self.settings.server
        log = None
        if server.decision_log is not None:
            log = DecisionLog(server.decision_log)
            log.start()
            stack.push_async_callback(log.aclose)
        metrics = await self.start_telemetry(stack)
        await self.start_admission(stack)
        self.pipeline = Pipeline(
            self.settings.limits,
            self.plan.catalog,
            self.backends,
            HookChain(self.plan.hooks, metrics.hook_timed if self.metrics else None),
            decision_log=log,
            record_prompts=server.decision_log_prompts,
            adapters=self.plan.adapters,
            metrics=metrics,
        )
        self.costing = await start_costing(
            self.settings,
            self.backends,
            self.observer,
            stack,
            engine=self.accounting.engine if self.accounting is not None else None,
        )
        if self.costing is not None and self.costing.ends_streams:
            # The closing comments (cost, busy time) go before a typed
            # stream's [DONE]; relayed bytes have no place for them.
            self.pipeline.relay_streams = False

    async def start_admission(self, stack: AsyncExitStack) -> None:
        engine = self.accounting.engine if self.accounting is not None else None
        self.admission = await start_admission(
            self.settings, self.plan.catalog, stack, engine, self.workers
        )
        if self.admission is not None:
            # Every request's end settles its ticket: streams are watched.
            self.observer.active = True

    async def admit(
        self,
        principal: Principal | None,
        body: wire.ChatCompletionRequest | wire.CompletionRequest,
        size: int,
        exchange: Exchange,
    ) -> Ticket | None:
        """Rate limits and budget reserved (or 429/503 raised); the ticket
        settles when the exchange closes."""
        admission = self.admission
        if admission is None:
            return None
        ticket = await admission.admit(principal, body, size)
        if ticket is None or ticket.settled:
            return None
        # After the pricer set charged_nano (Observer.close runs it first).
        exchange.finish = ticket.finish
        return ticket

    def managed_keys(self) -> ManagedKeys | None:
        """Managed API keys and teams (None: accounting is off, or not started)."""
        return self.accounting.keys if self.accounting is not None else None

    def response_store(self) -> ResponseStore:
        if self.responses is None:
            raise InternalError("The gateway is still starting.")
        return self.responses

    def serving(self) -> Pipeline:
        if self.pipeline is None:
            raise InternalError("The gateway is still starting.")
        return self.pipeline


def exposure_warnings(server: ServerSettings) -> list[str]:
    """What the operator must hear at start-up about who can reach what."""
    if is_loopback(server.host) or server.api_key_hashes:
        return []
    warnings = [
        f"listening on {server.host} with no API key (allow_unauthenticated_network): anyone "
        "who can reach this address can use every model"
    ]
    if not server.admin_key_hashes:
        warnings.append(
            "the admin API (/admin/...) is closed: beyond loopback it needs server.admin_key_hashes"
        )
    return warnings


def _json(
    payload: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response[bytes]:
    return Response(
        wire.encoder.encode(payload), status_code=status, media_type=JSON, headers=headers
    )


def error_response(error: GatewayError) -> Response[bytes]:
    return _json(error.body(), error.status_code, error.headers)


def handle_exception(request: AnyRequest, exc: Exception) -> Response[bytes]:
    """The one place where every failure becomes an OpenAI-shaped error."""
    return error_response(as_gateway_error(exc, request.url.path))


def _openai_endpoint(
    runtime: Runtime,
    endpoint: Endpoint[RequestT, AnswerT, ChunkT],
    authenticate: PrincipalAuthenticator,
) -> ControllerRouterHandler:
    """The handler of one OpenAI endpoint: read, decode, admit, then the
    pipeline (authentication and every error: :func:`openai_post`)."""
    route_header = runtime.settings.server.route_header
    limits = runtime.settings.limits

    async def work(call: Call) -> ASGIApp:
        request, exchange, span = call.request, call.exchange, call.span
        observer = runtime.observer
        pipeline = runtime.serving()
        raw = await read_body(request, limits.max_body_bytes)
        body = endpoint.decode(raw, limits)
        call.told = body
        exchange.requested, exchange.stream = body.model, bool(body.stream)
        exchange.user = body.user
        call.ticket = await runtime.admit(call.principal, body, len(raw), exchange)
        if span is not None:
            span.set_model(body.model)
        trace = RouteTrace(endpoint.name, len(raw), span, exchange, keep_decision=route_header)
        if body.stream:
            # Watched from now: a client that leaves before the first chunk
            # stops the generation too.
            primed = pipeline.events(endpoint, body, call.ctx, trace)
            stream = await cancel_on_disconnect(request, primed)
            if isinstance(stream, Relayed):
                headers = call.headers(trace, route_header)
                return RelayedEvents(stream, headers, observer, exchange, span)
            watched = stream if span is None else span.watch(stream)
            events = sse_events(observer.watching(watched, exchange))
            if runtime.costing is not None:
                events = runtime.costing.ending(events, exchange)
            return EventStream(events, call.headers(trace, route_header))
        answering = pipeline.answer(endpoint, body, call.ctx, trace)
        answer = await cancel_on_disconnect(request, answering)
        observer.close(exchange, 200, None)
        if span is not None:
            span.sent(answer)
        headers = call.headers(trace, route_header)
        if runtime.costing is not None:
            headers.extend(runtime.costing.answer_headers(exchange))
        return JsonAnswer(wire.encoder.encode(answer), headers=headers)

    route = OpenAIRoute(endpoint.path, endpoint.name, endpoint.id_prefix)
    return openai_post(runtime, route, authenticate, work)


def _embeddings_endpoint(
    runtime: Runtime, authenticate: PrincipalAuthenticator
) -> ControllerRouterHandler:
    """``POST /v1/embeddings``: one JSON answer (embeddings never stream)."""
    limits = runtime.settings.limits

    async def work(call: Call) -> ASGIApp:
        pipeline = runtime.serving()
        raw = await read_body(call.request, limits.max_body_bytes)
        body = EMBEDDINGS.decode(raw, limits)
        exchange = call.exchange
        exchange.requested, exchange.user = body.model, body.user
        # call.told stays None: the error hooks' contract has no embeddings request.
        call.ticket = await runtime.admit(call.principal, routing_view(body), len(raw), exchange)
        if call.span is not None:
            call.span.set_model(body.model)
        trace = RouteTrace(EMBEDDINGS.name, len(raw), call.span, exchange)
        embedding = pipeline.embed(body, call.ctx, trace)
        answer = await cancel_on_disconnect(call.request, embedding)
        runtime.observer.close(exchange, 200, None)
        headers = call.headers()
        if runtime.costing is not None:
            headers.extend(runtime.costing.answer_headers(exchange))
        return JsonAnswer(wire.encoder.encode(answer), headers=headers)

    route = OpenAIRoute(EMBEDDINGS.path, EMBEDDINGS.name, EMBEDDINGS.id_prefix)
    return openai_post(runtime, route, authenticate, work)


def build_handlers(runtime: Runtime) -> list[ControllerRouterHandler]:
    server = runtime.settings.server
    authenticate = PrincipalAuthenticator(
        server.api_key_hashes, runtime.managed_keys, static_principals(runtime.settings)
    )

    @get("/v1/models")
    async def list_models(request: AnyRequest) -> Response[bytes]:
        principal = authenticate.principal(request)
        return _json(wire.ModelList(object="list", data=_models_for(runtime, principal)))

    @get("/v1/models/{model_id:path}")
    async def retrieve_model(request: AnyRequest, model_id: FromPath[str]) -> Response[bytes]:
        principal = authenticate.principal(request)
        name = model_id.lstrip("/")
        for model in _models_for(runtime, principal):
            if model.id == name:
                return _json(model)
        raise NotFoundError(f"The model `{name}` does not exist.", param="model")

    @get("/health")
    async def health() -> Response[bytes]:
        return _json(wire.Status(status="ok"))

    openapi_description = OPENAPI_FILE.read_bytes()

    @get("/openapi.json")
    async def openapi() -> Response[bytes]:
        return Response(openapi_description, media_type=JSON)

    @get("/ready")
    async def ready() -> Response[bytes]:
        return await _readiness(runtime)

    @get("/status")
    async def status(request: AnyRequest) -> Response[bytes]:
        authenticate(request)
        return _json(await _status(runtime))

    # Any key of either list, once the operator asks for it (Prometheus sends
    # one with `authorization: {credentials: ...}`); open by default.
    metrics_key = (
        Authenticator(server.api_key_hashes + server.admin_key_hashes)
        if server.metrics_requires_key
        else None
    )

    @get("/metrics", media_type="text/plain; version=0.0.4; charset=utf-8")
    async def metrics(request: AnyRequest) -> bytes:
        if metrics_key is not None:
            metrics_key(request)
        state = await _server_state(runtime)
        if runtime.metrics is None:
            return generate_latest(state)
        return runtime.metrics.render(state)

    admin_authenticate = AdminAuthenticator(
        server.api_key_hashes,
        server.admin_key_hashes,
        network=not is_loopback(server.host),
        managed=runtime.managed_keys,
    )
    admin = build_admin_handlers(
        lambda: runtime.serving().adapters or _no_adapters(),
        runtime.backends,
        admin_authenticate,
        runtime.serving,
        runtime.settings.limits,
    )
    admin += build_key_handlers(runtime.managed_keys, admin_authenticate)
    usage = build_usage_handlers(lambda: runtime.accounting, admin_authenticate)
    return [
        _openai_endpoint(runtime, CHAT, authenticate),
        _openai_endpoint(runtime, COMPLETIONS, authenticate),
        *build_response_handlers(runtime, authenticate),
        _embeddings_endpoint(runtime, authenticate),
        list_models,
        retrieve_model,
        health,
        openapi,
        ready,
        status,
        metrics,
        *admin,
        *usage,
        *cut_usage_handlers(runtime.cut_usage, authenticate),
    ]


def _models_for(runtime: Runtime, principal: Principal | None) -> list[wire.Model]:
    """The models ``principal`` may use (a managed key may be given a few)."""
    models = _models(runtime)
    if principal is None or principal.models is None:
        return models
    catalog = runtime.plan.catalog
    return [model for model in models if may_see(principal, catalog, model.id, _base_of(model))]


def _base_of(model: wire.Model) -> str | None:
    return model.parent if isinstance(model.parent, str) else None


def _no_adapters() -> AdapterRegistry:
    raise InternalError("The gateway has no adapter registry.")


def _models(runtime: Runtime) -> list[wire.Model]:
    """Models, then adapters and named stacks with ``parent`` set to their base."""
    created = runtime.started_at
    catalog = runtime.plan.catalog
    listed = [
        wire.Model(
            id=name,
            object="model",
            created=created,
            owned_by=entry.owned_by,
            capabilities=sorted(entry.capabilities),
        )
        for name, entry in catalog.models.items()
    ]
    registry = runtime.pipeline.adapters if runtime.pipeline else None
    if registry is None:
        return listed
    bases = [(a.name, a.base_model) for a in registry.adapters.values()]
    bases += [(s.name, s.base_model) for s in registry.stacks.values()]
    listed += [
        wire.Model(
            id=name,
            object="model",
            created=created,
            owned_by=catalog.models[base].owned_by,
            root=base,
            parent=base,
            capabilities=sorted(catalog.models[base].capabilities),
        )
        for name, base in bases
    ]
    return listed


async def _backend_health(runtime: Runtime) -> dict[str, BackendHealth]:
    return {name: await backend.health() for name, backend in runtime.backends.items()}


async def _readiness(runtime: Runtime) -> Response[bytes]:
    """Ready means able to route: started, not draining, and some backend up.
    One dead pool must not take every gateway replica out of service."""
    if runtime.draining:
        return _json(wire.Status(status="draining"), 503)
    if runtime.pipeline is None:
        return _json(wire.Status(status="starting"), 503)
    if not any(health.ready for health in (await _backend_health(runtime)).values()):
        return _json(wire.Status(status="no backend is ready"), 503)
    return _json(wire.Status(status="ready"))


async def _server_state(runtime: Runtime) -> ServerState:
    """What /metrics shows of the server's state, read now."""
    pipeline = runtime.pipeline
    status = await _status(runtime)
    deployments = {
        (model, d.deployment, d.backend): DeploymentState(
            d.ready,
            d.in_flight,
            pipeline.stats.in_cooldown(d.deployment) if pipeline else False,
            d.max_concurrency,
        )
        for model, entries in status.models.items()
        for d in entries
    }
    return ServerState(
        runtime.backends,
        pipeline.hooks.failures if pipeline else {},
        deployments,
        pipeline.adapter_usage if pipeline else {},
        runtime.costing,
        _capacity_state(status, pipeline),
    )


def _capacity_state(status: wire.GatewayStatus, pipeline: Pipeline | None) -> CapacityState:
    """max_concurrency's waits, and the worker answering (gateway/workers.py)."""
    return CapacityState(
        status.waiting_for_capacity,
        pipeline.stats.capacity_waits if pipeline else 0,
        pipeline.stats.capacity_timeouts if pipeline else 0,
        status.worker,
        status.workers,
    )


async def _status(runtime: Runtime) -> wire.GatewayStatus:
    health = await _backend_health(runtime)
    stats = runtime.pipeline.stats if runtime.pipeline else None
    models = {
        name: [
            wire.DeploymentStatus(
                deployment=c.target.deployment,
                backend=c.backend,
                engine_model=c.target.engine_model,
                ready=health[c.backend].ready if c.backend in health else False,
                detail=health[c.backend].detail if c.backend in health else "not started",
                in_flight=stats.in_flight(c.target.deployment) if stats else 0,
                max_concurrency=c.max_concurrency,
            )
            for c in entry.candidates
        ]
        for name, entry in runtime.plan.catalog.models.items()
    }
    return wire.GatewayStatus(
        draining=runtime.draining,
        models=models,
        waiting_for_capacity=stats.waiting_for_capacity if stats else 0,
        worker=runtime.worker,
        workers=runtime.workers,
    )


def shed_recorder(runtime: Runtime, app: Litestar) -> ShedRecorder:
    """The ledger rows of requests shed before ``app`` (gateway/shedding.py):
    those to the OpenAI endpoints it serves (its POST routes under /v1)."""
    server = runtime.settings.server
    authenticate = PrincipalAuthenticator(
        server.api_key_hashes, runtime.managed_keys, static_principals(runtime.settings)
    )
    paths = frozenset(
        route.path
        for route in app.routes
        if route.path.startswith("/v1/") and "POST" in getattr(route, "methods", ())
    )
    return ShedRecorder(lambda: runtime.accounting, authenticate, paths)


def create_app(runtime: Runtime) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await runtime.start(stack)
            # Everything loaded so far lives as long as the server: out of the
            # garbage collector's sight, full collections stay short.
            gc.freeze()
            yield

    return Litestar(
        route_handlers=build_handlers(runtime),
        exception_handlers={Exception: handle_exception},
        lifespan=[lifespan],
        request_max_body_size=runtime.settings.limits.max_body_bytes,
        openapi_config=None,
        debug=False,
    )
