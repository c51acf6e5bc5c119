"""The admin API: adapters registered and removed at run time, and routing
explained (a dry run on the live state).

Once any key exists (``server.api_key_hashes`` or ``server.admin_key_hashes``),
every admin call needs a key from ``admin_key_hashes``: an ordinary API key
gets a 403, no key a 401. A gateway with no keys at all (loopback
development) leaves the admin API open, like the rest of its API.

Registrations made here live in memory: declare adapters in the config for
them to survive a restart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post, put
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.types import ControllerRouterHandler

from gateway import wire
from gateway.auth import AdminAuthenticator
from gateway.contract import Adapter, Backend, RequestContext, SupportsLoRA
from gateway.contract import AnyRequest as RoutedRequest
from gateway.errors import InvalidRequestError
from gateway.lora.registry import AdapterRegistry
from gateway.lora.uploads import UploadSlots, drain, receive, spec_from_headers
from gateway.pipeline import Pipeline
from gateway.settings import LimitSettings
from gateway.stats import serves_adapters
from gateway.validation import decode_chat, decode_completion

AnyRequest = Request[Any, Any, State]
JSON = "application/json"


def _lora_backends(backends: Mapping[str, Backend]) -> dict[str, SupportsLoRA]:
    return {name: backend for name, backend in backends.items() if serves_adapters(backend)}


def adapter_info(adapter: Adapter, backends: Mapping[str, Backend]) -> wire.AdapterInfo:
    holders = sorted(
        name
        for name, backend in _lora_backends(backends).items()
        if adapter.name in backend.adapters_loaded()
    )
    return wire.AdapterInfo(
        id=adapter.name,
        object="adapter",
        base=adapter.base_model,
        format=adapter.format,
        path=adapter.relative_path,
        sha256=adapter.sha256,
        loaded_on=holders,
    )


def _respond(payload: object, status: int = 200) -> Response[bytes]:
    return Response(wire.encoder.encode(payload), status_code=status, media_type=JSON)


_NULL = msgspec.Raw(b"null")


class ExplainForm(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /admin/route/explain``: a model name alone, or a
    whole chat (``messages``) or completion (``prompt``) body; the request
    headers and API key fingerprint to simulate, for rules and session
    affinity (the headers of the admin call itself are not used)."""

    model: str | None = None
    # msgspec.Raw: kept as JSON, decoded as the API endpoints decode a body.
    request: msgspec.Raw = _NULL
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    api_key_id: str | None = None


_explain_decoder = msgspec.json.Decoder(ExplainForm)


def explained_request(pipeline: Pipeline, form: ExplainForm) -> RoutedRequest:
    """The request to route, validated as the API endpoints validate it."""
    body = bytes(form.request)
    if (form.model is None) == (body == bytes(_NULL)):
        raise InvalidRequestError('give either "model" or "request" (a chat or completion body)')
    if form.model is not None:
        message = wire.UserMessage(content="")
        return wire.ChatCompletionRequest(model=form.model, messages=[message])
    fields = msgspec.json.decode(body)
    if isinstance(fields, dict) and "prompt" in fields:
        return decode_completion(body, pipeline.limits)
    return decode_chat(body, pipeline.limits)


def build_admin_handlers(
    registry: Callable[[], AdapterRegistry],
    backends: Mapping[str, Backend],
    authenticate: AdminAuthenticator,
    pipeline: Callable[[], Pipeline],
    limits: LimitSettings,
) -> list[ControllerRouterHandler]:
    """``registry`` and ``pipeline`` are called per request: they exist once started."""

    @get("/admin/adapters")
    async def list_adapters(request: AnyRequest) -> Response[bytes]:
        authenticate(request)
        adapters = registry()
        return _respond(
            wire.AdapterList(
                object="list",
                data=[adapter_info(a, backends) for a in adapters.adapters.values()],
                stacks=[
                    wire.StackInfo(
                        id=s.name,
                        object="adapter_stack",
                        base=s.base_model,
                        adapters=[f"{name}@{scale:g}" for name, scale in s.parts],
                    )
                    for s in adapters.stacks.values()
                ],
            )
        )

    @post("/admin/adapters", status_code=201)
    async def register_adapter(request: AnyRequest) -> Response[bytes]:
        authenticate(request)
        body = await request.body()
        try:
            form = wire.adapter_registration_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise InvalidRequestError(f"Invalid adapter registration: {error}") from None
        adapter = await registry().register(form.name, form.base, form.path, form.sha256)
        return _respond(adapter_info(adapter, backends), 201)

    slots = UploadSlots(limits.max_concurrent_uploads)
    upload_limit = limits.max_upload_bytes

    @put(
        "/admin/adapters/{name:str}/files",
        status_code=201,
        request_max_body_size=upload_limit,
    )
    async def upload_adapter(request: AnyRequest, name: FromPath[str]) -> Response[bytes]:
        """An adapter's files pushed by a gateway, streamed to disk and
        checked before they are kept (see gateway/lora/uploads.py)."""
        authenticate(request)  # before reading a byte of the body
        spec = spec_from_headers(request.headers)
        base = request.headers.get("x-nomoat-base", "")
        adapters = registry()
        with slots.slot():
            known = adapters.uploaded(name, spec.sha256)
            if known is not None:
                await drain(request.stream(), upload_limit)
                return _respond(adapter_info(known, backends), 201)
            try:
                root = adapters.check_upload(name, base)
            except InvalidRequestError:
                await drain(request.stream(), upload_limit)
                raise
            stored = await receive(root, spec, request.stream(), upload_limit)
            adapter = await adapters.register_stored(name, base, stored)
        return _respond(adapter_info(adapter, backends), 201)

    @delete("/admin/adapters/{name:str}", status_code=200)
    async def remove_adapter(request: AnyRequest, name: FromPath[str]) -> Response[bytes]:
        authenticate(request)
        removed = registry().remove(name)
        if isinstance(removed, Adapter):
            # Engines free it now rather than when it would be evicted.
            await asyncio.gather(
                *(backend.unload_adapter(name) for backend in _lora_backends(backends).values())
            )
        kind = "adapter" if isinstance(removed, Adapter) else "adapter_stack"
        return _respond(wire.Deleted(id=name, object=kind, deleted=True))

    @post("/admin/route/explain", status_code=200)
    async def explain_route(request: AnyRequest) -> Response[bytes]:
        """How a request would be routed now; nothing is sent to any engine."""
        authenticate(request)
        try:
            form = _explain_decoder.decode(await request.body())
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise InvalidRequestError(f"Invalid explain request: {error}") from None
        serving = pipeline()
        routed = explained_request(serving, form)
        headers = {name.lower(): value for name, value in form.headers.items()}
        ctx = RequestContext(
            f"explain-{uuid.uuid4().hex}", int(time.time()), form.api_key_id, None, headers
        )
        return _respond(await serving.explain(routed, ctx))

    return [list_adapters, register_adapter, upload_adapter, remove_adapter, explain_route]
